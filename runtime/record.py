"""The per-frame result: what every sink consumes and what `--results` writes, one JSON object per input frame."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.preprocess import Region

# Stage names, in pipeline order. `total` is capture -> result.
STAGES = ("queue", "preprocess", "unet", "gate", "vgg", "booster")

# The error of the record of a frame that the stream's `newest` policy skipped (runtime/stream.py): the frame is
# counted and keeps its place in the results, but was never processed. Sinks tell it from a real error by it.
DROPPED = "dropped: a newer frame arrived before this one was processed (policy newest)"


@dataclass
class FrameRecord:
    frame: int                                   # input order, from 0
    source_id: str                               # opaque id of the source (never a patient identifier)
    t_capture: float                             # seconds, time.time() clock of the capture
    accepted: bool = False                       # passed the quality gate and was scored
    mask_fraction: float = 0.0                   # fraction of the 224x224 mask that is kidney
    grade: int | None = None                     # 1..4, None when not scored
    probabilities: list[float] | None = None     # 4 class probabilities, None when not scored
    latency_ms: dict[str, float] = field(default_factory=dict)  # stage -> ms, plus "total"
    error: str | None = None                     # one sentence when the frame could not be processed
    # For sinks only, never serialised:
    image: np.ndarray | None = None              # preprocessed 224x224 uint8 (after Crimmins)
    mask: np.ndarray | None = None               # binary 224x224 uint8, 0/1
    display: np.ndarray | None = None            # the source frame as uint8 gray HxW, for overlays
    region: Region | None = None                 # where `image` came from inside `display`
    meta: dict[str, Any] = field(default_factory=dict)  # source metadata (pixel spacing as runtime/sources/__init__.py defines it, truth when simulated)

    def to_json(self) -> dict[str, Any]:
        return {
            "frame": self.frame,
            "source_id": self.source_id,
            "t_capture": self.t_capture,
            "accepted": self.accepted,
            "mask_fraction": round(float(self.mask_fraction), 6),
            "grade": self.grade,
            "probabilities": None if self.probabilities is None else [round(float(p), 6) for p in self.probabilities],
            "latency_ms": {k: round(float(v), 4) for k, v in self.latency_ms.items()},
            "error": self.error,
        }
