"""What a DICOM file's header says, reduced to what runtime/sources/dicom.py needs and to technical facts (`_Header`):
the pixel format checks, the display mapping of monochrome and palette data (`_display_mapping`, `_palette_table`,
applied to each decoded frame by `_Header.to_display`), the B-mode region and the pixel spacing from the Sequence of
Ultrasound Regions (`_ultrasound_region`, `_ultrasound_regions`, `_pixel_spacing`), the frame rate, and whether
the file is ultrasound. runtime/sources/dicom.py opens the file, checks its pixel data and decoder, and decodes the
frames; its docstring says what a frame becomes. Nothing here names the file in `meta`.
"""
from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from runtime.preprocess import Region
from runtime.sources.base import MAX_PIXELS, SourceError, spacing_meta

# MAX_PIXELS: per frame (the decoded-pixel budget shared by every source); a header can claim anything

# Photometric interpretations this source turns into a frame, and their samples per pixel.
_PHOTOMETRIC_SAMPLES = {
    "MONOCHROME1": 1, "MONOCHROME2": 1, "PALETTE COLOR": 1,
    "RGB": 3, "YBR_FULL": 3, "YBR_FULL_422": 3, "YBR_ICT": 3, "YBR_RCT": 3,
}

# Ultrasound SOP classes (image, multi-frame image, and their retired forms): a file without a Modality is taken
# as ultrasound when its SOP class is one of these.
_US_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.6.1", "1.2.840.10008.5.1.4.1.1.3.1",
                   "1.2.840.10008.5.1.4.1.1.6", "1.2.840.10008.5.1.4.1.1.3"}

# Sequence of Ultrasound Regions codes (PS3.3 C.8.5.5.1).
_SPATIAL_2D = 1
_DATA_TISSUE, _DATA_COLOR_FLOW = 1, 2
_UNITS_CM = 3


# -- the header -------------------------------------------------------------------------------------------------

class _Header:
    """What DicomSource needs from a file's header, read once, checked, and reduced to technical facts."""

    frames: int
    frame_rate: float | None
    region: Region | None
    window: tuple[float, float] | None
    not_ultrasound: str | None  # what the file is, in words, when it is not ultrasound
    meta: dict[str, Any]

    def __init__(self, ds, path: Path):
        name = f"DICOM '{path}'"
        pi = str(ds.get("PhotometricInterpretation", "")).strip().upper()
        spp = _int(ds.get("SamplesPerPixel"), 1)
        rows, cols = _int(ds.get("Rows"), 0), _int(ds.get("Columns"), 0)
        bits_alloc, bits_stored = _int(ds.get("BitsAllocated"), 0), _int(ds.get("BitsStored"), 0)
        bits_stored = bits_stored or bits_alloc
        signed = _int(ds.get("PixelRepresentation"), 0) == 1
        if pi not in _PHOTOMETRIC_SAMPLES:
            raise SourceError(f"{name} has photometric interpretation '{pi or 'none'}', which this runtime does not "
                              f"read; export it as MONOCHROME2, RGB or YBR_FULL")
        if spp != _PHOTOMETRIC_SAMPLES[pi]:
            raise SourceError(f"{name} says {pi} with {spp} samples per pixel, which contradict each other; "
                              f"the file is damaged, re-export it")
        if bits_alloc not in (8, 16) or not 1 <= bits_stored <= bits_alloc:
            raise SourceError(f"{name} has {bits_alloc}-bit pixels ({bits_stored} stored); this runtime reads 8- and "
                              f"16-bit images only, re-export it with 8 or 16 bits")
        if rows < 1 or cols < 1:
            raise SourceError(f"{name} has no image size (Rows/Columns); the file is damaged, re-export it")
        if rows * cols > MAX_PIXELS:
            raise SourceError(f"{name} claims {rows}x{cols} pixels per frame, more than this runtime accepts; "
                              f"check the file")
        frames = _int(ds.get("NumberOfFrames"), 1) if "NumberOfFrames" in ds else 1
        if frames < 1:
            raise SourceError(f"{name} has NumberOfFrames {ds.get('NumberOfFrames')}; the file is damaged, "
                              f"re-export it")
        self.frames = frames
        self.shape = (rows, cols)
        self.frame_rate = _frame_rate(ds)

        # Monochrome display mapping: shift signed data to unsigned, invert MONOCHROME1, window in pixel space.
        self.max_value = (1 << bits_stored) - 1
        self.offset = (1 << (bits_stored - 1)) if signed else 0
        self.narrow = bits_stored <= 8 and bits_alloc == 16  # 8 significant bits in 16: plain uint8 is exact
        self.invert = False
        self.window = None
        self.palette: np.ndarray | None = None
        if spp == 1 and pi != "PALETTE COLOR":
            self.invert, self.window = _display_mapping(ds, pi, bits_stored, signed)
            if bits_alloc == 8 or self.narrow:
                self.window = None  # 8-bit frames are used as they are (runtime.preprocess windows wide data only)
        elif pi == "PALETTE COLOR":
            self.palette = _palette_table(ds, bits_stored, signed, name)

        region, region_spacing = _ultrasound_region(ds, rows, cols)
        self.region = region
        spacing = region_spacing or _pixel_spacing(ds)

        ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        modality = str(ds.get("Modality", "")).strip().upper()
        readable = modality if re.fullmatch(r"[A-Z0-9_]{1,16}", modality) else None
        if modality:
            self.not_ultrasound = (None if modality == "US" else
                                   f"Modality {readable}" if readable else "an unreadable Modality")
        else:
            sop = str(ds.get("SOPClassUID", "")).strip()
            self.not_ultrasound = None if sop in _US_SOP_CLASSES else "no Modality and not an ultrasound SOP class"
        self.meta: dict[str, Any] = {
            "format": "dicom",
            "modality": readable,
            "photometric": pi,
            "bits_allocated": bits_alloc,
            "bits_stored": bits_stored,
            "transfer_syntax": getattr(ts, "name", None) or (str(ts) if ts else None),
            "frames": frames,
            "frame_rate": self.frame_rate,
            "region": None if region is None else (region.x0, region.y0, region.x1, region.y1),
            # (0028,0301): whether text (names, dates) is burned into the pixels; a sink that saves whole frames
            # should look at it (the region itself is normally free of annotations).
            "burned_in_annotation": {"YES": True, "NO": False}.get(str(ds.get("BurnedInAnnotation", "")).upper()),
        }
        if spacing is not None:
            self.meta.update(spacing_meta(*spacing))
        # every region of the Sequence of Ultrasound Regions (empty: none), what runtime/measure.py calibrates from
        self.meta["us_regions"] = _ultrasound_regions(ds, rows, cols)

    def to_display(self, arr: np.ndarray) -> np.ndarray:
        """pydicom's array for one frame -> uint8/uint16 HxW or HxWx3 RGB (see the module docstring)."""
        if arr.shape[:2] != self.shape:
            raise ValueError(f"decoded frame is {arr.shape[1]}x{arr.shape[0]}, the header says "
                             f"{self.shape[1]}x{self.shape[0]}")
        if self.palette is not None:
            idx = arr if self.offset == 0 else arr.astype(np.int32) + self.offset
            return self.palette[np.clip(idx, 0, self.palette.shape[0] - 1)]
        if arr.ndim == 3:  # RGB (converted from YBR by pydicom or the JPEG 2000 decoder)
            return np.ascontiguousarray(arr if arr.dtype in (np.uint8, np.uint16) else arr.astype(np.uint16))
        if self.offset or self.invert:
            # Clipped to the stored range: stray bits above Bits Stored must not wrap around when inverted.
            arr = np.clip(arr.astype(np.int32) + self.offset, 0, self.max_value)
            if self.invert:
                arr = self.max_value - arr
        if self.max_value <= 255 and arr.dtype != np.uint8:  # 8 stored bits in 16 allocated: exact as uint8
            return np.ascontiguousarray(np.clip(arr, 0, 255).astype(np.uint8))
        dtype = np.uint8 if self.max_value <= 255 else np.uint16
        return np.ascontiguousarray(arr.astype(dtype, copy=False))


def _display_mapping(ds, pi: str, bits_stored: int, signed: bool) -> tuple[bool, tuple[float, float] | None]:
    """(invert the pixels?, window (center, width) on the pixels as this source yields them).

    DICOM defines the window on rescaled values v = slope * stored + intercept (PS3.3 C.11.2.1.2); the pixels we
    yield are the stored values, shifted to unsigned when signed, and inverted (M - x) for MONOCHROME1 (whose
    display is inverted) or for a negative slope. Each step is linear, so the window is carried through exactly:
    for v = s*x + c with s > 0, the DICOM linear function of (C, W) on v equals that of
    ((C - c - 0.5)/s + 0.5, (W - 1)/s + 1) on x, and 255 - window(x; C, W) = window(M - x; M + 1 - C, W).
    """
    m = (1 << bits_stored) - 1
    slope = _float(ds.get("RescaleSlope"), 1.0) or 1.0
    intercept = _float(ds.get("RescaleIntercept"), 0.0)
    if signed:  # x_signed = u - 2^(b-1)
        intercept -= slope * (1 << (bits_stored - 1))
    flip = slope < 0
    if flip:  # x = M - x~  =>  v = (-s) x~ + (c + s M)
        intercept += slope * m
        slope = -slope
    invert = flip != (pi == "MONOCHROME1")
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is None or width is None or width <= 0:
        return invert, None
    cx = (center - intercept - 0.5) / slope + 0.5
    wx = (width - 1.0) / slope + 1.0
    if pi == "MONOCHROME1":
        cx = m + 1 - cx
    return invert, (cx, wx)


def _palette_table(ds, bits_stored: int, signed: bool, name: str) -> np.ndarray:
    """RGB uint8 for every possible stored value (indexed by value + offset), from the palette colour LUT.

    16-bit LUT entries are full-scale (v * 256 or v * 257), and `>> 8` maps both exactly back to 8 bit; some
    writers put 8-bit values in 16-bit entries, which the table's maximum (<= 255) tells.
    """
    from pydicom.pixels import apply_color_lut
    lo = -(1 << (bits_stored - 1)) if signed else 0
    dtype = (np.int8 if bits_stored <= 8 else np.int16) if signed else (np.uint8 if bits_stored <= 8 else np.uint16)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            table = apply_color_lut(np.arange(lo, lo + (1 << bits_stored)).astype(dtype), ds)
    except Exception:
        raise SourceError(f"{name} is PALETTE COLOR but its colour lookup table cannot be read; the file is "
                          f"damaged, re-export it as RGB") from None
    table = np.asarray(table).reshape(-1, 3)
    if table.dtype != np.uint8:
        table = table.astype(np.uint16)
        table = table.astype(np.uint8) if table.max() <= 255 else (table >> 8).astype(np.uint8)
    return np.ascontiguousarray(table)


def _ultrasound_region(ds, rows: int, cols: int) -> tuple[Region | None, tuple[float, float] | None]:
    """(B-mode region, its pixel spacing in mm (row, column)) from the Sequence of Ultrasound Regions.

    Candidates are 2D regions of tissue (or, when there is none, of colour flow: B-mode with a colour overlay);
    the largest wins. Region Location Max is inclusive, Region.x1/y1 are exclusive. A region that does not fit
    in the image (the image was resized or cropped after the header was written; one pixel of slack for writers
    that put the exclusive bound) is not trusted: no region, and no spacing from it.
    """
    seq = ds.get("SequenceOfUltrasoundRegions")
    if not seq:
        return None, None
    by_type: dict[int, list[tuple[int, Region, Any]]] = {_DATA_TISSUE: [], _DATA_COLOR_FLOW: []}
    for item in seq:
        if _int(item.get("RegionSpatialFormat"), -1) != _SPATIAL_2D:
            continue
        kind = _int(item.get("RegionDataType"), -1)
        if kind not in by_type:
            continue
        x0, y0 = _int(item.get("RegionLocationMinX0"), -1), _int(item.get("RegionLocationMinY0"), -1)
        x1, y1 = _int(item.get("RegionLocationMaxX1"), -1) + 1, _int(item.get("RegionLocationMaxY1"), -1) + 1
        if not (0 <= x0 < x1 <= cols + 1 and 0 <= y0 < y1 <= rows + 1):
            continue
        region = Region(x0, y0, min(x1, cols), min(y1, rows))
        by_type[kind].append(((region.x1 - region.x0) * (region.y1 - region.y0), region, item))
    candidates = by_type[_DATA_TISSUE] or by_type[_DATA_COLOR_FLOW]
    if not candidates:
        return None, None
    _, region, item = max(candidates, key=lambda c: c[0])  # max keeps the first of equals
    spacing = None
    if (_int(item.get("PhysicalUnitsXDirection"), 0) == _UNITS_CM
            and _int(item.get("PhysicalUnitsYDirection"), 0) == _UNITS_CM):
        dx, dy = _float(item.get("PhysicalDeltaX"), 0.0), _float(item.get("PhysicalDeltaY"), 0.0)
        if dx > 0 and dy > 0:
            spacing = (abs(dy) * 10.0, abs(dx) * 10.0)
    return region, spacing


def _ultrasound_regions(ds, rows: int, cols: int) -> tuple[dict[str, Any], ...]:
    """Every region of the Sequence of Ultrasound Regions whose bounds can be read, in sequence order, as technical
    facts for measurements (`meta["us_regions"]`):

        {"bounds": (x0, y0, x1, y1)  pixels, x1/y1 exclusive (Region Location Max + 1), as written
         "fits": bool                the bounds lie in the image (one pixel of slack, as `_ultrasound_region`)
         "spatial_format": int       Region Spatial Format (1 = 2-D, 2 = M-mode, 3 = spectral, ...; -1 absent)
         "data_type": int            Region Data Type (1 = tissue, 2 = colour flow, ...; -1 absent)
         "units": (x, y)             Physical Units X/Y Direction (3 = cm, 4 = seconds, ...; -1 absent)
         "delta": (dx, dy)           Physical Delta X/Y, in those units per pixel (None absent)}

    Empty when the file has no such sequence."""
    out = []
    for item in ds.get("SequenceOfUltrasoundRegions") or ():
        x0, y0 = _int(item.get("RegionLocationMinX0"), -1), _int(item.get("RegionLocationMinY0"), -1)
        x1, y1 = _int(item.get("RegionLocationMaxX1"), -1) + 1, _int(item.get("RegionLocationMaxY1"), -1) + 1
        if not (0 <= x0 < x1 and 0 <= y0 < y1):
            continue
        out.append({
            "bounds": (x0, y0, x1, y1),
            "fits": x1 <= cols + 1 and y1 <= rows + 1,
            "spatial_format": _int(item.get("RegionSpatialFormat"), -1),
            "data_type": _int(item.get("RegionDataType"), -1),
            "units": (_int(item.get("PhysicalUnitsXDirection"), -1), _int(item.get("PhysicalUnitsYDirection"), -1)),
            "delta": (_first(item.get("PhysicalDeltaX")), _first(item.get("PhysicalDeltaY"))),
        })
    return tuple(out)


def _pixel_spacing(ds) -> tuple[float, float] | None:
    """PixelSpacing (row, column) in mm, when present and sane."""
    ps = ds.get("PixelSpacing")
    try:
        dy, dx = float(ps[0]), float(ps[1])
    except (TypeError, ValueError, IndexError):
        return None
    return (dy, dx) if dy > 0 and dx > 0 and math.isfinite(dy) and math.isfinite(dx) else None


def _frame_rate(ds) -> float | None:
    """Frames per second: CineRate, else 1000 / FrameTime (ms), else RecommendedDisplayFrameRate."""
    for key, convert in (("CineRate", float), ("FrameTime", lambda t: 1000.0 / t),
                         ("RecommendedDisplayFrameRate", float)):
        value = _first(ds.get(key))
        if value is None or value <= 0:
            continue
        rate = convert(value)
        if math.isfinite(rate) and 0 < rate <= 10_000:
            return float(rate)
    return None


def _first(value) -> float | None:
    """The first value of a possibly multi-valued numeric element, as float; None when absent or not a number."""
    if value is None:
        return None
    try:
        if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
            if len(value) == 0:
                return None
            value = value[0]
        x = float(value)
    except (TypeError, ValueError, IndexError):
        return None
    return x if math.isfinite(x) else None


def _int(value, default: int) -> int:
    x = _first(value)
    return int(x) if x is not None else default


def _float(value, default: float) -> float:
    x = _first(value)
    return x if x is not None else default
