"""`--save-masks DIR`: the binary kidney mask of each frame as a PNG, 0/255 uint8.

Names: `DIR/<frame>.png`; with `run --record-paths` the name follows the frame's file instead, mirroring the
source's folders: `DIR/<folders of source_file>/<stem of source_file>-<frame_in_file>.png` (`scans/a/b.png` ->
`DIR/scans/a/b-0.png`, frame 7 of `cine.dcm` -> `DIR/cine-7.png`). Every folder and file name is sanitised: a run
of characters other than ASCII letters, digits, `.`, `-` and `_` becomes `_`, a leading `.` becomes `_`, and a name is
cut to 120 characters. When two files would get the same name (`x.png` and `x.jpg`, or names that sanitise
alike), the later one in the run keeps its suffix (`x.jpg-0.png`), then a counter (`x.jpg-0~2.png`): no mask
overwrites another of the same run.

Size (`--mask-size`): `224` (default), the network's mask as it is; `original`, the mask mapped back into the
source frame's geometry: interpolated bilinearly onto the region the network's image was cut from, > 0.5, and
placed there in a frame of the source frame's size, zeros outside the region (`runtime.measure.mask_to_source`,
the one mapping, which the overlay's contour, the DICOM SEG and the measurements use too).
"""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

import cv2
import numpy as np

from runtime.record import FrameRecord
from runtime.files import atomic_write
from runtime.sinks import Sink, reason

MASK_SIZES = ("224", "original")
_UNSAFE = re.compile(r"[^\w.\-]+", re.ASCII)
MAX_NAME = 120


def safe_name(part: str) -> str:
    """One folder or file name as it may appear under DIR (see the module docstring)."""
    name = _UNSAFE.sub("_", part)[:MAX_NAME]
    if name.startswith("."):
        name = "_" + name[1:]
    return name or "_"


def mask_name(source_file: str, frame_in_file: int, keep_suffix: bool = False) -> str:
    """The mask's path under DIR (posix, relative) for frame `frame_in_file` of `source_file`."""
    parts = [p for p in PurePosixPath(source_file.replace("\\", "/")).parts if p not in ("", ".", "..", "/")]
    if not parts:
        parts = ["frame"]
    last = PurePosixPath(parts[-1])
    base = parts[-1] if keep_suffix or not last.stem else last.stem
    return "/".join([safe_name(p) for p in parts[:-1]] + [f"{safe_name(base)}-{int(frame_in_file)}.png"])


def frame_mask(record: FrameRecord) -> np.ndarray:
    """The record's mask in the source frame's geometry (`--mask-size original`); the 224 mask when the record
    does not know its frame's geometry."""
    from runtime.measure import mask_to_source
    if record.frame_shape is not None:
        return mask_to_source(record.mask, record.frame_region, record.frame_shape)
    if record.display is not None:
        return mask_to_source(record.mask, record.region, record.display.shape[:2])
    return record.mask


class MaskSink(Sink):
    """One PNG per record that has a mask (error and dropped frames have none: nothing is written for them).

    Each PNG is written under a partial name and renamed, so every PNG in the folder is whole. When a write fails
    (a full disk), the sink takes no more records; the masks written before stay."""

    def __init__(self, folder: str | Path, size: str = "224"):
        if size not in MASK_SIZES:
            raise ValueError(f"mask size '{size}' is not one of {', '.join(MASK_SIZES)}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.size = size
        self.written = 0
        self._taken: dict[str, tuple[str, int]] = {}     # name under DIR -> the (file, frame) it holds

    @property
    def label(self) -> str:
        return f"masks {self.folder}"

    def name_for(self, record: FrameRecord) -> str:
        """The PNG's path under the folder, posix and relative (see the module docstring)."""
        if record.source_file is None:
            return f"{record.frame}.png"
        key = (record.source_file, int(record.frame_in_file or 0))
        name = mask_name(*key)
        if self._taken.get(name, key) != key:
            name = mask_name(*key, keep_suffix=True)
            stem, n = name[:-len(".png")], 2
            while self._taken.get(name, key) != key:
                name, n = f"{stem}~{n}.png", n + 1
        self._taken[name] = key
        return name

    def write(self, record: FrameRecord) -> None:
        self._check_open()
        if self.failed:
            raise ValueError(self.failed)
        if record.mask is None:
            return
        path = self.folder / self.name_for(record)
        mask = frame_mask(record) if self.size == "original" else record.mask
        ok, png = cv2.imencode(".png", np.where(mask > 0, 255, 0).astype(np.uint8))
        if not ok:
            raise OSError(f"could not encode mask {path}")
        atomic_write(path, png.tobytes(), durable=False)     # thousands of small files: whole, not fsynced each
        self.written += 1

    def _failure(self, error: BaseException) -> str:
        return (f"masks {self.folder} could not be written after {self.written} masks ({reason(error)}); "
                f"those stay and no more are written")

    def _discard(self) -> None:
        pass            # each mask is renamed into place whole (runtime.files.atomic_write): nothing half-written
