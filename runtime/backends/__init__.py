"""Inference backends, one module each (`ort`, `trt`), all with the runner interface of Polygraphy:

    with make_runner("ort", "unet.onnx") as runner:
        runner.inputs                      # {"image": TensorMeta(shape=("batch", 1, 224, 224), dtype=float32)}
        out = runner.infer({"image": x})   # {"mask": array}
        dev = runner.infer_device({"image": d_ptr})   # GPU runners: device addresses in, DeviceTensors out

A backend module is imported only when asked for, so a missing TensorRT or onnxruntime-gpu costs one sentence
(BackendUnavailable), not an ImportError at start-up.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BACKENDS = ("ort", "trt")


class BackendUnavailable(RuntimeError):
    """The backend or execution provider asked for cannot run in this install; the message says why."""


@dataclass(frozen=True)
class TensorMeta:
    """A model input or output: dims are ints, or None / a symbol name (str) where the model leaves them free."""

    shape: tuple[int | str | None, ...]
    dtype: np.dtype

    def __str__(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{np.dtype(self.dtype).name}[{dims}]"


@dataclass(frozen=True)
class DeviceTensor:
    """An output left on the GPU by infer_device: `ptr` is a CUDA device address of `shape` x `dtype`."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def tensor_names(metas: dict[str, "TensorMeta"]) -> str:
    return ", ".join(f"'{n}' {m}" for n, m in metas.items())


def check_names(model: str, inputs: dict[str, "TensorMeta"], outputs: dict[str, "TensorMeta"], feeds,
                wanted: list[str] | None) -> list[str]:
    """Every runner's name checks, with the same sentences: each input fed, nothing unknown fed or asked for.
    Returns the outputs to produce (all when `wanted` is None)."""
    for name in feeds:
        if name not in inputs:
            raise ValueError(f"model '{model}' has no input '{name}'; its inputs are {tensor_names(inputs)}")
    for name in inputs:
        if name not in feeds:
            raise ValueError(f"input '{name}' of model '{model}' is missing from the feeds; "
                             f"it takes {tensor_names(inputs)}")
    out = list(outputs) if wanted is None else list(wanted)
    for name in out:
        if name not in outputs:
            raise ValueError(f"model '{model}' has no output '{name}'; its outputs are {tensor_names(outputs)}")
    return out


def check_input(model: str, name: str, meta: "TensorMeta", value):
    """A feed as the model takes it: cast between float widths (or to a wider int); refuse any other dtype and a
    shape that contradicts a fixed dimension. Returns a C-contiguous array."""
    import numpy as np
    a = np.asarray(value)
    if a.dtype != meta.dtype:
        both_float = a.dtype.kind == "f" and meta.dtype.kind == "f"
        widening_int = a.dtype.kind in "iu" and meta.dtype.kind in "iu" and np.can_cast(a.dtype, meta.dtype)
        if not (both_float or widening_int):
            raise TypeError(f"input '{name}' of model '{model}' must be {meta.dtype}, got "
                            f"{a.dtype}; convert it first (images: uint8 / 255 as float32)")
        a = a.astype(meta.dtype)
    if a.ndim != len(meta.shape) or any(isinstance(d, int) and d != n for d, n in zip(meta.shape, a.shape)):
        raise ValueError(f"input '{name}' of model '{model}' has shape {a.shape}, but the model takes {meta}")
    return np.ascontiguousarray(a)


def check_device_names(model: str, inputs: dict[str, "TensorMeta"], outputs: dict[str, "TensorMeta"],
                       addresses: dict, buffers: dict | None) -> None:
    """infer_device's name checks: every input given an address, nothing unknown given, caller buffers only for
    outputs the model has. Same sentences as `check_names`."""
    for name in addresses:
        if name not in inputs:
            raise ValueError(f"model '{model}' has no input '{name}'; its inputs are {tensor_names(inputs)}")
    missing = [n for n in inputs if n not in addresses]
    if missing:
        raise ValueError(f"input(s) {', '.join(missing)} of model '{model}' are missing; it takes "
                         f"{tensor_names(inputs)}")
    for name in buffers or {}:
        if name not in outputs:
            raise ValueError(f"model '{model}' has no output '{name}'; its outputs are {tensor_names(outputs)}")


def stream_handle(stream) -> int | None:
    """A CUDA stream as the integer cudaStream_t: a pycuda Stream (`.handle`), a cupy/torch stream (`.ptr`,
    `.cuda_stream`) or the integer itself; None stays None."""
    if stream is None:
        return None
    for attr in ("handle", "ptr", "cuda_stream"):
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    return int(stream)


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
