"""`--results`: one JSON object per input frame, one per line, in input order (docs/design.md "Results JSONL")."""
from __future__ import annotations

import json
import os
from pathlib import Path

from runtime.record import FrameRecord
from runtime.sinks import (Sink, claim_partial, fsync_path, is_stream_file, partial_path, reason, recover_partials,
                           target_path)


class JsonlSink(Sink):
    """Writes `record.to_json()` as one line per record, each line with one write() to the operating system, so a
    process killed at any moment (SIGKILL) leaves every completed record as a whole line.

    The lines go to `partial` (`r.partial-<time>-<random>.jsonl` beside `r.jsonl`, parent folders made), created
    (never reopened: a new name each run) and locked when the sink is made, after an earlier run's partial files
    left beside the path are kept as `r.recovered-<time>-<random>.jsonl` (`recover_partials`, one line says so); `close()` renames it into place, so the file at the path is the previous run's until this run
    has finished. A path that is a pipe or a device (/dev/stdout) is written in place. When a write fails (a full
    disk), the file is cut back to the last complete record, the sink takes no more records, and `close()` still
    renames what it holds into place."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lines = 0
        self._good = 0                      # bytes of complete records written
        target = target_path(self.path)
        if is_stream_file(target):
            self.target, self.partial = target, None
            self._file = open(target, "wb", buffering=0)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            recover_partials(target, self.label)
            self.target, self.partial = target, partial_path(target)
            self._file = open(claim_partial(self.partial), "wb", buffering=0)

    @property
    def label(self) -> str:
        return f"results {self.path}"

    def write(self, record: FrameRecord) -> None:
        self._check_open()
        if self.failed:
            raise ValueError(self.failed)
        data = memoryview((json.dumps(record.to_json()) + "\n").encode("utf-8"))
        while data:  # a raw write may take part of the line (a signal, a nearly full disk)
            n = self._file.write(data)
            data = data[n:]
        self._good += len(data.obj)
        self.lines += 1

    def _failure(self, error: BaseException) -> str:
        if self.partial is not None:
            try:  # cut a torn last line back to the last complete record
                os.ftruncate(self._file.fileno(), self._good)
            except OSError:
                pass
        return (f"results {self.path} could not be written after {self.lines} records ({reason(error)}); "
                f"it keeps those {self.lines} records and takes no more")

    def _close(self) -> None:
        if self.partial is None:
            self._file.close()
            return
        try:                              # renamed while still open: the lock holds until it is in place
            os.fsync(self._file.fileno())
            os.replace(self.partial, self.target)
        finally:
            self._file.close()
        fsync_path(self.target.parent)

    def _discard(self) -> None:
        if self.partial is not None:
            self.partial.unlink(missing_ok=True)
        self._file.close()
