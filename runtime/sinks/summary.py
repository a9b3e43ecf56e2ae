"""`--study-summary` / `--study-report`: the per-study aggregate of a run (counts, the study grade, its smoothed
value, latency percentiles) as JSON, and the one-page HTML report (runtime/sinks/report.py)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from runtime import stats
from runtime.stats import LatencySketch
from runtime.measure import SizeStats
from runtime.record import DROPPED, STAGES, FrameRecord
from runtime.sinks import Sink
from runtime.sinks.overlay import DEFAULT_CLASS_NAMES
from runtime.sinks.report import (STATUS_ACCEPTED, STATUS_DROPPED, STATUS_ERROR, STATUS_REJECTED, Timeline,
                                  render_html, write_html)


class StudySummary(Sink):
    """Accumulates records; `summary()` is the aggregate so far, and `close()` writes it as JSON to `path` and the
    HTML report to `html_path` (each when given; each file appears complete or not at all).

    Every record is exactly one of: accepted (passed the gate and scored), rejected (processed, below the gate),
    error (could not be processed) or dropped (skipped by the `newest` policy). The study grade is the argmax
    of the probabilities averaged over the accepted frames (+1); its confidence is that mean probability.

    With `smoothing_half_life` (in accepted frames), the probabilities are also smoothed by an exponential moving
    average over the accepted frames (weight of a frame halves every `smoothing_half_life` accepted frames after
    it); the summary's `smoothing` then holds the smoothed grade at the end of the study, its confidence, and the
    distribution of the per-frame smoothed grades.

    Memory stays bounded whatever the study's length (a few hundred kilobytes for a run of days): counts and sums,
    the plot's timeline in a fixed number of bins (runtime/sinks/report.py), and each stage's latencies in a
    `LatencySketch`: exact for the first 2048 frames, then a log-binned histogram whose percentiles are within
    0.5 % (relative) of the exact ones; `max` stays exact.
    """

    def __init__(self, path: str | Path | None = None, disclaimer: str | None = None, n_classes: int = 4, *,
                 html_path: str | Path | None = None, smoothing_half_life: float | None = None,
                 class_names: Sequence[str] = DEFAULT_CLASS_NAMES, timeline_bins: int = 1024,
                 card: dict | None = None):
        if smoothing_half_life is not None and not (smoothing_half_life > 0 and math.isfinite(smoothing_half_life)):
            raise ValueError(f"the smoothing half-life must be a positive number of frames, got {smoothing_half_life}")
        self.path = Path(path) if path else None
        self.html_path = Path(html_path) if html_path else None
        self.disclaimer = disclaimer
        self.card = dict(card) if card else None        # the bundle's model card: the summary's `model`
        self.n_classes = n_classes
        self.class_names = tuple(class_names)
        self.half_life = float(smoothing_half_life) if smoothing_half_life else None
        self.alpha = 1.0 - 0.5 ** (1.0 / self.half_life) if self.half_life else None
        self.frames = self.accepted = self.rejected = self.errors = self.dropped = 0
        self.grade_counts = [0] * n_classes
        self.source_id: str | None = None
        self._frame_range: list[int] | None = None
        self._t_range: list[float] | None = None
        self._prob_sum = np.zeros(n_classes, np.float64)
        self._prob_n = 0
        self._ema: np.ndarray | None = None
        self._smooth_counts = [0] * n_classes
        self.timeline = Timeline(n_classes, timeline_bins, smoothing=self.half_life is not None)
        self._latency: dict[str, LatencySketch] = {}
        self._size = SizeStats()   # kidney length and area of the accepted frames (runtime/measure.py)

    def write(self, record: FrameRecord) -> None:
        self._check_open()
        self.frames += 1
        if self.source_id is None:
            self.source_id = record.source_id
        f = int(record.frame)
        self._frame_range = [f, f] if self._frame_range is None else [min(self._frame_range[0], f),
                                                                      max(self._frame_range[1], f)]
        t = float(record.t_capture)
        if math.isfinite(t) and t > 0:
            self._t_range = [t, t] if self._t_range is None else [min(self._t_range[0], t), max(self._t_range[1], t)]
        probs = smoothed = None
        if record.error == DROPPED:
            self.dropped += 1
            status = STATUS_DROPPED
        elif record.error is not None:
            self.errors += 1
            status = STATUS_ERROR
        elif record.accepted:
            self.accepted += 1
            status = STATUS_ACCEPTED
            if record.grade is not None and 1 <= record.grade <= self.n_classes:
                self.grade_counts[record.grade - 1] += 1
            if record.probabilities is not None and len(record.probabilities) == self.n_classes:
                probs = np.asarray(record.probabilities, np.float64)
                self._prob_sum += probs
                self._prob_n += 1
                if self.alpha is not None:
                    self._ema = probs.copy() if self._ema is None else self._ema + self.alpha * (probs - self._ema)
                    smoothed = self._ema
                    self._smooth_counts[int(np.argmax(self._ema))] += 1
        else:
            self.rejected += 1
            status = STATUS_REJECTED
        self.timeline.add(f, status, probs, smoothed)
        for stage, ms in record.latency_ms.items():
            self._latency.setdefault(stage, LatencySketch()).add(float(ms))
        if status == STATUS_ACCEPTED:
            self._size.add(record)

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
        out["latency_ms"] = {s: self._latency[s].percentiles() for s in order}
        n_graded = sum(self.grade_counts)
        out["grade_fractions"] = {str(g + 1): round(n / n_graded, 6) if n_graded else 0.0
                                  for g, n in enumerate(self.grade_counts)}
        out["final_grade_agreement"] = (round(self.grade_counts[out["final_grade"] - 1] / n_graded, 6)
                            if out["final_grade"] is not None and n_graded else None)
        if self.half_life is not None:
            ema = self._ema
            best = None if ema is None else int(np.argmax(ema))
            out["smoothing"] = {
                "method": "ema", "half_life_frames": self.half_life, "alpha": round(self.alpha, 6),
                "final_grade": None if best is None else best + 1,
                "confidence": None if best is None else round(float(ema[best]), 6),
                "probabilities": None if ema is None else [round(float(p), 6) for p in ema],
                "grade_counts": {str(g + 1): n for g, n in enumerate(self._smooth_counts)}}
        else:
            out["smoothing"] = None
        out["source_id"] = self.source_id
        out["frame_range"] = self._frame_range
        out["duration_s"] = (round(self._t_range[1] - self._t_range[0], 3) if self._t_range else None)
        out.update(self._size.summary())    # kidney_length_mm, kidney_area_mm2, kidney_size (runtime/measure.py)
        if self.disclaimer:
            out["disclaimer"] = self.disclaimer
        if self.card:
            out["model"] = self.card
        return out

    def html(self) -> str:
        """The one-page HTML report of the study so far."""
        return render_html(self.summary(), self.timeline, self.class_names)

    def _close(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.summary(), indent=2) + "\n")
            os.replace(tmp, self.path)
        if self.html_path is not None:
            write_html(self.html_path, self.html())



def percentiles(values) -> dict[str, float]:
    """p50/p95/p99/max in ms (runtime.stats.percentiles), rounded to 0.1 us, as the summary names them."""
    return {k.removesuffix("_ms"): round(v, 4) for k, v in stats.percentiles(values).items()}
