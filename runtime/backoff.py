"""The one back-off of the project: how long to wait after the n-th failure in a row, doubling from a first delay
up to a maximum. The live sources reconnect with it (runtime/sources/reconnect.py: 0.5 s, 1 s, 2 s, 4 s, 5 s, ...)
and the DICOM outbox retries a destination with it (runtime/dicomnet: `retry.first_s`, `retry.max_s`)."""
from __future__ import annotations


def delay(failures: int, first: float, maximum: float, factor: float = 2.0) -> float:
    """The wait after the `failures`-th failure in a row (1, 2, ...): first * factor^(failures - 1), at most
    `maximum`; 0 before any failure."""
    if failures <= 0:
        return 0.0
    return min(float(maximum), float(first) * float(factor) ** min(failures - 1, 64))


class Backoff:
    """Delays initial, initial*factor, ... capped at maximum, counted as they are taken; `reset()` after a
    success."""

    def __init__(self, initial: float = 0.5, maximum: float = 5.0, factor: float = 2.0):
        if initial <= 0 or maximum < initial or factor < 1:
            raise ValueError("back-off needs 0 < initial <= maximum and factor >= 1")
        self.initial, self.maximum, self.factor = float(initial), float(maximum), float(factor)
        self.failures = 0

    def reset(self) -> None:
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        return delay(self.failures, self.initial, self.maximum, self.factor)
