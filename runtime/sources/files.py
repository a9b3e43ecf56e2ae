"""Image files, folders of images, and video files."""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from runtime.sources.base import (IMAGE_SUFFIXES, MAX_PIXELS, Frame, Source, SourceError, folder_files, is_dicom, now,
                                  opaque_id)

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".wmv"}
FORMATS = "PNG, JPEG, BMP, TIFF, WebP or PGM/PPM"
# The decoded-pixel budget (runtime.sources.MAX_PIXELS): every image's size is read from its header and checked
# before OpenCV decodes it; a format whose header this module cannot read is not decoded at all.

# Decoder warnings ("PNG input buffer is incomplete") are replaced by our own one-sentence frame errors.
if hasattr(cv2, "utils") and hasattr(cv2.utils, "logging"):
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def read_image(path: Path, label: str = "the image") -> tuple[np.ndarray | None, str | None]:
    """(pixels, None) or (None, one-sentence error). Colour comes back in BGR order (OpenCV's).

    The error names the frame by `label` (say, "image 17 of 40 in the folder"), never by the file's name, which may
    carry a patient's name."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        why = (e.strerror or type(e).__name__).lower()
        return None, f"{label} cannot be read ({why}); check the file's permissions"
    if data.size == 0:
        return None, f"{label} is an empty file; re-export or re-copy the image"
    size = image_size(data)
    if size is None:
        return None, (f"{label} is not an image this runtime reads (not {FORMATS}, or its header is damaged); "
                      f"re-export it as PNG or JPEG")
    w, h = size
    if w <= 0 or h <= 0:
        return None, f"{label} has no pixels ({w}x{h} in its header); re-export it"
    if w * h > MAX_PIXELS:
        return None, (f"{label} claims {w}x{h} pixels, more than this runtime decodes ({MAX_PIXELS // 1_000_000} "
                      f"megapixels); check the file, or downscale it")
    try:
        img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error:
        img = None
    if img is None:
        return None, (f"{label} is not a decodable image (truncated, corrupt or not an image format); "
                      f"re-export it as PNG or JPEG")
    if img.size == 0:
        return None, f"{label} has no pixels; re-export it"
    return img, None


def image_size(data) -> tuple[int, int] | None:
    """(width, height) from the header of a PNG, JPEG, BMP, TIFF (first page), WebP or PNM (PBM/PGM/PPM) file;
    None for anything else or a header that cannot be read. Reads the header only, so a lying header is refused
    before any pixel is allocated (OpenCV itself allows 2^30 pixels unless OPENCV_IO_MAX_IMAGE_PIXELS was set
    before it was imported)."""
    b = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    try:
        if b[:8] == b"\x89PNG\r\n\x1a\n":
            if len(b) < 24 or b[12:16] != b"IHDR":
                return None
            return _be(b, 16, 4), _be(b, 20, 4)
        if b[:2] == b"\xff\xd8":
            return _jpeg_size(b)
        if b[:2] == b"BM":
            return _bmp_size(b)
        if b[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
            return _tiff_size(b)
        if b[:4] == b"RIFF" and b[8:12] == b"WEBP":
            return _webp_size(b)
        if len(b) > 2 and b[0] == ord("P") and chr(b[1]) in "123456" and chr(b[2]) in " \t\r\n#":
            return _pnm_size(b)
    except (IndexError, ValueError, struct.error):
        return None
    return None


def _be(b, at: int, n: int) -> int:
    if at + n > len(b):
        raise IndexError
    return int.from_bytes(bytes(b[at:at + n]), "big")


def _le(b, at: int, n: int) -> int:
    if at + n > len(b):
        raise IndexError
    return int.from_bytes(bytes(b[at:at + n]), "little")


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(b) -> tuple[int, int] | None:
    """The first start-of-frame segment's size (what libjpeg allocates for); a height of 0 (set later by a DNL
    marker, which OpenCV does not read) is refused."""
    i = 2
    while i + 4 <= len(b):
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:           # fill byte
            i += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = _be(b, i + 2, 2)
        if marker in _SOF:
            h, w = _be(b, i + 5, 2), _be(b, i + 7, 2)
            return (w, h) if h else None
        if marker in (0xD9, 0xDA) or length < 2:   # end of image, or scan data before any frame header
            return None
        i += 2 + length
    return None


def _bmp_size(b) -> tuple[int, int] | None:
    header = _le(b, 14, 4)
    if header == 12:                 # BITMAPCOREHEADER
        return _le(b, 18, 2), _le(b, 20, 2)
    if header < 40:
        return None
    w = int.from_bytes(bytes(b[18:22]), "little", signed=True)
    h = int.from_bytes(bytes(b[22:26]), "little", signed=True)
    return w, abs(h)


def _tiff_size(b) -> tuple[int, int] | None:
    """ImageWidth (256) and ImageLength (257) of the first directory (the page OpenCV decodes); BigTIFF too."""
    rd = _le if b[:2] == b"II" else _be
    big = rd(b, 2, 2) == 43
    if big:
        at, count_size, entry_size, value_at = rd(b, 8, 8), 8, 20, 12
    else:
        at, count_size, entry_size, value_at = rd(b, 4, 4), 2, 12, 8
    count = rd(b, at, count_size)
    size = {}
    for k in range(min(count, 4096)):
        e = at + count_size + k * entry_size
        tag, kind = rd(b, e, 2), rd(b, e + 2, 2)
        if tag in (256, 257):
            n = {3: 2, 4: 4, 16: 8}.get(kind)
            if n is None:
                return None
            size[tag] = rd(b, e + value_at, n)
    if 256 not in size or 257 not in size:
        return None
    return size[256], size[257]


def _webp_size(b) -> tuple[int, int] | None:
    chunk = bytes(b[12:16])
    if chunk == b"VP8 ":             # lossy: 3-byte frame tag, start code 9d 01 2a, 14-bit sizes
        if bytes(b[23:26]) != b"\x9d\x01\x2a":
            return None
        return _le(b, 26, 2) & 0x3FFF, _le(b, 28, 2) & 0x3FFF
    if chunk == b"VP8L":             # lossless: signature 0x2f, then 14-bit width-1 and height-1
        if b[20] != 0x2F:
            return None
        bits = _le(b, 21, 4)
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":             # extended: 24-bit canvas width-1 and height-1
        return _le(b, 24, 3) + 1, _le(b, 27, 3) + 1
    return None


def _pnm_size(b) -> tuple[int, int] | None:
    head = bytes(b[:1024])
    tokens: list[bytes] = []
    for line in head.split(b"\n"):
        tokens += line.split(b"#", 1)[0].split()
        if len(tokens) >= 3:
            break
    if len(tokens) < 3 or not (tokens[1].isdigit() and tokens[2].isdigit()):
        return None
    return int(tokens[1]), int(tokens[2])


class FolderSource(Source):
    """Every file of a folder and of its subfolders (sorted by path, folder by folder: a folder's files and
    subfolders in name order), or one file; lossless, one frame per image file. A DICOM file at any depth (the DICM
    preamble; DICOMDIR left out) is read as a DICOM source (`runtime.sources.dicom.DicomSource`, its region,
    window and burned-in-text rule): each of its frames in turn, numbered on with the others.

    Files that are neither still get a frame (with an error), so the results keep one record per input.
    Hidden files and hidden folders are skipped, links to folders are not followed, and so are annotations beside
    their images: `X.json` when an image `X.png` (any image suffix) is in the same folder, the labelme layout of
    `sonoscore sim` datasets (`annotations` counts them). A folder holding nothing but such annotations is refused
    in one sentence. Each frame knows its file relative to the folder (`Frame.source_file`, and its number inside
    it, `frame_in_file`: 0 for an image), which only `run --record-paths` writes.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.annotations = 0
        self._folder = self.path.is_dir()
        if self._folder:
            self.files, self.annotations = folder_files(self.path)
            self.files = [f for f in self.files if not (f.name.upper() == "DICOMDIR" and _is_dicom(f))]
            if not self.files:
                raise SourceError(f"folder '{path}' has no files; put images in it or give another source")
            self.names = [p.relative_to(self.path).as_posix() for p in self.files]
        else:
            self.files = [self.path]
            self.names = [self.path.name]
        self.source_id = opaque_id(str(self.path.resolve()), "files")
        # DICOM files of the folder: opened now (headers only), so `total` counts their frames
        self._dicom: dict[int, object] = {}
        if self._folder:
            found = [i for i, f in enumerate(self.files) if f.suffix.lower() not in IMAGE_SUFFIXES and _is_dicom(f)]
            if found:
                from runtime.sources.dicom import open_in_folder
                self._dicom = {i: open_in_folder(self.files[i], k, len(found)) for k, i in enumerate(found)}
        self.total = sum(getattr(self._dicom.get(i), "total", 1) for i in range(len(self.files)))

    def __iter__(self) -> Iterator[Frame]:
        n = len(self.files)
        index = 0
        for i, f in enumerate(self.files):
            dicom = self._dicom.get(i)
            if isinstance(dicom, str):                # could not be opened: one record, named by its place
                yield Frame(index, self.source_id, now(), None, error=dicom, source_file=self.names[i],
                            frame_in_file=0)
                index += 1
                continue
            if dicom is not None:
                for frame in dicom:
                    frame.index, frame.source_id, frame.source_file = index, self.source_id, self.names[i]
                    yield frame
                    index += 1
                continue
            # Named by its place, never by its file name (which may be a patient's): "image 17 of 40 in the folder"
            label = f"image {i + 1} of {n} (in name order) in the folder" if self._folder else "the image"
            pixels, error = read_image(f, label)
            # captured = decoded: the record's `wait` then is the time the frame waited for the pipeline only
            yield Frame(index, self.source_id, now(), pixels, channel_order="BGR", error=error,
                        source_file=self.names[i], frame_in_file=0)
            index += 1


def _is_dicom(path: Path) -> bool:
    return is_dicom(path)



class VideoSource(Source):
    """A video file through OpenCV; every frame, in order.

    A video that ends early is said so in one error record after its last decodable frame (index: the next
    frame's), so the run exits 3: when fewer frames decode than the container's index declares (MP4/MOV/M4V and
    AVI keep an exact frame count in their index; for other containers OpenCV estimates it from the duration, and
    a shortfall of one frame is taken as that estimate's rounding), or when the file ends before the boxes
    (MP4/MOV) or chunks (AVI) its own headers declare, even if every declared frame decoded (the last one then
    decoded from part of its data). `truncated` then holds that sentence."""

    def __init__(self, path: Path):
        self.path = Path(path)
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            raise SourceError(f"video '{path}' cannot be opened by OpenCV (unsupported codec or not a video); "
                              f"convert it to MP4 (H.264) or give a folder of images")
        self.fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.total = n if n > 0 else None
        cap.release()
        self.source_id = opaque_id(str(self.path.resolve()), "video")
        self.truncated: str | None = None

    def __iter__(self) -> Iterator[Frame]:
        cap = cv2.VideoCapture(str(self.path))
        i = 0
        try:
            while True:
                ok, img = cap.read()
                if not ok:
                    break
                yield Frame(i, self.source_id, now(), img, channel_order="BGR", source_file=self.path.name,
                            frame_in_file=i)
                i += 1
        finally:
            cap.release()
        self.truncated = ended_early(self.path, i, self.total)
        if self.truncated:
            yield Frame(i, self.source_id, now(), None, channel_order="BGR", error=self.truncated,
                        source_file=self.path.name, frame_in_file=i)


def ended_early(path: Path, delivered: int, declared: int | None) -> str | None:
    """One sentence when a video that decoded `delivered` frames is cut short or damaged (see VideoSource), else
    None. Never names the file (its name may carry a patient's)."""
    kind, short = container_shortfall(path)
    exact = kind is not None                 # MP4/MOV/AVI: the count comes from the index, not a duration
    fix = "re-copy or re-export the video"
    if declared and delivered < declared and (exact or short or delivered < declared - 1):
        if short:
            why = "the file is truncated"
        elif exact:
            why = "decoding stopped early (the file is damaged)"
        else:
            why = "the file may be truncated or damaged"
        index = "index" if exact else "header"
        return (f"the video ends after {delivered} of the {declared} frames its {index} declares: {why} "
                f"({declared - delivered} frames missing); {fix}")
    if short:
        return (f"the video's file ends {short} bytes before the end its {kind} headers declare: the file is "
                f"truncated (its last frame may be incomplete); {fix}")
    return None


def container_shortfall(path: Path) -> tuple[str | None, int]:
    """(container, bytes missing): "MP4" (ISO base media: MP4, MOV, M4V) or "AVI" (RIFF) with how many bytes the
    file lacks to hold every top-level box or chunk its headers declare (0: complete); (None, 0) for any other
    container or a file that cannot be read. Reads box and chunk headers only."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(12)
            if len(head) == 12 and head[4:8] in _ISO_TOP:
                return "MP4", _walk(f, size, iso=True)
            if len(head) == 12 and head[:4] == b"RIFF" and head[8:12] == b"AVI ":
                return "AVI", _walk(f, size, iso=False)
    except OSError:
        pass
    return None, 0


_ISO_TOP = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pdin", b"uuid", b"styp"}


def _walk(f, size: int, iso: bool) -> int:
    """Bytes missing after the last top-level box (ISO: 32-bit big-endian size including its 8-byte header, 1 =
    64-bit size follows, 0 = to the end of the file) or RIFF chunk (little-endian size after the 4-byte tag,
    excluding the header, padded to even; OpenDML files chain RIFF AVIX chunks)."""
    at = 0
    for _ in range(100_000):
        if at + 8 > size:
            return 0 if at >= size else at + 8 - size
        f.seek(at)
        hdr = f.read(16)
        if iso:
            n = int.from_bytes(hdr[:4], "big")
            if n == 1:
                if len(hdr) < 16:
                    return 16 - len(hdr)
                n = int.from_bytes(hdr[8:16], "big")
            elif n == 0:
                return 0
            if n < 8:
                return 0                     # not a box: nothing to say
        else:
            n = 8 + int.from_bytes(hdr[4:8], "little")
            n += n & 1
        at += n
        if at > size:
            return at - size
    return 0
