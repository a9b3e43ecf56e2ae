"""Host harness for the GPU kernels' arithmetic (runtime/gpu/kernels_core.h), built and loaded by host.py."""
