"""`--save-masks DIR`: the binary kidney mask of each frame as `DIR/<frame>.png`, 0/255 uint8, 224x224."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from runtime.record import FrameRecord
from runtime.sinks import Sink


class MaskSink(Sink):
    """One PNG per record that has a mask (error and dropped frames have none: nothing is written for them)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.written = 0

    def write(self, record: FrameRecord) -> None:
        self._check_open()
        if record.mask is None:
            return
        path = self.folder / f"{record.frame}.png"
        if not cv2.imwrite(str(path), np.where(record.mask > 0, 255, 0).astype(np.uint8)):
            raise OSError(f"could not write mask {path}: check that the folder is writable and the disk not full")
        self.written += 1
