"""What each network receives: the input normalization a bundle declares (docs/design.md, "Network inputs").

A manifest's `networks.<unet|vgg>.input` carries, MONAI Bundle `network_data_format` style, `num_channels`,
`value_range` (informational) and `normalization`, one of:

    {"kind": "unit"}                                   x = u * float32(1/255)          (absent: this; old bundles)
    {"kind": "minmax"}                                 per image: (x - min x) / (max x - min x); constant -> 0
    {"kind": "meanstd", "mean": [..], "std": [..]}     per channel c: (x - mean[c]) / std[c]; one value = all

where u is the preprocessed uint8 image (gray, repeated to the network's channels) and x = u * float32(1/255) in
float32 (`runtime.preprocess.to_input`, the "unit" case, bit for bit). Every step is one IEEE float32 operation in
the order written (a subtraction, then a division), so the CPU path (`to_input`), the training code
(`torch_transform`, on the same x) and the device kernels (runtime/gpu/kernels_core.h) give the same bits.
"min x" / "max x" are over the whole image (all channels: gray repeated, so one plane's).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from runtime import preprocess as pp
from runtime.errors import UserError

KINDS = ("unit", "minmax", "meanstd")
UNIT: dict[str, Any] = {"kind": "unit"}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
IMAGENET: dict[str, Any] = {"kind": "meanstd", "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
SCALE = np.float32(1.0 / 255.0)   # x = u * SCALE: the one uint8 -> [0, 1] step (runtime.preprocess.to_input)
CHOICES = "unit, minmax, imagenet or meanstd:MEAN[,MEAN,MEAN]/STD[,STD,STD] (e.g. meanstd:0.5/0.25)"


def parse(text: str, option: str | None = None, channels: int | None = None) -> dict[str, Any]:
    """CLI text -> a normalization dict. "unit", "minmax", "imagenet" (meanstd with ImageNet's mean and std),
    "meanstd:M1,M2,M3/S1,S2,S3" (or one mean and one std for every channel). Bad text, or with `channels` a
    meanstd whose count is neither 1 nor `channels`: UserError, one sentence naming `option` (e.g. "--vgg-input")
    when given."""
    what = f"{option} " if option else "input normalization "
    raw = "" if text is None else str(text).strip()
    low = raw.lower()
    if low in ("unit", "minmax"):
        return {"kind": low}
    if low == "imagenet":
        if channels not in (None, 3):
            raise UserError(f"{what}'{raw}' gives 3 means and stds (one per colour channel) for a {channels}-channel "
                            f"input; give meanstd:MEAN/STD (one value each), e.g. meanstd:0.449/0.226")
        return {"kind": "meanstd", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    bad = f"{what}'{raw}' is not an input normalization; give {CHOICES}"
    kind, sep, values = low.partition(":")
    if kind.strip() != "meanstd" or not sep:
        raise UserError(bad)
    mean_text, slash, std_text = values.partition("/")
    if not slash:
        raise UserError(f"{what}'{raw}' gives no standard deviations; write meanstd:MEAN[,MEAN,MEAN]/STD[,STD,STD] "
                        f"(e.g. meanstd:0.485,0.456,0.406/0.229,0.224,0.225)")
    try:
        mean = [float(v) for v in mean_text.split(",")]
        std = [float(v) for v in std_text.split(",")]
    except ValueError:
        raise UserError(f"{what}'{raw}' holds a value that is not a number; give {CHOICES}") from None
    try:
        return check({"kind": "meanstd", "mean": mean, "std": std}, channels)
    except UserError as e:
        raise UserError(f"{what}'{raw}': {e}") from None


def check(normalization: dict[str, Any] | None, channels: int | None = None, where: str = "") -> dict[str, Any]:
    """The canonical form of a normalization dict (None -> unit), or UserError, one sentence (prefixed by `where`,
    e.g. "networks.vgg.input.normalization: "), when it is not one of the three kinds, a meanstd has a mean and a
    std list of different lengths, a count other than 1 or `channels`, a non-finite value or a std <= 0."""
    if normalization is None:
        return dict(UNIT)
    if not isinstance(normalization, dict) or normalization.get("kind") not in KINDS:
        got = normalization.get("kind") if isinstance(normalization, dict) else normalization
        raise UserError(f"{where}kind {got!r} is not one of {', '.join(KINDS)}")
    kind = normalization["kind"]
    if kind != "meanstd":
        return {"kind": kind}
    mean, std = normalization.get("mean"), normalization.get("std")
    for label, values in (("mean", mean), ("std", std)):
        if not isinstance(values, (list, tuple)) or not values or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise UserError(f"{where}meanstd needs '{label}' as a list of 1 or C finite numbers, got {values!r}")
    if len(mean) != len(std):
        raise UserError(f"{where}meanstd has {len(mean)} mean value(s) but {len(std)} std value(s); give as many "
                        f"of each (1, or one per channel)")
    if min(std) <= 0:
        raise UserError(f"{where}meanstd std values must be above 0, got {list(std)}")
    if channels is not None and len(mean) not in (1, channels):
        raise UserError(f"{where}meanstd has {len(mean)} values per list for a {channels}-channel input; give 1 value"
                        + ("" if channels == 1 else f" or {channels}"))
    return {"kind": "meanstd", "mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def value_range(normalization: dict[str, Any] | None) -> list[float]:
    """[lo, hi] of what the network receives (informational): [0, 1] for unit and minmax, the image of [0, 1]
    under the per-channel mean/std otherwise."""
    n = check(normalization)
    if n["kind"] != "meanstd":
        return [0.0, 1.0]
    lo = min((0.0 - m) / s for m, s in zip(n["mean"], n["std"]))
    hi = max((1.0 - m) / s for m, s in zip(n["mean"], n["std"]))
    return [round(lo, 6), round(hi, 6)]


def input_section(name: str, channels: int, size: int, normalization: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest's whole `input` object for a network: name, shape ["N", C, size, size], dtype float32,
    num_channels, value_range, normalization (checked against the channel count: UserError if it does not fit)."""
    n = check(normalization, int(channels), f"the normalization of the {int(channels)}-channel input '{name}': ")
    return {"name": name, "shape": ["N", int(channels), int(size), int(size)], "dtype": "float32",
            "num_channels": int(channels), "value_range": value_range(n), "normalization": n}


def of_input(section: dict[str, Any] | None) -> dict[str, Any]:
    """The normalization a manifest `input` object declares (absent: unit), canonical but not yet checked against
    the channel count."""
    return check((section or {}).get("normalization"))


def describe(normalization: dict[str, Any] | None) -> str:
    """One line for display, also the CLI text (`parse(describe(n)) == n`): "unit", "minmax", "imagenet" or
    "meanstd:M,../S,..", numbers written as Python writes them."""
    n = check(normalization)
    if n["kind"] != "meanstd":
        return n["kind"]
    if n["mean"] == IMAGENET_MEAN and n["std"] == IMAGENET_STD:
        return "imagenet"
    return "meanstd:" + ",".join(repr(v) for v in n["mean"]) + "/" + ",".join(repr(v) for v in n["std"])


def params(normalization: dict[str, Any] | None, channels: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(kind index into KINDS, mean[channels], std[channels]) as float32: what the device kernel takes. Unit and
    minmax get mean 0, std 1 (unused)."""
    n = check(normalization, channels)
    mean = np.zeros(channels, np.float32)
    std = np.ones(channels, np.float32)
    if n["kind"] == "meanstd":
        mean[:] = np.asarray(n["mean"], np.float64).astype(np.float32)
        std[:] = np.asarray(n["std"], np.float64).astype(np.float32)
    return KINDS.index(n["kind"]), mean, std


def to_input(img: np.ndarray, channels: int = 1, normalization: dict[str, Any] | None = None) -> np.ndarray:
    """uint8 HxW (or NxHxW) -> float32 NCHW, gray repeated to `channels`, normalized as declared. With unit (or
    None) this is runtime.preprocess.to_input bit for bit."""
    n = check(normalization, channels)
    x = pp.to_input(img, channels)
    if n["kind"] == "unit":
        return x
    if n["kind"] == "minmax":
        lo = x.min(axis=(1, 2, 3), keepdims=True)
        span = x.max(axis=(1, 2, 3), keepdims=True) - lo
        out = np.zeros_like(x)
        np.divide(x - lo, span, out=out, where=span > 0)
        return out
    mean = np.asarray(n["mean"], np.float64).astype(np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(n["std"], np.float64).astype(np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def torch_transform(normalization: dict[str, Any] | None) -> Callable:
    """For training code: a callable on a float32 tensor already scaled to [0, 1] (u * float32(1/255), as
    `runtime.preprocess.to_input` and export/train.py make it), [C,H,W] or [B,C,H,W], returning it normalized as
    `to_input` does (the same float32 operations: equal bits on equal input). Unit returns its input."""
    n = check(normalization)
    if n["kind"] == "unit":
        return _identity
    if n["kind"] == "minmax":
        return _minmax
    mean = np.asarray(n["mean"], np.float64).astype(np.float32)
    std = np.asarray(n["std"], np.float64).astype(np.float32)

    def meanstd(x):
        import torch
        m = torch.from_numpy(mean).to(x.device).reshape(-1, 1, 1)
        s = torch.from_numpy(std).to(x.device).reshape(-1, 1, 1)
        return (x - m) / s

    return meanstd


def _identity(x):
    return x


def _minmax(x):
    import torch
    dims = tuple(range(max(0, x.ndim - 3), x.ndim))     # the last three: one image's C, H, W
    lo = x.amin(dim=dims, keepdim=True)
    span = x.amax(dim=dims, keepdim=True) - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))
    return torch.where(span > 0, (x - lo) / safe, torch.zeros_like(x))
