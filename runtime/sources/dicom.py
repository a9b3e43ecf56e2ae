"""DICOM files: single- and multi-frame ultrasound (and any other single-plane image), one Frame per frame.

Pixels go through pydicom's own pixel handling (`pydicom.pixels.pixel_array(file, index=i)`), one frame at a time,
so a long cine is never decoded, nor held in memory, all at once. What pydicom returns is turned into what
`runtime.preprocess` expects (uint8/uint16, HxW or HxWx3 RGB):

- YBR_FULL / YBR_FULL_422 are converted to RGB by pydicom (its default); YBR_ICT / YBR_RCT by the JPEG 2000 decoder.
- PALETTE COLOR is mapped through its lookup table (`apply_color_lut`) to RGB, scaled to 8 bit.
- MONOCHROME1 is inverted, so that bright is tissue as everywhere else in the pipeline.
- >8-bit monochrome stays uint16 and `Frame.window` carries Window Center/Width (first value), carried over
  exactly into the stored-value space when the file also has a Rescale Slope/Intercept (the window is defined on
  rescaled values; a rescale is linear, so this is exact). Signed data is shifted to unsigned the same way.
- The B-mode region from the Sequence of Ultrasound Regions (0018,6011) becomes `Frame.region`; without regions
  the pipeline's automatic crop applies.
- Pixel spacing, in the keys every source uses (`runtime.sources.spacing_meta`): `meta["pixel_spacing_rc_mm"]`
  = (row mm, column mm) from that region's PhysicalDeltaY/X (when its units are cm), else from PixelSpacing, and
  `meta["pixel_spacing_mm"]` (one float) only when the pixels are square. `meta["us_regions"]` lists every region
  of the sequence (bounds, type, units, deltas; empty without one): measurements in mm (runtime/measure.py) use
  the region that holds what they measure, and never Pixel Spacing, which does not calibrate ultrasound.

Safety (docs/design.md, "Safety"): nothing identifying leaves this module. `source_id` is an opaque hash of the
path, `meta` holds only technical facts, and per-frame error sentences never name the file (its name may be a
patient's).
Errors when opening are `SourceError` sentences for the user's terminal; a frame that fails to decode is
yielded with `pixels=None` and `error` set, so the results keep one record per frame.

pydicom (and the decoder plugins for compressed data) are imported only when a DICOM file is opened.
"""
from __future__ import annotations

import logging
import math
import os
import re
import struct
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from runtime.preprocess import Region
from runtime.sources.base import (MAX_PIXELS, Frame, Source, SourceError, folder_files, is_dicom, now, opaque_id,
                                  spacing_meta)

log = logging.getLogger(__name__)

DICOM_SUFFIXES = {".dcm", ".dicom"}
# MAX_PIXELS: per frame (the decoded-pixel budget shared by every source); a header can claim anything

INSTALL_HINT = "pip install 'sonoscore[dicom]'"

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

# The decoder packages to name when a compressed transfer syntax has no decoder installed.
_DECODER_PACKAGES = (
    ("JPEG 2000", "pylibjpeg and pylibjpeg-openjpeg"),
    ("JPEG", "python-gdcm"),
    ("RLE", "pylibjpeg and pylibjpeg-rle"),
)



def dicom_files_in(folder: str | os.PathLike) -> list[Path]:
    """The DICOM files of a folder and of its subfolders at any depth, in a folder source's order (by path: a
    folder's files and subfolders in name order; `runtime.sources.base.folder_files`); hidden files and folders,
    links to folders and DICOMDIR are left out."""
    return [p for p in folder_files(Path(folder))[0] if p.name.upper() != "DICOMDIR" and is_dicom(p)]


def open_in_folder(path: Path, n: int, count: int) -> "DicomSource | str":
    """File `n` (from 0) of the `count` DICOM files of a folder, opened as a DicomSource (lossless), or the
    sentence its record carries when it cannot be opened: the refusal names the file, the record must not."""
    try:
        return DicomSource(path, realtime=False, warn_modality=False)
    except SourceError:
        return (f"DICOM file {n + 1} of {count} (in name order) in the folder could not be opened (not an image, "
                f"truncated, or no decoder); open it alone to see why")


def from_path(path: str | os.PathLike, *, realtime: bool | None = None) -> Source:
    """A DICOM file, or a folder of DICOM files (always lossless: `realtime` applies to a file), as a source."""
    path = Path(path)
    if path.is_dir():
        return DicomFolderSource(path)
    return DicomSource(path, realtime=realtime)


def _pydicom():
    try:
        import pydicom
        import pydicom.pixels  # noqa: F401  (the pixel decoders, pydicom >= 3)
    except ImportError:
        raise SourceError(f"reading DICOM needs pydicom 3 and its decoders; install them with {INSTALL_HINT}") from None
    return pydicom


class DicomSource(Source):
    """One DICOM file; one Frame per frame, in order.

    `realtime`: replay a cine at its own frame rate (CineRate, else 1000 / FrameTime, else
    RecommendedDisplayFrameRate). None (the default) means real time for a multi-frame file with a known rate,
    and as fast as possible otherwise. A file is a recording, never a live source: paced or not, the streamer's
    default policy for it is `all` (every frame scored, none dropped).

    A file whose Modality is not US (or, without a Modality, whose SOP class is not an ultrasound one) is read
    all the same, with one warning when it is opened (`warn_modality=False` leaves the warning to the caller).
    """

    def __init__(self, path: str | os.PathLike, *, realtime: bool | None = None, warn_modality: bool = True):
        self.path = Path(path)
        self.source_id = opaque_id(str(self.path.resolve()), "dicom")
        info = _read_header(self.path)
        self.total = info.frames
        self.region = info.region
        self.window = info.window
        self._info = info
        rate = info.frame_rate
        if realtime is None:
            realtime = info.frames > 1 and rate is not None
        if realtime and rate is None:
            raise SourceError(f"DICOM '{path}' has no frame rate (no CineRate, FrameTime or "
                              f"RecommendedDisplayFrameRate), so it cannot be replayed in real time; "
                              f"run it without real-time replay")
        self.fps = float(rate or 0.0)
        self.paced = bool(realtime)
        self.live = False
        self.meta = info.meta
        self.not_ultrasound = info.not_ultrasound  # the file's modality in words, when it is not ultrasound
        if warn_modality and self.not_ultrasound:
            log.warning("DICOM '%s' is not ultrasound (%s); it is graded anyway, but the model was made for "
                        "ultrasound images only", path, self.not_ultrasound)

    def __iter__(self) -> Iterator[Frame]:
        start = time.perf_counter()
        try:
            f = open(self.path, "rb")
        except OSError as e:
            f, open_error = None, (f"DICOM frame could not be read: the file can no longer be opened "
                                     f"({e.strerror or type(e).__name__})")
        try:
            for i in range(self.total):
                if f is None:
                    pixels, error = None, open_error
                else:
                    pixels, error = self._decode(f, i)
                if self.paced and self.fps > 0:  # paced like a scanner: frame i is due at start + i / fps
                    delay = start + i / self.fps - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                wide = pixels is not None and pixels.dtype != np.uint8
                yield Frame(i, self.source_id, now(), pixels, channel_order="RGB",
                            window=self.window if wide else None, region=self.region, error=error,
                            meta=dict(self.meta), source_file=self.path.name, frame_in_file=i)
        finally:
            if f is not None:
                f.close()

    def _decode(self, f, index: int) -> tuple[np.ndarray | None, str | None]:
        """(display-ready pixels, None) or (None, one sentence). Never raises for bad data."""
        from pydicom.pixels import pixel_array
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom's notes on odd headers are not the user's business here
                arr = pixel_array(f, index=index)  # YBR_FULL(_422) -> RGB is pydicom's default
            return self._info.to_display(arr), None
        except Exception as e:  # any decoder failure becomes this frame's error, never a traceback
            return None, (f"DICOM frame {index} of {self.total} could not be decoded ({self._reason(e)}); "
                          f"the file's data for this frame is damaged, re-export the study")

    def _reason(self, e: Exception) -> str:
        """The decoder's own words, shortened, with the file's path and name removed (they may name a patient)."""
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        text = lines[0]
        if len(lines) > 1 and text.endswith(":"):
            # "Unable to decode as exceptions were raised by all available plugins:" then "<plugin>: <why>" lines
            text = re.sub(r"^[\w-]+:\s*", "", lines[1])
        for s in (str(self.path.resolve()), str(self.path), self.path.name):
            text = text.replace(s, "<file>")
        text = text.rstrip(".").replace(". ", "; ")  # one sentence, whatever the decoder wrote
        if len(text) > 1 and text[0].isupper() and text[1].islower():
            text = text[0].lower() + text[1:]
        return text if len(text) <= 160 else text[:157] + "..."


class DicomFolderSource(Source):
    """The DICOM files of a folder and its subfolders (`dicom_files_in`: by path), frame after frame, numbered continuously; lossless. Each frame
    knows its file (relative to the folder) and its number inside that file (`Frame.source_file`, `frame_in_file`),
    which only `run --record-paths` writes.

    A file that cannot be opened still gets one frame (with its error), so the results account for every file.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.files = dicom_files_in(self.folder)
        if not self.files:
            raise SourceError(f"folder '{folder}' has no DICOM files (none with the DICM preamble); "
                              f"give a folder of DICOM images or a single file")
        self.source_id = opaque_id(str(self.folder.resolve()), "dicom")
        self._sources: list[DicomSource | str] = [open_in_folder(p, n, len(self.files))
                                                  for n, p in enumerate(self.files)]
        self.total = sum(s.total if isinstance(s, DicomSource) else 1 for s in self._sources)
        other = [s.not_ultrasound for s in self._sources if isinstance(s, DicomSource) and s.not_ultrasound]
        if other:  # once for the folder, naming no file (a file's name may be a patient's)
            log.warning("folder '%s' has %d DICOM file(s) of %d that are not ultrasound (%s); they are graded "
                        "anyway, but the model was made for ultrasound images only",
                        folder, len(other), len(self.files), ", ".join(sorted(set(other))))

    def __iter__(self) -> Iterator[Frame]:
        index = 0
        for path, s in zip(self.files, self._sources):
            name = path.relative_to(self.folder).as_posix()     # the path on disk, never a UID from inside it
            if isinstance(s, str):
                yield Frame(index, self.source_id, now(), None, error=s, source_file=name, frame_in_file=0)
                index += 1
                continue
            for frame in s:
                frame.index, frame.source_id, frame.source_file = index, self.source_id, name
                yield frame
                index += 1


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


def _read_header(path: Path) -> _Header:
    """Open, check and describe a DICOM file; every way it can fail is one SourceError sentence."""
    name = f"DICOM '{path}'"
    if not path.exists():
        raise SourceError(f"{name} does not exist; give an existing .dcm file")
    if not path.is_file():
        raise SourceError(f"{name} is not a file; give a .dcm file (or a folder of them)")
    if not is_dicom(path):
        raise SourceError(f"'{path}' is not a DICOM file (it lacks the 128-byte preamble and 'DICM' marker); "
                          f"give a DICOM Part 10 file, or an image or video file")
    pydicom = _pydicom()
    from pydicom.pixels import get_decoder
    from pydicom.uid import DeflatedExplicitVRLittleEndian
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
            pixel = None
            if ts is not None and ts != DeflatedExplicitVRLittleEndian:
                # dcmread stopped with the file at the Pixel Data element's tag (or at the end when there is none)
                pixel = _scan_pixel_data(f, f.tell(), os.fstat(f.fileno()).st_size, *_encoding(ds))
    except Exception:
        raise SourceError(f"{name} cannot be parsed (its header is damaged or the file is truncated); "
                          f"re-copy or re-export it") from None
    if ts is None:
        raise SourceError(f"{name} has no transfer syntax in its file meta; the file is damaged, re-export it")
    if ts == DeflatedExplicitVRLittleEndian:
        raise SourceError(f"{name} is deflate-compressed as a whole, which this runtime does not read; "
                          f"re-export it uncompressed")
    if pixel is None:
        raise SourceError(f"{name} has no pixel data (it is not an image but, say, a report, or it is truncated); "
                          f"give a DICOM image")
    status, length, fragments = pixel
    if status == "truncated":
        raise SourceError(f"{name} is truncated (the file ends inside its pixel data); re-copy or re-export it")
    if status != "ok":
        raise SourceError(f"{name} has damaged pixel data ({status}); re-export it")
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise SourceError(f"{name} stores its pixels as {ts.name}, which this runtime cannot decode; export the "
                          f"study as uncompressed, RLE, JPEG or JPEG 2000 DICOM") from None
    if not decoder.is_available:
        packages = next((pkgs for key, pkgs in _DECODER_PACKAGES if key in ts.name), "pylibjpeg")
        raise SourceError(f"{name} is compressed as {ts.name} and no decoder for it is installed; install "
                          f"{packages} ({INSTALL_HINT} brings every decoder)")

    header = _Header(ds, path)
    if length is not None:  # native pixel data: the whole cine must be there
        from pydicom.pixels.utils import get_expected_length
        try:
            expected = get_expected_length(ds, "bytes")
        except Exception:
            expected = 0
        if length < expected:
            raise SourceError(f"{name} holds {length} bytes of pixel data where its header needs {expected} "
                              f"(truncated or damaged); re-copy or re-export it")
    elif fragments is not None and fragments < header.frames:
        raise SourceError(f"{name} holds {fragments} compressed fragments for {header.frames} frames "
                          f"(truncated or damaged); re-copy or re-export it")
    return header


def _encoding(ds) -> tuple[bool, bool]:
    """(little endian?, implicit VR?) of the dataset as it is stored."""
    implicit, little = ds.original_encoding
    return bool(little), bool(implicit)


def _scan_pixel_data(f, at: int, size: int, little: bool, implicit: bool) -> tuple[str, int | None, int | None] | None:
    """Check the Pixel Data element at offset `at` without reading it: None when there is none, else
    (status, native length or None, number of compressed fragments or None); status is "ok", "truncated" or what
    is wrong. Encapsulated data is walked item by item (a seek each), so this is cheap for any cine."""
    e = "<" if little else ">"
    f.seek(at)
    head = f.read(8)
    if len(head) < 8:
        return None
    group, elem = struct.unpack(f"{e}HH", head[:4])
    if (group, elem) != (0x7FE0, 0x0010):
        if group == 0x7FE0:
            return "float pixel data, which is not an ultrasound image", None, None
        return None
    if implicit:
        length = struct.unpack(f"{e}L", head[4:8])[0]
    else:
        more = f.read(4)
        if len(more) < 4:
            return "truncated", None, None
        length = struct.unpack(f"{e}L", more)[0]
    start = f.tell()
    if length != 0xFFFFFFFF:  # native
        return ("truncated" if start + length > size else "ok"), length, None
    items = 0
    while True:  # encapsulated: Basic Offset Table item, fragment items, sequence delimiter
        tag = f.read(8)
        if len(tag) < 8:
            return "truncated", None, None
        group, elem, n = struct.unpack(f"{e}HHL", tag)
        if (group, elem) == (0xFFFE, 0xE0DD):
            return "ok", None, max(0, items - 1)
        if (group, elem) != (0xFFFE, 0xE000) or n == 0xFFFFFFFF:
            return "unexpected data between its compressed fragments", None, None
        if f.tell() + n > size:
            return "truncated", None, None
        f.seek(n, os.SEEK_CUR)
        items += 1


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
