"""One GPU through pycuda, for everything in sonoscore that touches CUDA directly: the TensorRT runner
(`runtime.backends.trt`), the device-resident pipeline (`runtime.gpu.pipeline`) and the GPU kernels' tests
(`runtime.gpu.kernels.primary_context`).

    dev = CudaDevice(0)                  # the primary context, retained; a stream of our own on it
    with dev.current():                  # the context current in this thread for the block (any thread may call)
        buf = dev.cuda.mem_alloc(n)
        dev.download_async(host, ptr)    # on dev.stream
    dev.synchronize()
    dev.close()                          # the stream, then the context's retain

It is the device's *primary* context (`Device.retain_primary_context()`, as `pycuda.autoprimaryctx` does), not
`pycuda.autoinit`'s private one, so buffers, streams and kernels are shared with TensorRT and onnxruntime-gpu, which
use the CUDA runtime, i.e. the primary context (https://docs.nvidia.com/cuda/cuda-driver-api/
group__CUDA__PRIMARY__CTX.html; github.com/inducer/pycuda `pycuda/autoprimaryctx.py`). Each `CudaDevice` holds one
retain and releases it in `close()`; the context lives while anyone retains it.

pycuda is imported when a CudaDevice is made, not when this module is: a missing or broken pycuda is one sentence
(BackendUnavailable), whose wording the caller picks (`missing`, `or_else`: what to use instead).
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from runtime.backends.base import BackendUnavailable, import_optional, short

NO_PYCUDA = ("the device pipeline needs pycuda (pip install 'sonoscore[gpu]', built against this machine's CUDA); "
             "use the CPU pipeline (no --device cuda)")


def _or(or_else: str | None) -> str:
    return f", or {or_else}" if or_else else ""


def import_driver(missing: str = NO_PYCUDA, or_else: str | None = None):
    """pycuda.driver, or BackendUnavailable: `missing` when pycuda is not installed, or one sentence saying the
    installed one fails to import (e.g. built for another CUDA), ending with `or_else` when given."""
    return import_optional("pycuda.driver", missing,
                           lambda why: f"pycuda is installed but fails to import ({why}); rebuild it for this "
                                       f"JetPack/CUDA (device/setup.sh){_or(or_else)}")


def retain_primary(driver, ordinal: int, or_else: str | None = None):
    """(Device, its primary Context retained, not pushed); BackendUnavailable when the device is not usable."""
    try:
        driver.init()
        dev = driver.Device(int(ordinal))
        return dev, dev.retain_primary_context()
    except Exception as e:  # pycuda.driver.Error subclasses: no driver, no device, no permission
        raise BackendUnavailable(f"CUDA device {ordinal} is not usable ({short(e)}); check the driver and that this "
                                 f"user is in the video group{_or(or_else)}") from None


def primary_context(ordinal: int = 0):
    """Make the device's primary context current in this thread and return it; pop it with `ctx.pop()` when done.
    (For code that manages the context itself, such as a test fixture; otherwise use `CudaDevice.current()`.)"""
    driver = import_driver()
    _, ctx = retain_primary(driver, ordinal)
    ctx.push()
    return ctx


class CudaDevice:
    """One GPU's primary context (shared with onnxruntime and TensorRT, which use the CUDA runtime) and the stream
    work is enqueued on. `current()` makes the context current in the calling thread."""

    kind = "cuda"

    def __init__(self, ordinal: int = 0, *, missing: str = NO_PYCUDA, or_else: str | None = None):
        self.cuda = import_driver(missing, or_else)
        self.dev, self.ctx = retain_primary(self.cuda, ordinal, or_else)
        self.ordinal = int(ordinal)
        self.ctx.push()
        try:
            self.stream = self.cuda.Stream()  # not the legacy default stream: onnxruntime reads handle 0 as "none"
        except BaseException:
            self.cuda.Context.pop()
            self.ctx.detach()
            self.ctx = None
            raise
        self.cuda.Context.pop()

    @property
    def name(self) -> str:
        return self.dev.name()

    @property
    def compute_capability(self) -> tuple[int, int]:
        major, minor = self.dev.compute_capability()
        return int(major), int(minor)

    @contextmanager
    def current(self):
        """The context current in this thread for the block, popped after (so any thread may use the device)."""
        if self.ctx is None:
            raise RuntimeError(f"CUDA device {self.ordinal} was closed; make a new CudaDevice")
        self.ctx.push()
        try:
            yield
        finally:
            self.cuda.Context.pop()

    def event(self):
        return self.cuda.Event()

    def record(self, event) -> None:
        event.record(self.stream)

    @staticmethod
    def elapsed_ms(start, end) -> float:
        return float(end.time_since(start))

    def pinned(self, shape, dtype) -> np.ndarray:
        """Page-locked host memory (async copies need it)."""
        return self.cuda.pagelocked_empty(shape, dtype)

    def download_async(self, host: np.ndarray, ptr: int) -> None:
        self.cuda.memcpy_dtoh_async(host, int(ptr), self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def ort_options(self) -> dict:
        """OrtRunner options that put its session on this device and stream."""
        return {"providers": ["cuda"], "stream": self.stream, "device_id": self.ordinal}

    def close(self) -> None:
        """Release the stream, then this object's retain of the primary context. Idempotent."""
        ctx, self.ctx = getattr(self, "ctx", None), None
        if ctx is None:
            return
        ctx.push()
        try:
            self.stream = None
        finally:
            self.cuda.Context.pop()
            ctx.detach()
