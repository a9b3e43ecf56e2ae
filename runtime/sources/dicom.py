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

The header is read into those facts (format checks, display mapping, regions, spacing, frame rate, modality) by
runtime/sources/dicom_header.py; this module opens the file, checks its pixel data and decoder, and decodes frames.

pydicom (and the decoder plugins for compressed data) are imported only when a DICOM file is opened.
"""
from __future__ import annotations

import logging
import os
import re
import struct
import time
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from runtime.sources.base import Frame, Source, SourceError, folder_files, is_dicom, now, opaque_id
from runtime.sources.dicom_header import _Header

log = logging.getLogger(__name__)

DICOM_SUFFIXES = {".dcm", ".dicom"}

INSTALL_HINT = "pip install 'sonoscore[dicom]'"

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


# -- opening a file: its header, pixel data and decoder, checked before any frame is decoded --------------------

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
