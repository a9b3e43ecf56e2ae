"""The TensorRT runner: an engine built from the bundle's ONNX on first use (and cached), run through pycuda.

    with TrtRunner("unet.fp16.onnx", precision="fp16") as unet:
        unet.inputs                                   # {"image": TensorMeta(shape=(None, 1, 224, 224), float32)}
        mask = unet.infer({"image": x})["mask"]      # host arrays in, host arrays out (like OrtRunner)
        out = unet.infer_device({"image": d_ptr}, shapes={"image": (1, 1, 224, 224)})   # device pointers

Importing this module needs neither TensorRT nor pycuda (they are imported when a runner is made), so
`sonoscore --help` and `doctor` work everywhere and a missing TensorRT is one sentence (BackendUnavailable).
The cache and every other piece that needs no TensorRT is in `runtime.backends.engine_cache`, tested on CPU.

Written against the TensorRT Python API of 10.3 (JetPack 6.1/6.2) and 11.x. What differs, and how this file copes:

- Older TensorRT is refused when a runner is made, before anything is built (`tensorrt_too_old`): JetPack 6.0
  (L4T R36.2/R36.3) ships TensorRT 8.6, whose NetworkDefinitionCreationFlag has no STRONGLY_TYPED member, so
  `create_network(0)` would make an implicit-batch network that the ONNX parser rejects with a misleading error,
  and its weak typing would not honour the precision of the FP16/INT8 file. (JetPack 6.1/6.2 = L4T R36.4 = CUDA
  12.6 and TensorRT 10.3: https://developer.nvidia.com/embedded/jetpack-archive)

- Network creation. 10.x: `Builder.create_network(flags)` with `1 << int(NetworkDefinitionCreationFlag.
  STRONGLY_TYPED)`; `EXPLICIT_BATCH` is deprecated and ignored. 11.x: every network is strongly typed,
  `EXPLICIT_BATCH` is gone and `STRONGLY_TYPED` is kept only as a deprecated, always-on member. So the
  STRONGLY_TYPED bit is set when the member exists (`getattr`), EXPLICIT_BATCH is never used, and
  `create_network(0)` is the fallback. (Bindings: `python/src/infer/pyCore.cpp` at tags v10.3.0 and v11.1 of
  github.com/NVIDIA/TensorRT; Builder docs: https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/
  python-api/infer/Core/Builder.html)
- Precision. 11.x removed `BuilderFlag.FP16/INT8/BF16/FP8`, `OBEY/PREFER_PRECISION_CONSTRAINTS`,
  `IBuilderConfig.int8_calibrator` and `Builder.platform_has_fast_fp16/int8` (10.x deprecated the weak-typing
  path). None of them is used: precision lives in the ONNX file (FP16-converted, or INT8 Q/DQ from calibration/),
  as DESIGN.md requires. (https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/
  tensorrt-10x-to-11x-python-api-reference.html, .../api/migration/tensorrt-10x-to-11x.html)
- `ICudaEngine.device_memory_size` was removed in 11.x: not used (the execution context allocates its own).
- DLA (Orin only; Thor has none). 10.x up to 10.7 supports it, so JetPack 6.1/6.2 (TensorRT 10.3) does; 11.0-11.3
  do not; 11.4.1 does again on AGX Orin under JetPack >= 7.2.2, strongly typed, with GPU fallback as in 10.x.
  The builder's `num_DLA_cores` is checked before `default_device_type = DeviceType.DLA`, `DLA_core = n` and
  `set_flag(BuilderFlag.GPU_FALLBACK)`; `OnnxParserFlag.ADJUST_FOR_DLA` is set when the parser has it.
  (https://docs.nvidia.com/deeplearning/tensorrt/11.4.1/api/migration/tensorrt-10x-to-11x-jetson.html,
  .../11.4.1/inference-library/dla-strongly-typed-networks.html, .../dla-runtime-configuration.html)
  DLA has no dynamic dimensions ("the profile's min, max, and opt values must be equal for wildcard dimensions",
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/dla-layer-restrictions.html), and with
  GPU_FALLBACK a range would silently move those layers to the GPU: a DLA runner's batch is pinned to its opt
  batch (`engine_cache.profile_batch`).
- TF32. `BuilderFlag.TF32` ("allow computations on FLOAT tensors to use TF32 ... Enabled by default") is in 10.x and
  11.x: it is cleared (`clear_tf32`, when the member exists), so FP32 tensors are computed in FP32 as onnxruntime
  does and an "fp32" engine is FP32, not TF32. (IBuilderConfig / BuilderFlag docs, .../_static/python-api/infer/
  Core/BuilderConfig.html)
- Unchanged in both, used as documented: `OnnxParser.parse_from_file/num_errors/get_error`,
  `create_builder_config`, `set_memory_pool_limit(MemoryPoolType.WORKSPACE, n)`, `create_timing_cache(blob)`,
  `set_timing_cache(cache, ignore_mismatch)`, `get_timing_cache().serialize()`, `create_optimization_profile`,
  `set_shape(name, min, opt, max)`, `add_optimization_profile`, `build_serialized_network`,
  `Runtime.deserialize_cuda_engine`, `num_io_tensors`, `get_tensor_name/mode/dtype/shape`,
  `get_tensor_profile_shape`, `create_execution_context`, `set_input_shape`, `set_tensor_address`,
  `execute_async_v3(stream_handle)`.

CUDA: pycuda on the device's *primary* context (`Device.retain_primary_context()`, as `pycuda.autoprimaryctx`
does), not `pycuda.autoinit`'s private context, so buffers, streams and kernels are shared with TensorRT (which
uses the CUDA runtime, i.e. the primary context) and with onnxruntime-gpu in the same process
(https://docs.nvidia.com/cuda/cuda-driver-api/group__CUDA__PRIMARY__CTX.html; github.com/inducer/pycuda
`pycuda/autoprimaryctx.py`). The context is pushed around each call and popped after, so any thread may call.
Host staging buffers are page-locked (async copies need that) and device buffers are allocated once, for the
largest shapes the optimisation profile allows.
"""
from __future__ import annotations

import importlib
import platform
import re
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends import BackendUnavailable, DeviceTensor, TensorMeta, check_input, check_names, tensor_names
from runtime.backends import engine_cache as ec

UNAVAILABLE = ("TensorRT is not installed here: the trt backend runs on a Jetson (JetPack 6.1 or newer) or an x86 "
               "host with NVIDIA's tensorrt wheel; use --backend ort")
MIN_TENSORRT = (10, 3)
NO_PYCUDA = ("pycuda is not installed here: the trt backend moves buffers with pycuda, built against this "
             "machine's CUDA (device/setup.sh installs it); use --backend ort")


def _import_tensorrt():
    """The tensorrt module, or BackendUnavailable: not installed (the sentence above) or installed but broken."""
    return _import("tensorrt", "tensorrt", UNAVAILABLE, "TensorRT's Python bindings are installed but fail")


def _load_tensorrt():
    """The tensorrt module when it is new enough for this backend, else BackendUnavailable (one sentence)."""
    trt = _import_tensorrt()
    too_old = tensorrt_too_old(getattr(trt, "__version__", ""))
    if too_old:
        raise BackendUnavailable(too_old)
    return trt


def tensorrt_too_old(version: str) -> str | None:
    """The sentence refusing TensorRT `version` when it is older than 10.3 (e.g. "8.6.2.3", JetPack 6.0's), else
    None ("10.3.0.30", "10.16.2", "11.1.0"). A version that does not start with major.minor is not refused: the
    import and the build say what is wrong with it."""
    m = re.match(r"\s*(\d+)\.(\d+)", str(version or ""))
    if m is None or (int(m.group(1)), int(m.group(2))) >= MIN_TENSORRT:
        return None
    return (f"TensorRT {version} is too old for the trt backend, which needs TensorRT 10.3 or newer (on a Jetson: "
            f"JetPack 6.1 or newer; JetPack 6.0 ships TensorRT 8.6); upgrade, or use --backend ort")


def _import_pycuda():
    return _import("pycuda.driver", "pycuda", NO_PYCUDA, "pycuda is installed but fails")


def _import(module: str, dist: str, missing: str, broken: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == dist:
            raise BackendUnavailable(missing) from None
        # e.g. libnvinfer.so.10 or libcuda.so.1 not found: installed, but not for this system
        raise BackendUnavailable(f"{broken} to import ({_short(e)}); reinstall for this JetPack/CUDA "
                                 f"(device/setup.sh), or use --backend ort") from None


def trt_status() -> dict[str, Any]:
    """What `sonoscore doctor` says about the trt backend. Never raises.

    Keys: available (bool); reason (one sentence, when not available); tensorrt (version, marked when older than
    10.3, or why not);
    pycuda (version, or why not); gpus (list of {index, name, compute_capability, memory_mb}, or why not);
    dla_cores (int, when TensorRT and a GPU work)."""
    status: dict[str, Any] = {"available": False}
    trt = cuda = None
    try:
        trt = _import_tensorrt()
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
        status["reason"] = f"TensorRT's Python bindings fail to import ({type(e).__name__}: {_short(e)})"
    try:
        cuda = _import_pycuda()
        import pycuda
        status["pycuda"] = str(getattr(pycuda, "VERSION_TEXT", "installed"))
    except BackendUnavailable as e:
        status["pycuda"] = "not installed" if str(e) == NO_PYCUDA else "installed but fails to import"
        status.setdefault("reason", str(e))
    except Exception as e:
        status["pycuda"] = "installed but fails to import"
        status.setdefault("reason", f"pycuda fails to import ({type(e).__name__}: {_short(e)})")
    if cuda is not None:
        try:
            cuda.init()
            status["gpus"] = [{"index": i, "name": d.name(),
                               "compute_capability": "%d.%d" % d.compute_capability(),
                               "memory_mb": int(d.total_memory() // (1 << 20))}
                              for i, d in ((i, cuda.Device(i)) for i in range(cuda.Device.count()))]
        except Exception as e:  # pycuda's LogicError/RuntimeError: no driver, no device, no permission
            status["gpus"] = f"CUDA is not usable ({_short(e)})"
            status.setdefault("reason", f"CUDA is not usable here ({_short(e)}); check the driver and that this "
                                        f"user is in the video group; use --backend ort")
        else:
            if not status["gpus"]:
                status.setdefault("reason", "no CUDA GPU is visible; use --backend ort")
    if trt is not None and isinstance(status.get("gpus"), list) and status["gpus"]:
        try:
            builder = trt.Builder(_logger(trt))
            status["dla_cores"] = int(builder.num_DLA_cores)
            del builder
        except Exception as e:  # TensorRT built for another CUDA, or the GPU is not one it supports
            status["dla_cores"] = "unknown"
            status["reason"] = (f"TensorRT {status['tensorrt']} cannot start a builder on this GPU ({_short(e)}); "
                                f"use --backend ort")
    status["available"] = "reason" not in status
    return status


class TrtRunner:
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
        self.model_path = Path(model_path)
        self.batch = ec.profile_batch(batch, dla_core)
        self.dims = dict(dims or {})
        self.precision = precision or ec.guess_precision(self.model_path)
        self.cache_dir = cache_dir
        self.dla_core = dla_core
        self.workspace_bytes = int(workspace_mb) << 20
        self.device = int(device)
        self.progress = progress
        self._trt = _load_tensorrt()
        self._cuda = _import_pycuda()
        self._ctx = None
        self._lock = threading.Lock()
        self.entry: ec.CacheEntry | None = None

    # -- lifetime --------------------------------------------------------------------------------------------------
    def __enter__(self) -> "TrtRunner":
        if self._ctx is not None:
            raise RuntimeError(f"TrtRunner for '{self.model_path.name}' is already active; enter it once")
        if not self.model_path.is_file():
            raise FileNotFoundError(f"ONNX model '{self.model_path}' does not exist; check the bundle or the path")
        cuda, trt = self._cuda, self._trt
        try:
            cuda.init()
            dev = cuda.Device(self.device)
            ctx = dev.retain_primary_context()
        except Exception as e:  # pycuda.driver.Error subclasses
            raise BackendUnavailable(f"CUDA device {self.device} is not usable ({_short(e)}); check the driver and "
                                     f"that this user is in the video group, or use --backend ort") from None
        self._ctx = ctx
        try:
            with self._current():
                self._gpu = ec.GpuInfo(dev.name(), tuple(dev.compute_capability()))
                self._logger = _logger(trt)
                self._open_engine()
                self._stream = cuda.Stream()
                self._allocate()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._release()

    def _release(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is None:
            return
        ctx.push()
        try:
            # TensorRT objects before the memory they use, device memory before the context.
            for attr in ("_context", "_engine", "_runtime", "_stream", "_host", "_dev"):
                if hasattr(self, attr):
                    delattr(self, attr)
        finally:
            ctx.pop()
            ctx.detach()

    @contextmanager
    def _current(self):
        """Make the primary context current in this thread for the duration (any thread may call the runner)."""
        if self._ctx is None:
            raise RuntimeError(f"TrtRunner for '{self.model_path.name}' is not active; use it inside "
                               f"`with TrtRunner(...) as runner:`")
        self._ctx.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    # -- engine ----------------------------------------------------------------------------------------------------
    def _key(self) -> dict[str, Any]:
        return ec.engine_key(onnx_sha256=ec.sha256_file(self.model_path), trt_version=self._trt.__version__,
                             gpu=self._gpu, precision=self.precision, batch=self.batch, dims=self.dims,
                             dla_core=self.dla_core)

    def _open_engine(self) -> None:
        """Engine from the cache (built now on a miss); one rebuild if TensorRT rejects a verified file."""
        trt = self._trt
        root = ec.engines_root(self.cache_dir)
        key = self._key()
        label = f"{self.model_path.name} ({self.precision})"
        for attempt in (1, 2):
            entry = ec.get_or_build(root, key, lambda: self._build(root), label=label, progress=self.progress)
            runtime = trt.Runtime(self._logger)
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
        self._inputs: dict[str, TensorMeta] = {}
        self._outputs: dict[str, TensorMeta] = {}
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

    def _build(self, root: Path) -> tuple[bytes, dict[str, Any]]:
        """Parse the ONNX strongly typed, set the profile, timing cache, FP32 without TF32 and DLA, build; the bytes
        to cache."""
        trt = self._trt
        builder = trt.Builder(self._logger)
        network = builder.create_network(network_flags(trt))
        parser = trt.OnnxParser(network, self._logger)
        if self.dla_core is not None and hasattr(getattr(trt, "OnnxParserFlag", None), "ADJUST_FOR_DLA"):
            parser.set_flag(trt.OnnxParserFlag.ADJUST_FOR_DLA)
        if not parser.parse_from_file(str(self.model_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendUnavailable(f"TensorRT {trt.__version__} cannot parse '{self.model_path.name}' "
                                     f"({_short(errors, 400)}); use --backend ort for this model")
        inputs = {}  # only the shapes matter for the profile
        for i in range(network.num_inputs):
            t = network.get_input(i)
            inputs[t.name] = TensorMeta(ec.dims_to_shape(t.shape), np.dtype(np.void))
        try:
            shapes = ec.profile_shapes(inputs, self.batch, self.dims)
        except ValueError as e:
            raise BackendUnavailable(f"'{self.model_path.name}': {e}") from None
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace_bytes)
        tf32 = clear_tf32(trt, config)
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        timing_path = ec.timing_cache_path(root, self._gpu, trt.__version__)
        try:
            blob = ec.read_timing_cache(timing_path)
            cache = config.create_timing_cache(blob) if blob else None
            reused = cache is not None and config.set_timing_cache(cache, False)
        except Exception:  # a damaged file: TensorRT refuses it; timings are only an optimisation
            reused = False
        if not reused:  # none yet, damaged, or from another device/version: start an empty one
            config.set_timing_cache(config.create_timing_cache(b""), False)
        if self.dla_core is not None:
            cores = int(builder.num_DLA_cores)
            if not 0 <= int(self.dla_core) < cores:
                raise BackendUnavailable(f"DLA core {self.dla_core} does not exist here (this device has {cores} DLA "
                                         f"core(s), TensorRT {trt.__version__}); leave the DLA option out to use the "
                                         f"GPU")
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = int(self.dla_core)
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise BackendUnavailable(f"TensorRT {trt.__version__} could not build an engine for "
                                     f"'{self.model_path.name}' (see its log above); use --backend ort")
        ec.write_timing_cache(timing_path, bytes(memoryview(config.get_timing_cache().serialize())))
        return bytes(memoryview(plan)), {
            "onnx": self.model_path.name, "profile_shapes": {n: [list(s) for s in v] for n, v in shapes.items()},
            "gpu_slug": self._gpu.slug, "host": platform.node(),
            "strongly_typed_flag": bool(network_flags(trt)), "tf32": tf32, "workspace_bytes": self.workspace_bytes}

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
    def inputs(self) -> dict[str, TensorMeta]:
        self._active()
        return dict(self._inputs)

    @property
    def outputs(self) -> dict[str, TensorMeta]:
        self._active()
        return dict(self._outputs)

    @property
    def engine_path(self) -> Path | None:
        return None if self.entry is None else self.entry.path

    @property
    def built(self) -> bool:
        """True when entering this runner built the engine (a cache miss)."""
        return bool(self.entry and self.entry.built)

    @property
    def stream(self):
        """The runner's pycuda Stream (infer_device enqueues on it unless given another)."""
        self._active()
        return self._stream

    def _active(self) -> None:
        if self._ctx is None:
            raise RuntimeError(f"TrtRunner for '{self.model_path.name}' is not active; use it inside "
                               f"`with TrtRunner(...) as runner:`")

    # -- inference -------------------------------------------------------------------------------------------------
    def infer(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run the engine on host arrays (every input, by name); return `outputs` (default: all) as new arrays."""
        self._active()
        wanted = check_names(self.model_path.name, self._inputs, self._outputs, feeds, outputs)
        arrays = {name: self._check(name, value) for name, value in feeds.items()}
        cuda, ctx, stream = self._cuda, self._context, self._stream
        with self._lock, self._current():
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

    def infer_device(self, inputs: dict[str, int], shapes: dict[str, tuple[int, ...]] | None = None,
                     outputs: dict[str, int] | None = None, stream=None) -> dict[str, DeviceTensor]:
        """Run on device buffers: a frame stays on the GPU from preprocessing to features.

        `inputs`: tensor name -> device address (anything int() takes: a pycuda DeviceAllocation, cupy's
        `.data.ptr`, an OrtValue's `data_ptr()`) of contiguous data in the input's dtype. `shapes`: the input
        shapes, required where a dim is dynamic. `outputs`: optional caller buffers by name (large enough for the
        output shape); other outputs land in the runner's own buffers, valid until the next call. `stream`: a
        pycuda Stream or a raw cudaStream_t handle (default: the runner's `stream`). Nothing is synchronised:
        the outputs are ready when that stream is, so the next kernel on the same stream can consume them."""
        self._active()
        for name in inputs:
            if name not in self._inputs:
                raise ValueError(f"model '{self.model_path.name}' has no input '{name}'; its inputs are "
                                 f"{tensor_names(self._inputs)}")
        missing = [n for n in self._inputs if n not in inputs]
        if missing:
            raise ValueError(f"input(s) {', '.join(missing)} of model '{self.model_path.name}' are missing; "
                             f"it takes {tensor_names(self._inputs)}")
        for name in outputs or {}:
            if name not in self._outputs:
                raise ValueError(f"model '{self.model_path.name}' has no output '{name}'; its outputs are "
                                 f"{tensor_names(self._outputs)}")
        handle = self._stream.handle if stream is None else int(getattr(stream, "handle", stream))
        ctx = self._context
        with self._lock, self._current():
            for name, meta in self._inputs.items():
                shape = tuple((shapes or {}).get(name) or ())
                if not shape:
                    if any(d is None for d in meta.shape):
                        raise ValueError(f"input '{name}' of '{self.model_path.name}' is {meta}: give its shape in "
                                         f"shapes={{'{name}': (...)}}")
                    shape = tuple(int(d) for d in meta.shape)
                if not ctx.set_input_shape(name, shape):
                    raise ValueError(self._shape_error(name, shape))
                ctx.set_tensor_address(name, int(inputs[name]))
            result = {}
            for name, meta in self._outputs.items():
                given = (outputs or {}).get(name)
                ptr = int(self._dev[name]) if given is None else int(given)
                ctx.set_tensor_address(name, ptr)
                result[name] = DeviceTensor(ptr, tuple(int(d) for d in ctx.get_tensor_shape(name)), meta.dtype)
            if not ctx.execute_async_v3(handle):
                raise RuntimeError(f"TensorRT failed to run '{self.model_path.name}' (see its log above)")
            return result

    # -- checks (the shared ones of runtime.backends, plus the size of this runner's host buffers) ----------------
    def _check(self, name: str, value) -> np.ndarray:
        a = check_input(self.model_path.name, name, self._inputs[name], value)
        if a.size > self._host[name].size:
            raise ValueError(self._shape_error(name, a.shape))
        return a

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


_LOGGER = None


def _logger(trt):
    """One TensorRT logger per process (warnings and errors to stderr): TensorRT keeps the first logger it is given
    and warns when builders and runtimes are made with different ones; it must outlive them all."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def network_flags(trt) -> int:
    """create_network flags: STRONGLY_TYPED where the enum has it (10.x; a deprecated always-on member in 11.x),
    else 0 (a future TensorRT without the member is strongly typed anyway). Never EXPLICIT_BATCH (gone in 11)."""
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def clear_tf32(trt, config) -> bool:
    """Clear BuilderFlag.TF32 (on by default in 10.x and 11.x) so FP32 tensors are computed in FP32, as onnxruntime
    does; where the member is missing there is nothing to clear. Returns whether TF32 is still allowed (meta.json)."""
    flag = getattr(getattr(trt, "BuilderFlag", None), "TF32", None)
    if flag is None:
        return False
    config.clear_flag(flag)
    return bool(config.get_flag(flag))


def _short(e, n: int = 200) -> str:
    return " ".join(str(e).split())[:n]
