"""The per-frame result: what every sink consumes and what `--results` writes, one JSON object per input frame."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.preprocess import Region

# Latency keys, in pipeline order (ms). `wait` is the frame's capture (or, for a file, its decoding) -> the pipeline
# taking it: time in the hand-off, which under policy `all` is mostly back-pressure. The stages that follow are
# processing, and `total` is the pipeline taking the frame -> its result (the stages add up to it); capture -> result
# is `wait` + `total`.
# `scope` is the scope gate's checks (runtime.graph, docs/scope.md): present on a frame the mask gate accepted when
# the bundle has a scope reference.
STAGES = ("wait", "preprocess", "unet", "gate", "scope", "vgg", "booster")

# The error of the record of a frame that the stream's `newest` policy skipped (runtime/stream.py): the frame is
# counted and keeps its place in the results, but was never processed. Sinks tell it from a real error by it.
DROPPED = "dropped: a newer frame arrived before this one was processed (policy newest)"


@dataclass
class FrameRecord:
    frame: int                                   # input order, from 0
    source_id: str                               # opaque id of the source (never a patient identifier)
    t_capture: float                             # seconds, time.time() clock of the capture
    accepted: bool = False                       # graded: passed the mask gate and the scope gate, and was scored
    mask_fraction: float = 0.0                   # fraction of the 224x224 mask that is kidney
    grade: int | None = None                     # 1..4, None when not scored
    probabilities: list[float] | None = None     # 4 class probabilities, None when not scored
    latency_ms: dict[str, float] = field(default_factory=dict)  # stage -> ms, plus "total"
    error: str | None = None                     # one sentence when the frame could not be processed
    # Why a processed frame got no grade: "no kidney" (the mask gate) or the scope gate's reason
    # (runtime.scope.REASONS); None for a graded frame, an error or a dropped frame.
    refused: str | None = None
    scope: dict[str, Any] | None = None          # the scope verdict (Verdict.record(): in_scope, reason, scores); None
                                                 # without a scope reference or when the mask gate refused the frame
    # With `run --record-paths` only (runtime/stream.py sets them; absent from to_json() when None):
    source_file: str | None = None               # the file, relative to the source root (never a DICOM identifier)
    frame_in_file: int | None = None             # the frame's number inside that file, from 0
    # Kidney size (runtime/measure.py), accepted frames only; None on other frames and when not measured:
    kidney_length_mm: float | None = None        # longest axis (max Feret) of the largest part, source frame
    kidney_area_mm2: float | None = None         # that part's area
    size_note: str | None = None                 # an accepted frame's reason for no size ("not measured: ...")
    # For sinks only, never serialised:
    image: np.ndarray | None = None              # preprocessed 224x224 uint8 (after Crimmins)
    mask: np.ndarray | None = None               # binary 224x224 uint8, 0/1
    display: np.ndarray | None = None            # the source frame as uint8 gray HxW, for overlays
    region: Region | None = None                 # where `image` came from inside `display`
    frame_shape: tuple[int, int] | None = None   # the source frame's (rows, columns), before any cut for display
    frame_region: Region | None = None           # where `image` came from inside the source frame
    meta: dict[str, Any] = field(default_factory=dict)  # source metadata (pixel spacing as runtime/sources/__init__.py defines it, truth when simulated)

    def to_json(self) -> dict[str, Any]:
        return {
            "frame": self.frame,
            "source_id": self.source_id,
            **({"source_file": self.source_file, "frame_in_file": self.frame_in_file}
               if self.source_file is not None or self.frame_in_file is not None else {}),
            "t_capture": self.t_capture,
            "accepted": self.accepted,
            "mask_fraction": round(float(self.mask_fraction), 6),
            "grade": self.grade,
            "probabilities": None if self.probabilities is None else [round(float(p), 6) for p in self.probabilities],
            "latency_ms": {k: round(float(v), 4) for k, v in self.latency_ms.items()},
            "error": self.error,
            "refused": self.refused,
            "scope": self.scope,
            "kidney_length_mm": self.kidney_length_mm,
            "kidney_area_mm2": self.kidney_area_mm2,
            "size_note": self.size_note,
        }
