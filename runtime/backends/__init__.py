"""Inference backends, one module each (`ort`, `trt`), all with the runner interface of Polygraphy:

    with make_runner("ort", "unet.onnx") as runner:
        runner.inputs                      # {"image": TensorMeta(shape=("batch", 1, 224, 224), dtype=float32)}
        out = runner.infer({"image": x})   # {"mask": array}
        dev = runner.infer_device({"image": d_ptr})   # GPU runners: device addresses in, DeviceTensors out

A backend module is imported only when asked for, so a missing TensorRT or onnxruntime-gpu costs one sentence
(BackendUnavailable), not an ImportError at start-up.

Layout: `base` (BaseRunner: lifetime guard and feed checks; TensorMeta, DeviceTensor, BackendUnavailable), `ort`
and `trt` (the runners), `trt_build` (TensorRT engine building) over `engine_cache` (the cache, no TensorRT
needed), `cuda` (the CUDA device/primary-context helper shared with runtime.gpu). This module only re-exports and
picks a backend (`make_runner`, `available_backends`).
"""
from __future__ import annotations

import importlib
from pathlib import Path

# Re-exported: the runner interface and its errors live in `base`, which every backend module imports (never this
# package), so importing a backend does not import this registry back.
from runtime.backends.base import (BackendUnavailable, BaseRunner, DeviceTensor, TensorMeta, check_device_names,
                                   check_input, check_names, check_shape, stream_handle, tensor_names)

BACKENDS = ("ort", "trt")
__all__ = ["BACKENDS", "BackendUnavailable", "BaseRunner", "DeviceTensor", "TensorMeta", "available_backends",
           "check_device_names", "check_input", "check_names", "check_shape", "make_runner", "stream_handle",
           "tensor_names"]


def make_runner(backend: str, model_path: Path, **options):
    """A runner (not yet entered) for `model_path` on `backend` ("ort" or "trt")."""
    if backend == "ort":
        from runtime.backends.ort import OrtRunner
        return OrtRunner(model_path, **options)
    if backend == "trt":
        return _trt_module().TrtRunner(model_path, **options)
    raise BackendUnavailable(f"backend '{backend}' is unknown; use one of {', '.join(BACKENDS)}")


def _trt_module():
    try:
        return importlib.import_module("runtime.backends.trt")
    except ImportError as e:
        missing = "" if e.name == "runtime.backends.trt" else f" ({e.name or e} is missing)"
        raise BackendUnavailable(f"the TensorRT backend needs TensorRT's Python bindings (from JetPack or NVIDIA's "
                                 f"package index) and is not available in this install{missing}; use --backend ort"
                                 ) from None


def available_backends() -> dict[str, str]:
    """What can run here, for `sonoscore doctor`: backend or provider -> "ok" or the reason it cannot run."""
    report: dict[str, str] = {}
    try:
        from runtime.backends.ort import provider_status
        report["ort"] = "ok"
        report.update({f"ort:{name}": status for name, status in provider_status().items()})
    except ImportError as e:
        report["ort"] = f"onnxruntime is not importable ({e}); install it with: pip install onnxruntime"
    try:
        st = _trt_module().trt_status()
    except BackendUnavailable as e:
        report["trt"] = str(e)
    else:
        report["trt"] = "ok" if st["available"] else st["reason"]
        report["trt:tensorrt"] = str(st["tensorrt"])
        report["trt:pycuda"] = str(st["pycuda"])
        if isinstance(st.get("gpus"), list):
            for g in st["gpus"]:
                report[f"trt:gpu{g['index']}"] = (f"{g['name']} (compute {g['compute_capability']}, "
                                                  f"{g['memory_mb']} MiB)")
        elif "gpus" in st:
            report["trt:gpus"] = str(st["gpus"])
        if "dla_cores" in st:
            report["trt:dla_cores"] = str(st["dla_cores"])
    return report
