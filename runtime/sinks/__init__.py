"""Sinks: what consumes per-frame records, and what they draw.

    jsonl.py     `--results`: one JSON object per frame
    masks.py     `--save-masks`: each frame's binary mask as PNG
    video.py     `--video`: the overlay video (MP4)
    summary.py   `--study-summary` / `--study-report`: the per-study aggregate (JSON) and its HTML report
    viewer.py    `--view`: the live browser viewer (HTTP server; its page is viewer_page.html beside it)
    display.py   `--display`: the overlay in a window on the device's own screen
    overlay.py   the overlay picture of one record (video, display; the viewer draws its frame and contour)
    report.py    the study's bounded timeline and the one-page HTML report drawn from it

The stream's worker thread hands every sink every record, in input order, one at a time; a sink needs no locks.
Each sink is a context manager and `close()` may be called any number of times (the run closes its sinks in a
`finally`, and a `with` block may close them again).
"""
from __future__ import annotations

from runtime.record import FrameRecord


class Sink:
    """Base class. Subclasses implement `write` and, for resources to release, `_close` (called once)."""

    closed: bool = False      # a class default, so a subclass need not call super().__init__()

    def write(self, record: FrameRecord) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Finish and release the output; later calls do nothing."""
        if self.closed:
            return
        self.closed = True
        self._close()

    def _close(self) -> None:
        pass

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"{type(self).__name__} is closed: it takes no more records")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
