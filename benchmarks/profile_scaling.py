"""Profiling throughput: the same sweep in one process and on Ray, in one run.

Runs ``latkit profile`` twice as a user would (each a fresh process, so both pay their own
imports), on the same settings and seed: once in one process, once with
``--ray local --workers N``, which starts Ray on this machine, builds the model in N
``ProfileWorker`` actors and shuts Ray down again; all of that is inside its wall time.
Prints both wall times, their ratio, Ray's start-up (Ray and the workers up, from the run
log) and checks that both wrote the same files. Target (DESIGN.md): ~N x on N workers; on
a 2-core machine with 2 workers, >= 1.4x with the start-up included.

    python benchmarks/profile_scaling.py [--workers 2] [--samples-per-config 6]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args: list[str]) -> float:
    """Wall time (s) of one ``latkit`` command in a fresh Python process."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "from toolkit.cli import main; main()", *args],
        check=True,
        env={**os.environ, "PYTHONPATH": path},
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def result_names(root: Path) -> list[str]:
    return sorted(
        f"{p.parent.name}/{p.name}" for p in root.glob("*/*.json") if p.parent.name != "logs"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--datasets", default="coco_2014_vqa,coco_caption,doc_qa")
    parser.add_argument("--tiers", default="low,medium,high")
    parser.add_argument("--top-k", default="4,12")
    parser.add_argument("--blocks", default="8,16")
    parser.add_argument("--samples-per-config", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rounds", type=int, default=1, help="pairs of runs (order alternates); best kept"
    )
    args = parser.parse_args()

    sweep = [
        "--preset", args.preset, "--device", "cpu", "--datasets", args.datasets,
        "--tiers", args.tiers, "--top-k", args.top_k, "--blocks", args.blocks,
        "--samples-per-config", str(args.samples_per_config), "--repeats", str(args.repeats),
        "--seed", str(args.seed), "--no-progress",
    ]  # fmt: skip
    on_ray = ["--ray", "local", "--workers", str(args.workers)]
    print(f"load before: {os.getloadavg()[0]:.2f} (1-min average; {os.cpu_count()} cores)")
    single_s: list[float] = []
    ray_s: list[float] = []
    logs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="latkit-scaling-") as tmp:
        for round_index in range(args.rounds):
            single_dir = Path(tmp) / f"single{round_index}"
            ray_dir = Path(tmp) / f"ray{round_index}"
            runs = [("single", single_dir, []), ("ray", ray_dir, on_ray)]
            for name, out, extra in runs if round_index % 2 == 0 else runs[::-1]:
                wall = run_cli(["profile", "--output-dir", str(out), *sweep, *extra])
                (single_s if name == "single" else ray_s).append(wall)
            logs.append(json.loads((ray_dir / "logs" / "run.json").read_text()))
            files = result_names(single_dir)
            if files != result_names(ray_dir):
                raise SystemExit("the two sweeps wrote different files")
    best = min(range(args.rounds), key=lambda i: ray_s[i])
    engine = logs[best]["engine"]
    startup, inside = engine["startup_s"], engine["wall_s"]
    samples = len(files) * args.samples_per_config
    print(
        f"sweep: preset {args.preset}, {len(files)} files x {args.samples_per_config} samples "
        f"= {samples} samples, --repeats {args.repeats}, seed {args.seed}; same files: yes"
    )
    print(f"one process:     {min(single_s):6.1f} s wall  (all: {_fmt(single_s)})")
    print(f"Ray, {args.workers} workers:  {ray_s[best]:6.1f} s wall  (all: {_fmt(ray_s)})")
    print(
        f"  of which Ray start-up {startup:.1f} s (Ray up, {args.workers} workers' models "
        f"built), measuring {inside - startup:.1f} s, and {ray_s[best] - inside:.1f} s "
        "outside the sweep (imports, Ray shutdown, exit)"
    )
    print(f"speed-up, whole commands: {min(single_s) / ray_s[best]:.2f}x (start-up included)")
    print(f"restarts: {engine['restarts']}; load after: {os.getloadavg()[0]:.2f}")


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


if __name__ == "__main__":
    main()
