"""`--study-summary`: the per-study aggregate of a run (counts, the study grade, latency percentiles)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from runtime.record import STAGES, FrameRecord
from runtime.sinks import Sink
from runtime.stream import DROPPED


class StudySummary(Sink):
    """Accumulates records; `summary()` is the aggregate so far, and `close()` writes it as JSON to `path`
    (when one is given; the file appears complete or not at all).

    Every record is exactly one of: accepted (passed the gate and scored), rejected (processed, below the gate),
    error (could not be processed) or dropped (skipped by the `newest` policy). The study grade is the argmax
    of the probabilities averaged over the accepted frames (+1); its confidence is that mean probability.
    """

    def __init__(self, path: str | Path | None = None, disclaimer: str | None = None, n_classes: int = 4):
        self.path = Path(path) if path else None
        self.disclaimer = disclaimer
        self.n_classes = n_classes
        self.frames = self.accepted = self.rejected = self.errors = self.dropped = 0
        self.grade_counts = [0] * n_classes
        self._prob_sum = np.zeros(n_classes, np.float64)
        self._prob_n = 0
        self._latency: dict[str, list[float]] = {}

    def write(self, record: FrameRecord) -> None:
        self._check_open()
        self.frames += 1
        if record.error == DROPPED:
            self.dropped += 1
        elif record.error is not None:
            self.errors += 1
        elif record.accepted:
            self.accepted += 1
            if record.grade is not None and 1 <= record.grade <= self.n_classes:
                self.grade_counts[record.grade - 1] += 1
            if record.probabilities is not None and len(record.probabilities) == self.n_classes:
                self._prob_sum += np.asarray(record.probabilities, np.float64)
                self._prob_n += 1
        else:
            self.rejected += 1
        for stage, ms in record.latency_ms.items():
            self._latency.setdefault(stage, []).append(float(ms))

    def summary(self) -> dict:
        out: dict = {"frames": self.frames, "accepted": self.accepted, "rejected": self.rejected,
                     "errors": self.errors, "dropped": self.dropped,
                     "grade_counts": {str(g + 1): n for g, n in enumerate(self.grade_counts)}}
        if self._prob_n:
            mean = self._prob_sum / self._prob_n
            best = int(np.argmax(mean))
            out.update(mean_probabilities=[round(float(p), 6) for p in mean], final_grade=best + 1,
                       confidence=round(float(mean[best]), 6))
        else:
            out.update(mean_probabilities=None, final_grade=None, confidence=None)
        order = [s for s in STAGES if s in self._latency]
        order += sorted(s for s in self._latency if s not in STAGES and s != "total")
        order += ["total"] if "total" in self._latency else []
        out["latency_ms"] = {s: percentiles(self._latency[s]) for s in order}
        if self.disclaimer:
            out["disclaimer"] = self.disclaimer
        return out

    def _close(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.summary(), indent=2) + "\n")
        os.replace(tmp, self.path)


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p95/p99/max in ms (numpy's linear interpolation), rounded to 0.1 us."""
    a = np.asarray(values, np.float64)
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"p50": round(float(p50), 4), "p95": round(float(p95), 4), "p99": round(float(p99), 4),
            "max": round(float(a.max()), 4)}
