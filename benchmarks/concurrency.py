"""One predictor shared by a service's threads: every answer right, and throughput per thread.

1, 2 and 4 threads share one ``exporters.runtime.LatencyPredictor`` and ask seeded questions
at batch 1 (one configuration per request) and at batch 75 (a controller scoring the whole
knob grid, 3 tiers x 5 top_k x 5 blocks, for one request), through ``run`` (the hot path,
validated float32 arrays) and ``predict`` (validation and range flags first, what a service
calls). Every answer is compared with the single-threaded one, bit for bit: wrong answers
must be 0. Printed: questions/s (a batch-75 question counts once), the scaling against one
thread in the same run, and where a call's time goes (inside ONNX Runtime, which releases the
GIL, against the Python around it, which holds it: the ceiling on what threads can add).

Then the C++ figure: the examples/cpp executable's ``--threads`` self-check (its own
single-threaded pass and N threads sharing one ``Predictor``, same process), when built
(``examples/cpp/build.sh``).

    python benchmarks/concurrency.py [--checkpoint DIR] [--questions 20000] [--rounds 3]

Threads add throughput only where cores are free: run it with at least two idle cores
(``taskset -c 0,1``) for a scaling figure; on one core it measures what threads cost.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import _common  # noqa: F401  (puts tests/ on sys.path)
import numpy as np
from predictor_speed import CPP_BUILD, BoundCall, exported_model, queries
from threads import on_threads, same

from exporters.runtime import LatencyPredictor

THREADS = (1, 2, 4)
BATCHES = (1, 75)


def per_call_us(func: Callable[[], object], calls: int) -> float:
    """Median µs of ``calls`` calls on this thread, after a warm-up."""
    for _ in range(min(calls, 500)):
        func()
    times = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        func()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


def row(
    runtime: str, api: str, batch: int, threads: int, wrong: object, qps: float, one: float
) -> str:
    return (
        f"{runtime:<7} {api:<8} {batch:>5} {threads:>7} {wrong!s:>6} {qps:>12,.0f} "
        f"{qps * batch:>12,.0f} {qps / one:>10.2f}x"
    )


def python_rows(
    predictor: LatencyPredictor, x: np.ndarray, n: np.ndarray, batch: int, rounds: int
) -> list[str]:
    """Wrong answers, questions/s and scaling of ``run`` and ``predict`` at ``batch``."""
    items = [(x[i : i + batch], n[i : i + batch]) for i in range(0, len(n), batch)]
    lines = []
    calls: dict[str, Callable[[tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]] = {
        "run": lambda q: predictor.run(*q),
        "predict": lambda q: predictor.predict(*q),
    }
    for api, call in calls.items():
        want = [call(q) for q in items]
        seconds: dict[int, list[float]] = {t: [] for t in THREADS}
        wrong = dict.fromkeys(THREADS, 0)
        for _ in range(rounds):  # thread counts alternate, so that load drift hits all alike
            for n_threads in THREADS:
                got, raised, elapsed = on_threads(n_threads, items, call)
                if raised:
                    raise raised[0]
                wrong[n_threads] += sum(not same(g, w) for g, w in zip(got, want, strict=True))
                seconds[n_threads].append(elapsed)
        qps = {t: len(items) / statistics.median(s) for t, s in seconds.items()}
        lines += [row("python", api, batch, t, wrong[t], qps[t], qps[1]) for t in THREADS]
    return lines


def where_the_time_goes(
    predictor: LatencyPredictor, model: bytes, x: np.ndarray, n: np.ndarray
) -> None:
    """Per call on one thread: inside ONNX Runtime's Run (GIL released; ``model`` on bound
    buffers) and the rest (GIL held), and the most two threads on two free cores can then
    give: calls overlap only inside Run, the GIL-held parts run one at a time."""
    print("\nwhere a call's time goes (one thread, medians; Amdahl ceiling for 2 threads):")
    for batch in BATCHES:
        xb, nb = x[:batch], n[:batch]
        inside = per_call_us(BoundCall(model, xb, nb), 5000)
        for api in ("run", "predict"):
            total = per_call_us(functools.partial(getattr(predictor, api), xb, nb), 5000)
            held = max(total - inside, 0.0)
            ceiling = total / max(held, total / 2)
            print(
                f"  {api:<8} batch {batch:>3}: {total:6.1f} µs per call, {inside:5.1f} inside "
                f"ONNX Runtime (GIL released), {held:5.1f} in Python (GIL held): 2 threads "
                f"at most {ceiling:.2f}x"
            )


def cpp_rows(model_path: Path, questions: int) -> list[str]:
    """The C++ example's --threads self-check at each batch and thread count."""
    binary = CPP_BUILD / "latkit_predict_ort"
    if not binary.exists():
        return ["c++: examples/cpp not built (examples/cpp/build.sh): no C++ figure"]
    lines = []
    for batch in BATCHES:
        for n_threads in THREADS[1:]:
            done = subprocess.run(
                [
                    str(binary),
                    str(model_path),
                    "--threads",
                    str(n_threads),
                    "--batch",
                    str(batch),
                    "--questions",
                    str(questions if batch == 1 else max(1, questions // 4)),
                ],
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            line = next((ln for ln in done.stderr.splitlines() if "self-check" in ln), None)
            if line is None:
                return [f"c++: self-check failed: {done.stderr.strip()[-300:]}"]
            f = dict(part.split("=", 1) for part in line.split() if "=" in part)
            single, threaded = float(f["single_thread_qps"]), float(f["threads_qps"])
            if n_threads == THREADS[1]:  # its single-threaded pass: the 1-thread row
                lines.append(row("c++", "run", batch, 1, "", single, single))
            lines.append(row("c++", "run", batch, n_threads, f["wrong"], threaded, single))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument(
        "--questions", type=int, default=20000, help="batch-1 questions per measurement"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the thread counts")
    parser.add_argument("--no-cpp", action="store_true", help="skip the C++ executable")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")

    with tempfile.TemporaryDirectory() as tmp:
        model, onnx_path, _, summary = exported_model(args.checkpoint, Path(tmp))
        print(summary)
        cpus = len(os.sched_getaffinity(0))
        if cpus < 2:
            print(f"NOTE: {cpus} CPU for this process: threads cannot add throughput here")
        predictor = LatencyPredictor(onnx_path, on_out_of_range="flag")
        print(
            f"\n{'runtime':<7} {'call':<8} {'batch':>5} {'threads':>7} {'wrong':>6} "
            f"{'questions/s':>12} {'rows/s':>12} {'x 1 thread':>11}"
        )
        for batch in BATCHES:
            n_questions = args.questions if batch == 1 else max(1, args.questions // 4)
            x, n = queries(model, n_questions * batch, 64, seed=batch)
            for line in python_rows(predictor, x, n, batch, args.rounds):
                print(line)
        if not args.no_cpp:
            for line in cpp_rows(onnx_path, args.questions):
                print(line)
        x, n = queries(model, max(BATCHES), 64, seed=0)
        where_the_time_goes(predictor, onnx_path.read_bytes(), x, n)


if __name__ == "__main__":
    main()
