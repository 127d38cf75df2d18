"""Helpers shared by the benchmarks: timing and the synthetic data generator."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# The benchmarks reuse the tests' seeded generator of core-exp results.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def best_of(func: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(best, median) wall time in seconds over ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)
