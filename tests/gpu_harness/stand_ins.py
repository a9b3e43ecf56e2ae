"""Host-memory stand-ins of the CUDA device and of the GPU kernels, for the device pipeline
(runtime.gpu.pipeline.DevicePipeline) on machines without a GPU: `HostDevice` has CudaDevice's interface and counts
the host waits and downloads asked of it; `HostKernels` has the GpuKernels API (runtime.gpu.kernels) implemented with
the CPU reference functions, "device" addresses being host addresses. The onnxruntime CPU runner's infer_device
takes such addresses, so the pipeline's orchestration runs for real."""
import ctypes
import time
from contextlib import nullcontext

import numpy as np

from runtime import normalize
from runtime import preprocess as pp
from runtime.gpu.pipeline import host_view
from runtime.graph import masked


class HostDevice:
    """CudaDevice's interface on the host; counts the waits and downloads the pipeline asks for."""

    kind = "host"
    name = "host stand-in"
    stream = None

    def __init__(self, ordinal=0):
        self.syncs = self.downloads = 0
        self.closed = False
        HostDevice.last = self

    def current(self):
        return nullcontext()

    def event(self):
        return [0.0]

    def record(self, event):
        event[0] = time.perf_counter()

    @staticmethod
    def elapsed_ms(start, end):
        return (end[0] - start[0]) * 1e3

    def pinned(self, shape, dtype):
        return np.zeros(shape, dtype)

    def download_async(self, host, ptr):
        ctypes.memmove(host.ctypes.data, int(ptr), host.nbytes)
        self.downloads += 1

    def synchronize(self):
        self.syncs += 1

    def ort_options(self):
        return {"providers": ["cpu"], "intra_op_threads": 1}

    def close(self):
        self.closed = True


class HostKernels:
    """The GpuKernels API (runtime.gpu.kernels) on host memory with the CPU reference functions."""

    def __init__(self, *, size=224, iterations=1, input_dtype=np.float32, vgg_channels=1, vgg_dtype=np.float32,
                 max_frame=(2160, 3840, 3), stream=None, unet_normalization=None, vgg_normalization=None):
        self.size, self.iterations, self.channels = size, iterations, vgg_channels
        self.unet_normalization, self.vgg_normalization = unet_normalization, vgg_normalization
        self._unet = np.zeros((1, 1, size, size), input_dtype)
        self._vgg = np.zeros((1, vgg_channels, size, size), vgg_dtype)
        self._image = np.zeros((size, size), np.uint8)
        self.unet_input, self.vgg_input, self.image = (a.ctypes.data for a in (self._unet, self._vgg, self._image))
        self.uploads = []
        self.mask_downloads = 0
        HostKernels.last = self

    def preprocess(self, pixels, region, channel_order="RGB"):
        self.uploads.append((pixels.dtype, pixels.shape, region, channel_order))
        gray = pp.to_gray(pixels, channel_order) if pixels.ndim == 3 else pixels
        img, _ = pp.preprocess(gray, region, size=self.size, crimmins_iterations=self.iterations)
        self._image[...] = img
        self._unet[...] = normalize.to_input(img, 1, self.unet_normalization)

    def gate(self, prob, prob_dtype=np.float32, threshold=0.5):
        p = host_view(prob, (self.size, self.size), prob_dtype)
        self._mask = (p > threshold).astype(np.uint8)
        self._fraction = float(self._mask.mean())
        self._vgg[...] = normalize.to_input(masked(self._image, self._mask), self.channels, self.vgg_normalization)

    def fraction(self):
        return self._fraction

    def download_image(self):
        return self._image.copy()

    def download_mask(self):
        self.mask_downloads += 1
        return self._mask.copy()

    def download_prob(self, ptr, dtype):
        return host_view(ptr, (self.size, self.size), dtype).astype(np.float32)
