"""`--save-masks DIR`: the binary kidney mask of each frame as `DIR/<frame>.png`, 0/255 uint8, 224x224."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from runtime.record import FrameRecord
from runtime.sinks import Sink, reason


class MaskSink(Sink):
    """One PNG per record that has a mask (error and dropped frames have none: nothing is written for them).

    Each PNG is written under a partial name and renamed, so every `<frame>.png` in the folder is whole. When a
    write fails (a full disk), the sink takes no more records; the masks written before stay."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.written = 0
        self._partial = self.folder / f".partial-{os.getpid()}.png"

    @property
    def label(self) -> str:
        return f"masks {self.folder}"

    def write(self, record: FrameRecord) -> None:
        self._check_open()
        if self.failed:
            raise ValueError(self.failed)
        if record.mask is None:
            return
        path = self.folder / f"{record.frame}.png"
        ok, png = cv2.imencode(".png", np.where(record.mask > 0, 255, 0).astype(np.uint8))
        if not ok:
            raise OSError(f"could not encode mask {path}")
        try:
            with open(self._partial, "wb") as f:
                f.write(png.tobytes())
            os.replace(self._partial, path)
        except OSError:
            self._partial.unlink(missing_ok=True)
            raise
        self.written += 1

    def _failure(self, error: BaseException) -> str:
        return (f"masks {self.folder} could not be written after {self.written} masks ({reason(error)}); "
                f"those stay and no more are written")

    def _discard(self) -> None:
        self._partial.unlink(missing_ok=True)
