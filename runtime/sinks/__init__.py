"""Sinks: what consumes per-frame records (results JSONL, masks, the overlay video, the study summary).

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
