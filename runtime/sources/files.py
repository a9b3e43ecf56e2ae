"""Image files, folders of images, and video files."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from runtime.sources import Frame, Source, SourceError, now, opaque_id

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".pgm", ".ppm", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".wmv"}
MAX_PIXELS = 64_000_000  # refuse to decode images larger than this (a header can claim anything)

# Decoder warnings ("PNG input buffer is incomplete") are replaced by our own one-sentence frame errors.
if hasattr(cv2, "utils") and hasattr(cv2.utils, "logging"):
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def read_image(path: Path) -> tuple[np.ndarray | None, str | None]:
    """(pixels, None) or (None, one-sentence error). Colour comes back in BGR order (OpenCV's)."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        return None, f"{path.name}: cannot be read ({e.strerror}); check the file's permissions"
    if data.size == 0:
        return None, f"{path.name}: the file is empty; re-export or re-copy the image"
    claimed = _claimed_pixels(data)
    if claimed is not None and claimed > MAX_PIXELS:
        return None, f"{path.name}: the image claims {claimed} pixels, more than this runtime accepts; check the file"
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        return None, (f"{path.name}: not a decodable image (truncated, corrupt or not an image format); "
                      f"re-export it as PNG or JPEG")
    if img.size == 0:
        return None, f"{path.name}: the image has no pixels; re-export it"
    return img, None


def _claimed_pixels(data: np.ndarray) -> int | None:
    """Width x height from a PNG header, so a lying header is refused before any allocation."""
    if data.size >= 24 and bytes(data[:8]) == b"\x89PNG\r\n\x1a\n":
        w = int.from_bytes(bytes(data[16:20]), "big")
        h = int.from_bytes(bytes(data[20:24]), "big")
        return w * h
    return None


class FolderSource(Source):
    """Every file of a folder (sorted by name), or one file; lossless, one frame per file.

    Files that are not images still get a frame (with an error), so the results keep one record per input.
    Hidden files are skipped, and so are annotations beside their images: `X.json` when an image `X.png` (any
    image suffix) is in the same folder, the labelme layout of `sonoscore sim` datasets (`annotations` counts
    them). A folder holding nothing but such annotations is refused in one sentence.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.annotations = 0
        if self.path.is_dir():
            files = sorted(p for p in self.path.iterdir() if p.is_file() and not p.name.startswith("."))
            images = {p.stem for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
            self.files = [p for p in files if not (p.suffix.lower() == ".json" and p.stem in images)]
            self.annotations = len(files) - len(self.files)
            if not self.files:
                raise SourceError(f"folder '{path}' has no files; put images in it or give another source")
        else:
            self.files = [self.path]
        self.source_id = opaque_id(str(self.path.resolve()), "files")
        self.total = len(self.files)

    def __iter__(self) -> Iterator[Frame]:
        for i, f in enumerate(self.files):
            t = now()
            pixels, error = read_image(f)
            yield Frame(i, self.source_id, t, pixels, channel_order="BGR", error=error, meta={"name": f.name})


class VideoSource(Source):
    """A video file through OpenCV; every frame, in order."""

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

    def __iter__(self) -> Iterator[Frame]:
        cap = cv2.VideoCapture(str(self.path))
        try:
            i = 0
            while True:
                ok, img = cap.read()
                if not ok:
                    break
                yield Frame(i, self.source_id, now(), img, channel_order="BGR")
                i += 1
        finally:
            cap.release()
