"""Helpers shared by the benchmarks: timing, the synthetic data generator, the splits."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def split_parts(samples: Any, split: str, seed: int) -> tuple[Any, Any]:
    """(profiled, held-out) samples of a DESIGN.md split: ``sample`` holds out a seeded 20 %
    of the samples, the knob splits their never-profiled configurations."""
    from toolkit.training import knob_split, split_samples

    if split == "sample":
        return split_samples(samples, "sample", 0.2, seed)
    return knob_split(samples, split)
