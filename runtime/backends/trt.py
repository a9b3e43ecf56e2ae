"""The TensorRT runner: an engine from the engine cache (built from the bundle's ONNX on first use by
`runtime.backends.trt_build`), deserialised and run through pycuda.

    with TrtRunner("unet.fp16.onnx", precision="fp16") as unet:
        unet.inputs                                   # {"image": TensorMeta(shape=(None, 1, 224, 224), float32)}
        mask = unet.infer({"image": x})["mask"]      # host arrays in, host arrays out (like OrtRunner)
        out = unet.infer_device({"image": d_ptr}, shapes={"image": (1, 1, 224, 224)})   # device pointers

Importing this module needs neither TensorRT nor pycuda (they are imported when a runner is made), so
`sonoscore --help` and `doctor` work everywhere and a missing TensorRT is one sentence (BackendUnavailable).
Building (network flags, profile, timing cache, TF32, DLA) is in `runtime.backends.trt_build`, the cache and every
other piece that needs no TensorRT in `runtime.backends.engine_cache`; the lifetime guard and the checks of the
feeds in `runtime.backends.base.BaseRunner`.

Running, written against the TensorRT Python API of 10.3 (JetPack 6.1/6.2) and 11.x, where these are unchanged and
used as documented: `Runtime.deserialize_cuda_engine`, `Runtime.DLA_core`, `num_io_tensors`,
`get_tensor_name/mode/dtype/shape`, `get_tensor_profile_shape`, `create_execution_context`, `set_input_shape`,
`set_tensor_address`, `execute_async_v3(stream_handle)`. `ICudaEngine.device_memory_size` was removed in 11.x: not
used (the execution context allocates its own).

CUDA: `runtime.backends.cuda.CudaDevice`, the device's primary context (shared with the device pipeline's kernels
and with onnxruntime-gpu in the same process) and a stream of the runner's own. The context is pushed around each
call and popped after, so any thread may call. Host staging buffers are page-locked (async copies need that) and
device buffers are allocated once, for the largest shapes the optimisation profile allows.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

import runtime.backends.engine_cache as ec
import runtime.backends.trt_build as tb
from runtime.backends.base import BackendUnavailable, BaseRunner, DeviceTensor, TensorMeta, short
from runtime.backends.cuda import CudaDevice, import_driver
from runtime.backends.trt_build import UNAVAILABLE, tensorrt_too_old  # noqa: F401  (trt_status, and tests)

NO_PYCUDA = ("pycuda is not installed here: the trt backend moves buffers with pycuda, built against this "
             "machine's CUDA (device/setup.sh installs it); use --backend ort")
OR_ELSE = "use --backend ort"


def _import_pycuda():
    return import_driver(NO_PYCUDA, OR_ELSE)


def trt_status() -> dict[str, Any]:
    """What `sonoscore doctor` says about the trt backend. Never raises.

    Keys: available (bool); reason (one sentence, when not available); tensorrt (version, marked when older than
    10.3, or why not);
    pycuda (version, or why not); gpus (list of {index, name, compute_capability, memory_mb}, or why not);
    dla_cores (int, when TensorRT and a GPU work)."""
    status: dict[str, Any] = {"available": False}
    trt = cuda = None
    try:
        trt = tb.import_tensorrt()
        status["tensorrt"] = str(trt.__version__)
        too_old = tensorrt_too_old(status["tensorrt"])
        if too_old:
            status["tensorrt"] += " (too old: the trt backend needs 10.3 or newer)"
            status["reason"], trt = too_old, None
    except BackendUnavailable as e:
        status["tensorrt"] = "not installed" if str(e) == UNAVAILABLE else "installed but fails to import"
        status["reason"] = str(e)
    except Exception as e:  # anything else an extension module can raise on import
        status["tensorrt"] = "installed but fails to import"
        status["reason"] = f"TensorRT's Python bindings fail to import ({type(e).__name__}: {short(e)})"
    try:
        cuda = _import_pycuda()
        import pycuda
        status["pycuda"] = str(getattr(pycuda, "VERSION_TEXT", "installed"))
    except BackendUnavailable as e:
        status["pycuda"] = "not installed" if str(e) == NO_PYCUDA else "installed but fails to import"
        status.setdefault("reason", str(e))
    except Exception as e:
        status["pycuda"] = "installed but fails to import"
        status.setdefault("reason", f"pycuda fails to import ({type(e).__name__}: {short(e)})")
    if cuda is not None:
        try:
            cuda.init()
            status["gpus"] = [{"index": i, "name": d.name(),
                               "compute_capability": "%d.%d" % d.compute_capability(),
                               "memory_mb": int(d.total_memory() // (1 << 20))}
                              for i, d in ((i, cuda.Device(i)) for i in range(cuda.Device.count()))]
        except Exception as e:  # pycuda's LogicError/RuntimeError: no driver, no device, no permission
            status["gpus"] = f"CUDA is not usable ({short(e)})"
            status.setdefault("reason", f"CUDA is not usable here ({short(e)}); check the driver and that this "
                                        f"user is in the video group; use --backend ort")
        else:
            if not status["gpus"]:
                status.setdefault("reason", "no CUDA GPU is visible; use --backend ort")
    if trt is not None and isinstance(status.get("gpus"), list) and status["gpus"]:
        try:
            builder = trt.Builder(tb.logger(trt))
            status["dla_cores"] = int(builder.num_DLA_cores)
            del builder
        except Exception as e:  # TensorRT built for another CUDA, or the GPU is not one it supports
            status["dla_cores"] = "unknown"
            status["reason"] = (f"TensorRT {status['tensorrt']} cannot start a builder on this GPU ({short(e)}); "
                                f"use --backend ort")
    status["available"] = "reason" not in status
    return status


class TrtRunner(BaseRunner):
    """A TensorRT engine as a runner: inputs/outputs metadata by tensor name, infer(feeds) -> outputs.

    Options: precision ("fp32"/"fp16"/"int8": a label for the cache key; guessed from the file name when not
    given), cache_dir (the sonoscore cache root; engines go to its engines/ folder), batch ((min, opt, max) of the
    dynamic batch dim, default 1/1/1: the pipeline feeds one frame), dims (pins for other symbolic dims),
    dla_core (an Orin DLA core, with GPU fallback; default GPU only; the batch is then fixed at opt, since DLA has
    no dynamic dimensions), workspace_mb (builder scratch limit),
    device (CUDA ordinal), progress (build messages on stderr). intra_op_threads is accepted for the common runner
    signature and ignored (TensorRT runs on the GPU)."""

    def __init__(self, model_path: Path, *, precision: str | None = None, cache_dir: Path | None = None,
                 batch=(1, 1, 1), dims: dict[str, int] | None = None, dla_core: int | None = None,
                 workspace_mb: int = 1024, device: int = 0, progress: bool = True,
                 intra_op_threads: int | None = None):
        super().__init__(model_path)
        self.batch = ec.profile_batch(batch, dla_core)
        self.dims = dict(dims or {})
        self.precision = precision or ec.guess_precision(self.model_path)
        self.cache_dir = cache_dir
        self.dla_core = dla_core
        self.workspace_bytes = int(workspace_mb) << 20
        self.device = int(device)
        self.progress = progress
        self._trt = tb.load_tensorrt()
        self._cuda = _import_pycuda()
        self._gpu_device: CudaDevice | None = None
        self._lock = threading.Lock()
        self.entry: ec.CacheEntry | None = None

    @property
    def spec(self) -> tb.EngineSpec:
        """What the engine is built from (the cache key's part that is not TensorRT or the GPU)."""
        return tb.EngineSpec(self.model_path, precision=self.precision, batch=self.batch, dims=self.dims,
                             dla_core=self.dla_core, workspace_bytes=self.workspace_bytes)

    # -- lifetime --------------------------------------------------------------------------------------------------
    def activate_impl(self) -> None:
        if not self.model_path.is_file():
            raise FileNotFoundError(f"ONNX model '{self.model_path}' does not exist; check the bundle or the path")
        dev = self._gpu_device = CudaDevice(self.device, missing=NO_PYCUDA, or_else=OR_ELSE)
        with dev.current():
            self._gpu = ec.GpuInfo(dev.name, dev.compute_capability)
            self._open_engine()
            self._allocate()

    def deactivate_impl(self) -> None:
        dev, self._gpu_device = self._gpu_device, None
        if dev is None:
            return
        try:
            with dev.current():
                # TensorRT objects before the memory they use, device memory before the stream and the context.
                for attr in ("_context", "_engine", "_runtime", "_host", "_dev"):
                    if hasattr(self, attr):
                        delattr(self, attr)
        finally:
            dev.close()

    # -- engine ----------------------------------------------------------------------------------------------------
    def _open_engine(self) -> None:
        """Engine from the cache (trt_build builds it on a miss); one rebuild if TensorRT rejects a verified file."""
        trt = self._trt
        spec = self.spec
        for attempt in (1, 2):
            entry = tb.cached_engine(trt, spec, self._gpu, cache_dir=self.cache_dir, progress=self.progress)
            runtime = trt.Runtime(tb.logger(trt))
            if self.dla_core is not None:
                runtime.DLA_core = int(self.dla_core)
            engine = runtime.deserialize_cuda_engine(entry.path.read_bytes())
            if engine is not None:
                break
            ec.invalidate(entry.directory)
            if attempt == 2:
                raise BackendUnavailable(f"TensorRT {trt.__version__} cannot load the engine it just built for "
                                         f"'{self.model_path.name}' (see its log above); use --backend ort")
        self.entry, self._runtime, self._engine = entry, runtime, engine
        self._context = engine.create_execution_context()
        if self._context is None:
            raise BackendUnavailable(f"TensorRT could not create an execution context for '{self.model_path.name}' "
                                     f"(out of GPU memory? see its log above); use --backend ort")
        self._inputs, self._outputs = {}, {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            try:
                dtype = ec.trt_dtype_to_numpy(engine.get_tensor_dtype(name).name)
            except ValueError:
                dtype = None
            if dtype is None:
                raise BackendUnavailable(f"tensor '{name}' of '{self.model_path.name}' is "
                                         f"{engine.get_tensor_dtype(name).name}, which numpy cannot hold; export "
                                         f"the model with float32/float16 I/O")
            meta = TensorMeta(ec.dims_to_shape(engine.get_tensor_shape(name)), dtype)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self._inputs if is_input else self._outputs)[name] = meta

    # -- buffers ---------------------------------------------------------------------------------------------------
    def _max_shape(self, name: str) -> tuple[int, ...]:
        shape = self._inputs[name].shape
        if all(d is not None for d in shape):
            return tuple(int(d) for d in shape)
        return tuple(int(d) for d in self._engine.get_tensor_profile_shape(name, 0)[2])

    def _allocate(self) -> None:
        """Device and page-locked host buffers for the largest shapes the profile allows, made once."""
        cuda, ctx = self._cuda, self._context
        shapes = {name: self._max_shape(name) for name in self._inputs}
        for name, shape in shapes.items():
            ctx.set_input_shape(name, shape)
        for name in self._outputs:
            shapes[name] = tuple(int(d) for d in ctx.get_tensor_shape(name))
            if any(d < 0 for d in shapes[name]):
                raise BackendUnavailable(f"output '{name}' of '{self.model_path.name}' has a data-dependent shape, "
                                         f"which this runner does not support; use --backend ort")
        self._host: dict[str, np.ndarray] = {}
        self._dev: dict[str, Any] = {}
        for name, shape in shapes.items():
            meta = self._inputs.get(name) or self._outputs[name]
            n = int(np.prod(shape, dtype=np.int64))
            self._host[name] = cuda.pagelocked_empty(max(n, 1), meta.dtype)
            self._dev[name] = cuda.mem_alloc(max(n, 1) * meta.dtype.itemsize)

    # -- metadata --------------------------------------------------------------------------------------------------
    @property
    def engine_path(self) -> Path | None:
        return None if self.entry is None else self.entry.path

    @property
    def built(self) -> bool:
        """True when entering this runner built the engine (a cache miss)."""
        return bool(self.entry and self.entry.built)

    @property
    def cuda_device(self) -> CudaDevice:
        """The runner's CudaDevice: `with runner.cuda_device.current():` to allocate or copy in its context."""
        self.check_active()
        return self._gpu_device

    @property
    def stream(self):
        """The runner's pycuda Stream (infer_device enqueues on it unless given another)."""
        return self.cuda_device.stream

    # -- inference -------------------------------------------------------------------------------------------------
    def infer_impl(self, arrays: dict[str, np.ndarray], wanted: list[str]) -> dict[str, np.ndarray]:
        """Copy the (checked) host arrays in, run, copy `wanted` out as new arrays; waits for the runner's stream."""
        for name, a in arrays.items():
            if a.size > self._host[name].size:   # beyond the host buffers: outside the profile
                raise ValueError(self._shape_error(name, a.shape))
        dev = self._gpu_device
        cuda, ctx, stream = self._cuda, self._context, dev.stream
        with self._lock, dev.current():
            for name, a in arrays.items():
                if not ctx.set_input_shape(name, a.shape):
                    raise ValueError(self._shape_error(name, a.shape))
                staged = self._host[name][:a.size].reshape(a.shape)
                np.copyto(staged, a)
                cuda.memcpy_htod_async(self._dev[name], staged, stream)
            for name in (*self._inputs, *self._outputs):
                ctx.set_tensor_address(name, int(self._dev[name]))
            if not ctx.execute_async_v3(stream.handle):
                raise RuntimeError(f"TensorRT failed to run '{self.model_path.name}' (see its log above)")
            results = {}
            for name in wanted:
                shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
                host = self._host[name][:int(np.prod(shape, dtype=np.int64))].reshape(shape)
                cuda.memcpy_dtoh_async(host, self._dev[name], stream)
                results[name] = host
            stream.synchronize()
            return {name: a.copy() for name, a in results.items()}

    def infer_device_impl(self, addresses: dict[str, int], shapes: dict[str, tuple[int, ...]],
                          buffers: dict[str, int], stream: int | None) -> dict[str, DeviceTensor]:
        """Run on device buffers: a frame stays on the GPU from preprocessing to features.

        `addresses`: tensor name -> device address (anything int() takes: a pycuda DeviceAllocation, cupy's
        `.data.ptr`, an OrtValue's `data_ptr()`) of contiguous data in the input's dtype. `shapes`: the input
        shapes, required where a dim is dynamic. `buffers`: optional caller buffers by name (large enough for the
        output shape); other outputs land in the runner's own buffers, valid until the next call. `stream`: the
        cudaStream_t to enqueue on (default: the runner's `stream`). Nothing is synchronised: the outputs are
        ready when that stream is, so the next kernel on the same stream can consume them."""
        dev = self._gpu_device
        handle = dev.stream.handle if stream is None else stream
        ctx = self._context
        with self._lock, dev.current():
            for name, meta in self._inputs.items():
                shape = shapes.get(name)
                if shape is None:
                    if any(d is None for d in meta.shape):
                        raise ValueError(f"input '{name}' of '{self.model_path.name}' is {meta}: give its shape in "
                                         f"shapes={{'{name}': (...)}}")
                    shape = tuple(int(d) for d in meta.shape)
                if not ctx.set_input_shape(name, shape):
                    raise ValueError(self._shape_error(name, shape))
                ctx.set_tensor_address(name, int(addresses[name]))
            result = {}
            for name, meta in self._outputs.items():
                given = buffers.get(name)
                ptr = int(self._dev[name]) if given is None else int(given)
                ctx.set_tensor_address(name, ptr)
                result[name] = DeviceTensor(ptr, tuple(int(d) for d in ctx.get_tensor_shape(name)), meta.dtype)
            if not ctx.execute_async_v3(handle):
                raise RuntimeError(f"TensorRT failed to run '{self.model_path.name}' (see its log above)")
            return result

    def _shape_error(self, name: str, shape) -> str:
        if any(d is None for d in self._inputs[name].shape):
            lo, _, hi = (tuple(int(d) for d in s) for s in self._engine.get_tensor_profile_shape(name, 0))
        else:
            lo = hi = self._max_shape(name)
        if self.dla_core is not None:
            return (f"input '{name}' of model '{self.model_path.name}' has shape {tuple(shape)}, but this DLA engine "
                    f"takes exactly {hi} (DLA has no dynamic dims: the batch is the runner's opt batch)")
        return (f"input '{name}' of model '{self.model_path.name}' has shape {tuple(shape)}, outside the engine's "
                f"profile {lo}..{hi}; make the runner with batch=(min, opt, max) covering it")
