"""GPU path (pycuda): pre/post-processing kernels (kernels.py) beside the runners in runtime/backends.

Nothing here imports pycuda at import time; `runtime.gpu.kernels.available()` says whether this machine can run it.
"""
