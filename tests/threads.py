"""Run calls from many threads at once and compare their answers (tests and
benchmarks/concurrency.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def on_threads(
    n_threads: int, items: Sequence[Any], call: Callable[[Any], Any]
) -> tuple[list[Any], list[BaseException], float]:
    """``call`` on every item, thread t taking items t, t + n, ... (so every thread mixes
    every kind of item), all threads released at once. Returns the results in item order,
    the exceptions raised in threads, and the seconds from the release to the last join."""
    results: list[Any] = [None] * len(items)
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads + 1)

    def work(first: int) -> None:
        start.wait()
        try:
            for i in range(first, len(items), n_threads):
                results[i] = call(items[i])
        except BaseException as exc:  # handed to the caller, traceback attached
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return results, errors, time.perf_counter() - began


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """Bit for bit: same names, dtypes, shapes and bytes."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
        for k in a
    )
