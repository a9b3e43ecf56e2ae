"""`--study-summary` / `--study-report`: the per-study aggregate of a run (counts, the study grade, its smoothed
value, latency percentiles) as JSON, and the one-page HTML report (runtime/sinks/report.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from runtime import stats
from runtime.stats import LatencySketch
from runtime.files import atomic_write
from runtime.measure import SizeStats
from runtime.record import DROPPED, STAGES, FrameRecord
from runtime.scope import NO_KIDNEY, REASONS
from runtime.sinks import Sink
from runtime.sinks.report import (STATUS_ACCEPTED, STATUS_DROPPED, STATUS_ERROR, STATUS_REJECTED, Timeline,
                                  default_class_names, render_html, write_html)


class StudySummary(Sink):
    """Accumulates records; `summary()` is the aggregate so far, and `close()` writes it as JSON to `path` and the
    HTML report to `html_path` (each when given; each file appears complete or not at all).

    Every record is exactly one of: accepted (graded: passed the mask gate and the scope gate, and scored),
    rejected (processed, not graded: refused by either gate), error (could not be processed) or dropped (skipped by
    the `newest` policy). `refused_counts` counts the rejected frames per reason (`no kidney` for the mask gate, and
    the scope gate's reasons, runtime.scope.REASONS). The study grade is the argmax of the probabilities averaged
    over the accepted frames (+1); its confidence is that mean probability. A study with no graded frame has no
    grade, and `no_grade_reason` says why ("no frame in scope: 40 not a kidney view: unlike the training frames, 12
    no kidney").

    The class count is the bundle's: that of `class_names` (the bundle's `classes`, as shown), else `n_classes`,
    else that of the first scored record's probabilities (so a 3-grade bundle's summary counts 3 grades whoever
    made the summary; with none of these, the paper's four are counted zero). A scored record with another count
    is a ValueError naming both counts.

    With `smoothing_half_life` (in accepted frames), the probabilities are also smoothed by an exponential moving
    average over the accepted frames (weight of a frame halves every `smoothing_half_life` accepted frames after
    it); the summary's `smoothing` then holds the smoothed grade at the end of the study, its confidence, and the
    distribution of the per-frame smoothed grades.

    Memory stays bounded whatever the study's length (a few hundred kilobytes for a run of days): counts and sums,
    the plot's timeline in a fixed number of bins (runtime/sinks/report.py), and each stage's latencies in a
    `LatencySketch`: exact for the first 2048 frames, then a log-binned histogram whose percentiles are within
    0.5 % (relative) of the exact ones; `max` stays exact.
    """

    def __init__(self, path: str | Path | None = None, disclaimer: str | None = None, n_classes: int | None = None,
                 *, html_path: str | Path | None = None, smoothing_half_life: float | None = None,
                 class_names: Sequence[str] | None = None, timeline_bins: int = 1024,
                 card: dict | None = None):
        if smoothing_half_life is not None and not (smoothing_half_life > 0 and math.isfinite(smoothing_half_life)):
            raise ValueError(f"the smoothing half-life must be a positive number of frames, got {smoothing_half_life}")
        self.path = Path(path) if path else None
        self.html_path = Path(html_path) if html_path else None
        self.disclaimer = disclaimer
        self.card = dict(card) if card else None        # the bundle's model card: the summary's `model`
        if class_names is not None:
            if n_classes is not None and n_classes != len(class_names):
                raise ValueError(f"n_classes={n_classes} but {len(class_names)} class names were given")
            n_classes = len(class_names)
        self.class_names = tuple(class_names) if class_names is not None else None
        self.n_classes: int | None = None
        self.half_life = float(smoothing_half_life) if smoothing_half_life else None
        self.alpha = 1.0 - 0.5 ** (1.0 / self.half_life) if self.half_life else None
        self.frames = self.accepted = self.rejected = self.errors = self.dropped = 0
        self.grade_counts: list[int] = []
        self.refused_counts: dict[str, int] = {r: 0 for r in REASONS}
        self.source_id: str | None = None
        self._frame_range: list[int] | None = None
        self._t_range: list[float] | None = None
        self._prob_sum = np.zeros(0, np.float64)
        self._prob_n = 0
        self._ema: np.ndarray | None = None
        self._smooth_counts: list[int] = []
        self.timeline = Timeline(None, timeline_bins, smoothing=self.half_life is not None)
        if n_classes is not None:
            self._set_classes(int(n_classes))
        self._latency: dict[str, LatencySketch] = {}
        self._size = SizeStats()   # kidney length and area of the accepted frames (runtime/measure.py)

    def _set_classes(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"a study summary needs at least one class, got {n}")
        self.n_classes = n
        self.grade_counts = [0] * n
        self._prob_sum = np.zeros(n, np.float64)
        self._smooth_counts = [0] * n
        self.timeline.set_classes(n)

    @property
    def names(self) -> tuple[str, ...]:
        """The class names the report shows: those given, else the IFTA ranges for 4 classes, else "grade N"."""
        if self.class_names is not None:
            return self.class_names
        return default_class_names(self.n_classes or 0)

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
            if record.probabilities is not None:
                if self.n_classes is None:
                    self._set_classes(len(record.probabilities))
                elif len(record.probabilities) != self.n_classes:
                    raise ValueError(f"frame {record.frame} has {len(record.probabilities)} class probabilities but "
                                     f"the study summary counts {self.n_classes} classes; make the summary with the "
                                     f"bundle's classes (StudySummary(class_names=bundle.manifest['classes']))")
            if record.grade is not None and self.n_classes is not None and 1 <= record.grade <= self.n_classes:
                self.grade_counts[record.grade - 1] += 1
            if record.probabilities is not None:
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
            why = record.refused or NO_KIDNEY            # a record from before the scope gate: the mask gate's
            self.refused_counts[why] = self.refused_counts.get(why, 0) + 1
        self.timeline.add(f, status, probs, smoothed)
        for stage, ms in record.latency_ms.items():
            self._latency.setdefault(stage, LatencySketch()).add(float(ms))
        if status == STATUS_ACCEPTED:
            self._size.add(record)

    def summary(self) -> dict:
        # Nothing scored and no class count given: the paper's four grades, counted zero.
        counts = self.grade_counts if self.n_classes is not None else [0] * len(default_class_names(4))
        out: dict = {"frames": self.frames, "accepted": self.accepted, "rejected": self.rejected,
                     "errors": self.errors, "dropped": self.dropped,
                     "refused_counts": dict(self.refused_counts),
                     "grade_counts": {str(g + 1): n for g, n in enumerate(counts)}}
        if self._prob_n:
            mean = self._prob_sum / self._prob_n
            best = int(np.argmax(mean))
            out.update(mean_probabilities=[round(float(p), 6) for p in mean], final_grade=best + 1,
                       confidence=round(float(mean[best]), 6), no_grade_reason=None)
        else:
            out.update(mean_probabilities=None, final_grade=None, confidence=None,
                       no_grade_reason=self.no_grade_reason())
        order = [s for s in STAGES if s in self._latency]
        order += sorted(s for s in self._latency if s not in STAGES and s != "total")
        order += ["total"] if "total" in self._latency else []
        out["latency_ms"] = {s: self._latency[s].percentiles() for s in order}
        n_graded = sum(counts)
        out["grade_fractions"] = {str(g + 1): round(n / n_graded, 6) if n_graded else 0.0
                                  for g, n in enumerate(counts)}
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
                "grade_counts": {str(g + 1): n for g, n in enumerate(self._smooth_counts or [0] * len(counts))}}
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

    def no_grade_reason(self) -> str:
        """Why the study has no grade: the frames per reason, most first ("no frame in scope: 40 not a kidney
        view: unlike the training frames, 12 no kidney, 2 not processed (errors)"), or "no frames"."""
        parts = [f"{n} {why}" for why, n in sorted(self.refused_counts.items(), key=lambda kv: -kv[1]) if n]
        if self.errors:
            parts.append(f"{self.errors} not processed (errors)")
        if self.dropped:
            parts.append(f"{self.dropped} dropped")
        if self.accepted:                      # graded frames without probabilities: not a study grade
            parts.append(f"{self.accepted} graded without probabilities")
        return "no frame in scope: " + ", ".join(parts) if parts else "no frames"

    def html(self) -> str:
        """The one-page HTML report of the study so far."""
        return render_html(self.summary(), self.timeline, self.names)

    def _close(self) -> None:
        if self.path is not None:
            atomic_write(self.path, json.dumps(self.summary(), indent=2) + "\n")
        if self.html_path is not None:
            write_html(self.html_path, self.html())



def percentiles(values) -> dict[str, float]:
    """p50/p95/p99/max in ms (runtime.stats.percentiles), rounded to 0.1 us, as the summary names them."""
    return {k.removesuffix("_ms"): round(v, 4) for k, v in stats.percentiles(values).items()}
