"""`--results`: one JSON object per input frame, one per line, in input order (docs/design.md "Results JSONL")."""
from __future__ import annotations

import json
from pathlib import Path

from runtime.record import FrameRecord
from runtime.sinks import Sink


class JsonlSink(Sink):
    """Writes `record.to_json()` as one line per record and flushes each line, so a crash loses at most the line
    being written. The file is created (parent folders too) and truncated when the sink is made."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8")
        self.lines = 0

    def write(self, record: FrameRecord) -> None:
        self._check_open()
        self._file.write(json.dumps(record.to_json()) + "\n")
        self._file.flush()
        self.lines += 1

    def _close(self) -> None:
        self._file.close()
