"""Host harness for the GPU kernels' arithmetic (runtime/gpu/kernels_core.h), built and loaded by host.py; fake_cuda.py
runs runtime.gpu.kernels.GpuKernels on the CPU through it (a stand-in for pycuda). stand_ins.py: host-memory stand-ins of
the CUDA device and the GPU kernels, with which runtime.gpu.pipeline.DevicePipeline runs on the CPU."""
