"""The one percentile summary of latencies, for the bench, the study summary and the self-test."""
from __future__ import annotations

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
