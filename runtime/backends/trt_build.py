"""TensorRT engine building, apart from running (`runtime.backends.trt`): an engine from the bundle's ONNX file,
built on the target on first use and kept in the engine cache (`runtime.backends.engine_cache`).

    trt = load_tensorrt()
    spec = EngineSpec(Path("unet.fp16.onnx"), precision="fp16")
    entry = cached_engine(trt, spec, GpuInfo("Orin", (8, 7)))     # CacheEntry: a verified engine file, built on a miss

Importing this module needs neither TensorRT nor pycuda; the `trt` module is passed in by the caller, so the
helpers below are tested with stand-ins on any machine. Building needs a current CUDA context (the runner builds
inside `CudaDevice.current()`).

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
  as docs/design.md requires. (https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/
  tensorrt-10x-to-11x-python-api-reference.html, .../api/migration/tensorrt-10x-to-11x.html)
- DLA (Orin only; Thor has none). 10.x up to 10.7 supports it, so JetPack 6.1/6.2 (TensorRT 10.3) does; 11.0-11.3
  do not; 11.4.1 does again on AGX Orin under JetPack >= 7.2.2, strongly typed, with GPU fallback as in 10.x.
  The builder's `num_DLA_cores` is checked before `default_device_type = DeviceType.DLA`, `DLA_core = n` and
  `set_flag(BuilderFlag.GPU_FALLBACK)`; `OnnxParserFlag.ADJUST_FOR_DLA` is set when the parser has it.
  (https://docs.nvidia.com/deeplearning/tensorrt/11.4.1/api/migration/tensorrt-10x-to-11x-jetson.html,
  .../11.4.1/inference-library/dla-strongly-typed-networks.html, .../dla-runtime-configuration.html)
  DLA has no dynamic dimensions ("the profile's min, max, and opt values must be equal for wildcard dimensions",
  https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/dla-layer-restrictions.html), and with
  GPU_FALLBACK a range would silently move those layers to the GPU: a DLA engine's batch is pinned to its opt
  batch (`engine_cache.profile_batch`).
- TF32. `BuilderFlag.TF32` ("allow computations on FLOAT tensors to use TF32 ... Enabled by default") is in 10.x and
  11.x: it is cleared (`clear_tf32`, when the member exists), so FP32 tensors are computed in FP32 as onnxruntime
  does and an "fp32" engine is FP32, not TF32. (IBuilderConfig / BuilderFlag docs, .../_static/python-api/infer/
  Core/BuilderConfig.html)
- Unchanged in both, used as documented: `OnnxParser.parse_from_file/num_errors/get_error`,
  `create_builder_config`, `set_memory_pool_limit(MemoryPoolType.WORKSPACE, n)`, `create_timing_cache(blob)`,
  `set_timing_cache(cache, ignore_mismatch)`, `get_timing_cache().serialize()`, `create_optimization_profile`,
  `set_shape(name, min, opt, max)`, `add_optimization_profile`, `build_serialized_network`.
"""
from __future__ import annotations

import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import runtime.backends.engine_cache as ec
from runtime.backends.base import BackendUnavailable, TensorMeta, import_optional, short

UNAVAILABLE = ("TensorRT is not installed here: the trt backend runs on a Jetson (JetPack 6.1 or newer) or an x86 "
               "host with NVIDIA's tensorrt wheel; use --backend ort")
MIN_TENSORRT = (10, 3)


# -- TensorRT itself -------------------------------------------------------------------------------------------------
def import_tensorrt():
    """The tensorrt module, or BackendUnavailable: not installed (UNAVAILABLE) or installed but broken."""
    return import_optional("tensorrt", UNAVAILABLE,
                           lambda why: f"TensorRT's Python bindings are installed but fail to import ({why}); "
                                       f"reinstall for this JetPack/CUDA (device/setup.sh), or use --backend ort")


def load_tensorrt():
    """The tensorrt module when it is new enough for this backend, else BackendUnavailable (one sentence)."""
    trt = import_tensorrt()
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


_LOGGER = None


def logger(trt):
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


# -- what to build ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineSpec:
    """Everything an engine is built from besides TensorRT and the GPU: the ONNX file, the precision label (for the
    cache key; the precision itself is in the file), the batch (min, opt, max) of the dynamic batch dim, pins for
    other symbolic dims, the DLA core (None: GPU only) and the builder's workspace limit."""

    model_path: Path
    precision: str = "fp32"
    batch: tuple[int, int, int] = (1, 1, 1)
    dims: dict[str, int] = field(default_factory=dict)
    dla_core: int | None = None
    workspace_bytes: int = 1024 << 20

    @property
    def label(self) -> str:
        return f"{Path(self.model_path).name} ({self.precision})"


def engine_key(trt_version: str, gpu: ec.GpuInfo, spec: EngineSpec) -> dict[str, Any]:
    """The cache key of `spec` built by TensorRT `trt_version` for `gpu` (engine_cache.engine_key)."""
    return ec.engine_key(onnx_sha256=ec.sha256_file(spec.model_path), trt_version=trt_version, gpu=gpu,
                         precision=spec.precision, batch=spec.batch, dims=spec.dims, dla_core=spec.dla_core)


def cached_engine(trt, spec: EngineSpec, gpu: ec.GpuInfo, *, cache_dir: Path | None = None,
                  progress: bool = True) -> ec.CacheEntry:
    """The verified cache entry for `spec` on `gpu`, built now (once across processes) on a miss. A caller that
    cannot load the entry's engine calls `engine_cache.invalidate(entry.directory)` and asks again."""
    root = ec.engines_root(cache_dir)
    return ec.get_or_build(root, engine_key(trt.__version__, gpu, spec), lambda: build_engine(trt, spec, gpu, root),
                           label=spec.label, progress=progress)


def build_engine(trt, spec: EngineSpec, gpu: ec.GpuInfo, root: Path) -> tuple[bytes, dict[str, Any]]:
    """Parse the ONNX strongly typed, set the profile, timing cache (under `root`), FP32 without TF32 and DLA,
    build; the serialized engine and what meta.json records about the build."""
    log = logger(trt)
    name = Path(spec.model_path).name
    builder = trt.Builder(log)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, log)
    if spec.dla_core is not None and hasattr(getattr(trt, "OnnxParserFlag", None), "ADJUST_FOR_DLA"):
        parser.set_flag(trt.OnnxParserFlag.ADJUST_FOR_DLA)
    if not parser.parse_from_file(str(spec.model_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendUnavailable(f"TensorRT {trt.__version__} cannot parse '{name}' ({short(errors, 400)}); use "
                                 f"--backend ort for this model")
    inputs = {}  # only the shapes matter for the profile
    for i in range(network.num_inputs):
        t = network.get_input(i)
        inputs[t.name] = TensorMeta(ec.dims_to_shape(t.shape), np.dtype(np.void))
    try:
        shapes = ec.profile_shapes(inputs, spec.batch, spec.dims)
    except ValueError as e:
        raise BackendUnavailable(f"'{name}': {e}") from None
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_bytes)
    tf32 = clear_tf32(trt, config)
    profile = builder.create_optimization_profile()
    for tensor, (lo, opt, hi) in shapes.items():
        profile.set_shape(tensor, lo, opt, hi)
    config.add_optimization_profile(profile)
    timing_path = ec.timing_cache_path(root, gpu, trt.__version__)
    try:
        blob = ec.read_timing_cache(timing_path)
        cache = config.create_timing_cache(blob) if blob else None
        reused = cache is not None and config.set_timing_cache(cache, False)
    except Exception:  # a damaged file: TensorRT refuses it; timings are only an optimisation
        reused = False
    if not reused:  # none yet, damaged, or from another device/version: start an empty one
        config.set_timing_cache(config.create_timing_cache(b""), False)
    if spec.dla_core is not None:
        cores = int(builder.num_DLA_cores)
        if not 0 <= int(spec.dla_core) < cores:
            raise BackendUnavailable(f"DLA core {spec.dla_core} does not exist here (this device has {cores} DLA "
                                     f"core(s), TensorRT {trt.__version__}); leave the DLA option out to use the GPU")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(spec.dla_core)
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendUnavailable(f"TensorRT {trt.__version__} could not build an engine for '{name}' (see its log "
                                 f"above); use --backend ort")
    ec.write_timing_cache(timing_path, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(plan)), {
        "onnx": name, "profile_shapes": {n: [list(s) for s in v] for n, v in shapes.items()},
        "gpu_slug": gpu.slug, "host": platform.node(),
        "strongly_typed_flag": bool(network_flags(trt)), "tf32": tf32, "workspace_bytes": spec.workspace_bytes}
