"""The simulated probe: `sim://kidney?grade=3&fps=30&frames=300&seed=1` streams the kidney phantom.

With fps > 0 frames are paced in real time like a scanner (a live source: policy `newest` by default);
fps=0 produces them as fast as they can be made. Offline users (calibration) open it with realtime=False: the
same frames, unpaced.
"""
from __future__ import annotations

import threading
import time
from typing import Iterator
from urllib.parse import parse_qs, urlparse

from runtime.sources.base import Frame, Source, SourceError, now, spacing_meta


class SimSource(Source):
    def __init__(self, grade: int | None = None, fps: float = 30.0, frames: int = 300, seed: int = 1,
                 realtime: bool = True):
        from runtime.phantom import KidneyPhantom
        if grade is not None and grade not in (1, 2, 3, 4):
            raise SourceError(f"sim://kidney grade={grade} is not a grade; use 1, 2, 3 or 4 (or leave it out)")
        if frames < 1 or fps < 0:
            raise SourceError("sim://kidney needs frames >= 1 and fps >= 0")
        self.phantom = KidneyPhantom(grade=grade, seed=seed)
        self.fps = float(fps)
        self.paced = bool(realtime) and fps > 0
        self.live = self.paced
        self.total = int(frames)
        self.source_id = f"sim-kidney-{seed}"
        self._closed = threading.Event()   # close() from any thread ends the iteration, also during the pacing wait

    @classmethod
    def from_uri(cls, uri: str, realtime: bool | None = None) -> "SimSource":
        u = urlparse(uri)
        if u.netloc != "kidney":
            raise SourceError(f"source '{uri}': the simulator knows only sim://kidney")
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        unknown = set(q) - {"grade", "fps", "frames", "seed"}
        if unknown:
            raise SourceError(f"source '{uri}': unknown parameter(s) {', '.join(sorted(unknown))}; "
                              f"use grade, fps, frames, seed")
        try:
            grade = int(q["grade"]) if "grade" in q else None
            fps, frames, seed = float(q.get("fps", 30)), int(q.get("frames", 300)), int(q.get("seed", 1))
        except ValueError:
            raise SourceError(f"source '{uri}': grade, frames and seed must be integers and fps a number") from None
        return cls(grade=grade, fps=fps, frames=frames, seed=seed, realtime=realtime is not False)

    def close(self) -> None:
        self._closed.set()

    def __iter__(self) -> Iterator[Frame]:
        start = time.perf_counter()
        for i in range(self.total):
            if self.paced:
                delay = start + i / self.fps - time.perf_counter()
                if delay > 0 and self._closed.wait(delay):
                    return
            if self._closed.is_set():
                return
            pf = self.phantom.frame(i)
            yield Frame(i, self.source_id, now(), pf.image, meta={
                "truth_grade": pf.grade, "truth_mask": pf.mask, "has_kidney": pf.has_kidney,
                "truth_kidney_length_mm": pf.kidney_length_mm,
                **spacing_meta(pf.pixel_spacing_mm, pf.pixel_spacing_mm)})
