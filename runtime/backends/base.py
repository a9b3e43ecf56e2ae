"""What every runner shares, in the shape of Polygraphy's `BaseRunner` (polygraphy/backend/base/runner.py):

    class MyRunner(BaseRunner):
        def activate_impl(self):              # load the model; fill self._inputs / self._outputs (TensorMeta by name)
        def deactivate_impl(self):            # release it (also after a failed activate_impl: cope with partial state)
        def infer_impl(self, arrays, wanted):                          # feeds checked: names, dtypes, shapes
        def infer_device_impl(self, addresses, shapes, buffers, stream):   # optional; names checked, stream an int

The lifetime is `with runner:` (`activate()` / `deactivate()`); the guard (no inference outside it, no second
activation) and every check of what a caller feeds live here once, each failure one sentence naming the tensor.
This module imports nothing from its package, so the backend modules (`ort`, `trt`, `trt_build`, `engine_cache`,
`cuda`) import it without pulling in `runtime.backends.__init__`'s registry, and the registry imports them only
when asked for.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


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


def short(e, n: int = 200) -> str:
    """An error (or any text) on one line, at most `n` characters: for the parenthesis of a one-sentence error."""
    return " ".join(str(e).split())[:n]


def import_optional(module: str, missing: str, broken: Callable[[str], str]):
    """`module`, or BackendUnavailable: `missing` when its package is not installed, `broken(reason)` when it is
    installed but fails to import (e.g. built for another CUDA: a shared library not found)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == module.split(".")[0]:
            raise BackendUnavailable(missing) from None
        raise BackendUnavailable(broken(short(e))) from None


def tensor_names(metas: dict[str, TensorMeta]) -> str:
    return ", ".join(f"'{n}' {m}" for n, m in metas.items())


def check_names(model: str, inputs: dict[str, TensorMeta], outputs: dict[str, TensorMeta], feeds,
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


def check_shape(model: str, name: str, meta: TensorMeta, shape) -> tuple[int, ...]:
    """`shape` when it has the input's rank and agrees with every fixed dimension, else one sentence."""
    shape = tuple(int(d) for d in shape)
    if len(shape) != len(meta.shape) or any(isinstance(d, int) and d != n for d, n in zip(meta.shape, shape)):
        raise ValueError(f"input '{name}' of model '{model}' has shape {shape}, but the model takes {meta}")
    return shape


def check_input(model: str, name: str, meta: TensorMeta, value) -> np.ndarray:
    """A feed as the model takes it: cast between float widths (or to a wider int); refuse any other dtype and a
    shape that contradicts a fixed dimension. Returns a C-contiguous array."""
    a = np.asarray(value)
    if a.dtype != meta.dtype:
        both_float = a.dtype.kind == "f" and meta.dtype.kind == "f"
        widening_int = a.dtype.kind in "iu" and meta.dtype.kind in "iu" and np.can_cast(a.dtype, meta.dtype)
        if not (both_float or widening_int):
            raise TypeError(f"input '{name}' of model '{model}' must be {meta.dtype}, got "
                            f"{a.dtype}; convert it first (images: uint8 / 255 as float32)")
        a = a.astype(meta.dtype)
    check_shape(model, name, meta, a.shape)
    return np.ascontiguousarray(a)


def check_device_names(model: str, inputs: dict[str, TensorMeta], outputs: dict[str, TensorMeta],
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


class BaseRunner:
    """A model as a runner: `inputs` / `outputs` metadata by tensor name, `infer(feeds)` -> outputs by name, and
    (where the backend has a device path) `infer_device(addresses)` -> DeviceTensors. Subclasses fill in the
    `*_impl` methods; the lifetime guard and the checks of what the caller passes are done here, once."""

    def __init__(self, model_path: Path):
        self.model_path = Path(model_path)
        self.is_active = False
        self._inputs: dict[str, TensorMeta] = {}
        self._outputs: dict[str, TensorMeta] = {}

    # -- lifetime --------------------------------------------------------------------------------------------------
    def __enter__(self):
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def activate(self) -> None:
        """Load the model (activate_impl). Refused on an active runner; a failed activate_impl is undone by
        deactivate_impl before the error propagates, so the runner is then inactive and may be entered again."""
        if self.is_active:
            raise RuntimeError(f"{type(self).__name__} for '{self.model_path.name}' is already active; enter it once")
        try:
            self.activate_impl()
        except BaseException:
            self._inputs, self._outputs = {}, {}
            self.deactivate_impl()
            raise
        self.is_active = True

    def deactivate(self) -> None:
        """Release the model (deactivate_impl); nothing to do on an inactive runner."""
        if not self.is_active:
            return
        try:
            self.deactivate_impl()
        finally:
            self.is_active = False

    def check_active(self) -> None:
        """The guard of everything that needs the model: one sentence saying how to enter the runner."""
        if not self.is_active:
            name = type(self).__name__
            raise RuntimeError(f"{name} for '{self.model_path.name}' is not active; use it inside "
                               f"`with {name}(...) as runner:`")

    # -- metadata --------------------------------------------------------------------------------------------------
    @property
    def inputs(self) -> dict[str, TensorMeta]:
        self.check_active()
        return dict(self._inputs)

    @property
    def outputs(self) -> dict[str, TensorMeta]:
        self.check_active()
        return dict(self._outputs)

    # -- inference -------------------------------------------------------------------------------------------------
    def infer(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run the model on host arrays `feeds` (every input, by name); return `outputs` (default: all) by name.

        Checked here before the backend sees anything: the runner is active, every input is fed and nothing
        unknown is fed or asked for, each feed's dtype (float widths and widening ints are cast) and shape."""
        self.check_active()
        model = self.model_path.name
        wanted = check_names(model, self._inputs, self._outputs, feeds, outputs)
        arrays = {name: check_input(model, name, self._inputs[name], value) for name, value in feeds.items()}
        return self.infer_impl(arrays, wanted)

    def infer_device(self, inputs: dict[str, int], shapes: dict[str, tuple[int, ...]] | None = None,
                     outputs: dict[str, int] | None = None, stream=None) -> dict[str, DeviceTensor]:
        """Run on device buffers: tensor name -> device address in, DeviceTensors out (see the backend for where
        its outputs live and which stream it computes on).

        Checked here: the runner is active, every input has an address and nothing unknown is given, caller
        buffers only for outputs the model has, `shapes` only for inputs and each agreeing with the input's rank
        and fixed dims. The stream reaches infer_device_impl as the integer cudaStream_t (or None)."""
        self.check_active()
        model = self.model_path.name
        check_device_names(model, self._inputs, self._outputs, inputs, outputs)
        checked = {}
        for name, shape in (shapes or {}).items():
            if shape is None:   # as if not given
                continue
            if name not in self._inputs:
                raise ValueError(f"model '{model}' has no input '{name}' (given in shapes=); its inputs are "
                                 f"{tensor_names(self._inputs)}")
            checked[name] = check_shape(model, name, self._inputs[name], shape)
        return self.infer_device_impl(dict(inputs), checked, dict(outputs or {}), stream_handle(stream))

    # -- what a backend fills in -----------------------------------------------------------------------------------
    def activate_impl(self) -> None:
        """Load the model and set `self._inputs` / `self._outputs`."""
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        """Release what activate_impl made (possibly only part of it, after a failure)."""
        raise NotImplementedError

    def infer_impl(self, arrays: dict[str, np.ndarray], wanted: list[str]) -> dict[str, np.ndarray]:
        """`arrays`: every input, checked and C-contiguous in its dtype; `wanted`: the output names to return."""
        raise NotImplementedError

    def infer_device_impl(self, addresses: dict[str, int], shapes: dict[str, tuple[int, ...]],
                          buffers: dict[str, int], stream: int | None) -> dict[str, DeviceTensor]:
        raise BackendUnavailable(f"{type(self).__name__} has no device path; use infer() with host arrays")
