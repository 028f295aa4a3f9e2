"""Latency of one model session on fixed inputs: warm-up runs, then timed runs."""

from __future__ import annotations

import time

import numpy as np


def measure(session, feeds: dict[str, np.ndarray], *, runs: int = 20, warmup: int = 3) -> dict:
    """Time ``session.run(feeds)``; returns p50/p95/min/max in milliseconds and the run count.

    Feeds are checked and cast once before timing, so the numbers are inference only.
    """
    if runs < 1:
        raise ValueError("runs must be at least 1")
    prepare = getattr(session, "_prepare", None)
    if prepare is not None:
        feeds = prepare(feeds)
    for _ in range(max(warmup, 0)):
        session.run(feeds)
    times = np.empty(runs, dtype=np.float64)
    clock = time.perf_counter
    for i in range(runs):
        start = clock()
        session.run(feeds)
        times[i] = clock() - start
    times *= 1000.0
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p95_ms": float(np.percentile(times, 95)),
        "min_ms": float(times.min()),
        "max_ms": float(times.max()),
        "runs": int(runs),
    }
