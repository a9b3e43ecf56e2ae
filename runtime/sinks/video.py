"""`--video`: the annotated stream as MP4, one overlay picture (runtime/sinks/overlay.py) per input frame."""
from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from runtime.bundle import DEMO_DISCLAIMER
from runtime.record import DROPPED, FrameRecord
from runtime.sinks import Sink
from runtime.sinks.overlay import DEFAULT_CLASS_NAMES, PANEL_BG, fill, render_overlay


class VideoSink(Sink):
    """MP4 (fourcc 'mp4v') through cv2.VideoWriter, played back at `fps` (the source's rate).

    One video frame per record, so the video lasts as long as the stream did. The first picture fixes the video
    size; a later picture of another size is scaled to fit it, aspect kept, and padded. A frame dropped by the
    `newest` policy repeats the last picture rather than flashing a placeholder. The rate printed on the
    pictures is the measured processing rate (records that went through the pipeline, last 30).
    """

    def __init__(self, path: str | Path, fps: float = 30.0, disclaimer: str | None = DEMO_DISCLAIMER,
                 class_names: Sequence[str] = DEFAULT_CLASS_NAMES):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fps = float(fps) if fps and fps > 0 else 30.0
        self.disclaimer = disclaimer
        self.class_names = class_names
        self.size: tuple[int, int] | None = None        # (width, height), fixed by the first picture
        self.frames = 0
        self._writer: cv2.VideoWriter | None = None
        self._open_error: OSError | None = None
        self._last: np.ndarray | None = None
        self._done: deque[float] = deque(maxlen=30)    # perf_counter() of the latest processed records

    def processing_fps(self) -> float | None:
        if len(self._done) < 2 or self._done[-1] <= self._done[0]:
            return None
        return (len(self._done) - 1) / (self._done[-1] - self._done[0])

    def write(self, record: FrameRecord) -> None:
        self._check_open()
        if self._open_error is not None:
            raise self._open_error
        if record.error == DROPPED and self._last is not None:
            picture = self._last
        else:
            if "total" in record.latency_ms:
                self._done.append(time.perf_counter())
            picture = render_overlay(record, fps=self.processing_fps(), disclaimer=self.disclaimer,
                                     class_names=self.class_names)
        if self._writer is None:
            self._open(picture.shape[1], picture.shape[0])
        picture = self._fit(picture)
        self._writer.write(picture)
        self._last = picture
        self.frames += 1

    def _open(self, width: int, height: int) -> None:
        fourcc = cv2.VideoWriter.fourcc(*"mp4v")
        writer = cv2.VideoWriter(str(self.path), fourcc, self.fps, (width, height))
        if not writer.isOpened():
            self._open_error = OSError(
                f"cannot write video {self.path}: OpenCV's VideoWriter (mp4v, {width}x{height}, {self.fps:g} fps) "
                f"did not open; check that the folder is writable and the file name ends in .mp4")
            raise self._open_error
        self._writer, self.size = writer, (width, height)

    def _fit(self, picture: np.ndarray) -> np.ndarray:
        w, h = self.size
        ph, pw = picture.shape[:2]
        if (pw, ph) == (w, h):
            return picture
        s = min(w / pw, h / ph)
        nw, nh = max(1, min(w, int(round(pw * s)))), max(1, min(h, int(round(ph * s))))
        out = np.empty((h, w, 3), np.uint8)
        fill(out, PANEL_BG)
        x, y = (w - nw) // 2, (h - nh) // 2
        out[y:y + nh, x:x + nw] = cv2.resize(picture, (nw, nh), interpolation=cv2.INTER_AREA if s < 1
                                             else cv2.INTER_LINEAR)
        return out

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
