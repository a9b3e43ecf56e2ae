"""The one percentile summary of latencies, for the bench, the study summary and the self-test, and the bounded-memory
sketch of a long run's values (`LatencySketch`: the study summary's latencies, the kidney sizes)."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def percentiles(values) -> dict[str, float]:
    """p50, p95, p99 and max (ms) of the finite values (numpy's linear interpolation); NaN for each when there is
    none."""
    a = np.asarray(values, dtype=np.float64).ravel()
    a = a[np.isfinite(a)]
    if a.size == 0:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    p50, p95, p99 = np.percentile(a, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99), "max_ms": float(a.max())}

class LatencySketch:
    """One stage's latencies (ms) in bounded memory, for p50/p95/p99/max.

    The first `exact` values are kept as they are (float64) and give numpy's percentiles exactly. Past that they
    move into a histogram of fixed, logarithmic bins (DDSketch's, Masson et al., VLDB 2019): bin k holds the values
    in (LOW * GAMMA**(k-1), LOW * GAMMA**k] and stands for them with the one value within RELATIVE_ERROR of all of
    them, so each order statistic, and numpy's linear interpolation between two of them, comes back within
    RELATIVE_ERROR (0.5 %) of its exact value; values at or below LOW (0.1 us) within LOW; `max` and `min` stay
    exact and bound every estimate. Non-finite values are left out, as runtime.stats.percentiles leaves them. The
    cost is fixed: about 18 KB of bins (plus 16 KB until the switch) whatever the number of values.
    """

    RELATIVE_ERROR = 0.005
    GAMMA = (1 + RELATIVE_ERROR) / (1 - RELATIVE_ERROR)
    LOW, HIGH = 1e-4, 1e6          # ms: 0.1 us .. 16.7 min; below LOW one bin (absolute error LOW), above HIGH one
    _LN_GAMMA = math.log(GAMMA)
    BINS = int(math.ceil(math.log(HIGH / LOW) / _LN_GAMMA)) + 2   # [0]: <= LOW, [1..BINS-2]: logarithmic, [-1]: > HIGH

    def __init__(self, exact: int = 2048) -> None:
        self._exact = exact
        self._values: np.ndarray | None = np.empty(min(64, exact), np.float64)
        self._counts: np.ndarray | None = None
        self.n = 0
        self.min = math.inf
        self.max = -math.inf

    def add(self, v: float) -> None:
        if not math.isfinite(v):
            return
        self.min, self.max = min(self.min, v), max(self.max, v)
        if self._values is not None:
            if self.n == self._values.size:
                if self.n >= self._exact:
                    self._to_bins()
                    return self.add_to_bins(v)
                self._values = np.concatenate([self._values, np.empty(min(self.n, self._exact - self.n))])
            self._values[self.n] = v
            self.n += 1
        else:
            self.add_to_bins(v)

    def add_to_bins(self, v: float) -> None:
        if v <= self.LOW:
            k = 0
        elif v > self.HIGH:
            k = self.BINS - 1
        else:
            k = min(self.BINS - 2, max(1, math.ceil(math.log(v / self.LOW) / self._LN_GAMMA)))
        self._counts[k] += 1
        self.n += 1

    def _to_bins(self) -> None:
        values, n = self._values[:self.n], self.n
        self._values, self._counts, self.n = None, np.zeros(self.BINS, np.int64), 0
        for v in values.tolist():
            self.add_to_bins(v)
        assert self.n == n

    @property
    def exact(self) -> bool:
        """Whether the values are still kept as they are (the percentiles are then numpy's, exactly)."""
        return self._values is not None

    def values(self) -> np.ndarray:
        """The values kept as they are (empty once binned)."""
        return self._values[:self.n] if self._values is not None else np.empty(0)

    def _order_statistic(self, cum: np.ndarray, i: int) -> float:
        """The estimate of the i-th smallest value (0-based) from the bins' cumulative counts."""
        k = int(np.searchsorted(cum, i + 1))
        if k == 0:
            v = 0.0
        elif k == self.BINS - 1:
            v = self.max
        else:
            v = 2 * self.LOW * self.GAMMA ** k / (self.GAMMA + 1)
        return min(max(v, self.min), self.max)

    def percentiles(self) -> dict[str, float]:
        """p50/p95/p99/max in ms, rounded to 0.1 us (numpy's linear interpolation; NaN for each with no value)."""
        if self._values is not None:
            return {k.removesuffix("_ms"): round(v, 4) for k, v in percentiles(self.values()).items()}
        out = self.quantiles((50, 95, 99))
        out["max"] = round(self.max, 4)
        return out

    def quantiles(self, qs: Sequence[float]) -> dict[str, float]:
        """{"p<q>": value} for each percentile q in `qs` (numpy's linear interpolation, rounded to 0.1 us): exact
        while the values are kept as they are, within RELATIVE_ERROR once binned; NaN for each with no value."""
        if self._values is not None:
            v = self.values()
            return {f"p{q:g}": round(float(np.percentile(v, q)), 4) if v.size else math.nan for q in qs}
        cum = np.cumsum(self._counts)
        out = {}
        for q in qs:
            r = q / 100 * (self.n - 1)
            lo, frac = int(math.floor(r)), r - math.floor(r)
            a = self._order_statistic(cum, lo)
            b = self._order_statistic(cum, min(lo + 1, self.n - 1)) if frac else a
            out[f"p{q:g}"] = round(a + frac * (b - a), 4)
        return out
