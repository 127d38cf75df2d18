"""Profiling throughput: the same sweep in one process and on Ray, in one run.

Runs ``latkit profile`` twice as a user would (each a fresh process, so both pay their own
imports), on the same settings and seed: once in one process, once with
``--ray local --workers N``, which starts Ray on this machine, builds the model in N
``ProfileWorker`` actors and shuts Ray down again; all of that is inside its wall time.
Prints both wall times, their ratio, Ray's start-up (Ray and the workers up, from the run
log) and checks that both wrote the same files. Target (DESIGN.md): ~N x on N workers; on
a 2-core machine with 2 workers, >= 1.4x with the start-up included.

It also splits each command into measuring and everything else (from both run logs) and
prints the ceiling: the speed-up the Ray command would reach if its measuring scaled
perfectly (one process's measuring / N) while its fixed cost stayed what it was. When the
ceiling is under a target, no scheduling can meet it; only a smaller fixed cost (Ray, the
workers' imports) or a longer sweep can.

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
    single_logs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="latkit-scaling-") as tmp:
        for round_index in range(args.rounds):
            single_dir = Path(tmp) / f"single{round_index}"
            ray_dir = Path(tmp) / f"ray{round_index}"
            runs = [("single", single_dir, []), ("ray", ray_dir, on_ray)]
            for name, out, extra in runs if round_index % 2 == 0 else runs[::-1]:
                wall = run_cli(["profile", "--output-dir", str(out), *sweep, *extra])
                (single_s if name == "single" else ray_s).append(wall)
            logs.append(_engine(ray_dir))
            single_logs.append(_engine(single_dir))
            files = result_names(single_dir)
            if files != result_names(ray_dir):
                raise SystemExit("the two sweeps wrote different files")
    best = min(range(args.rounds), key=lambda i: ray_s[i])
    fastest = min(range(args.rounds), key=lambda i: single_s[i])
    engine, single = logs[best], single_logs[fastest]
    samples = len(files) * args.samples_per_config
    print(
        f"sweep: preset {args.preset}, {len(files)} files x {args.samples_per_config} samples "
        f"= {samples} samples, --repeats {args.repeats}, seed {args.seed}; same files: yes"
    )
    one_wall, ray_wall = single_s[fastest], ray_s[best]
    one_measuring = single["elapsed_s"] - single["startup_s"]
    ray_measuring = engine["wall_s"] - engine["startup_s"]
    print(f"one process:     {one_wall:6.1f} s wall  (all: {_fmt(single_s)})")
    print(
        f"  of which start-up {single['startup_s']:.1f} s (model built), measuring "
        f"{one_measuring:.1f} s, and {one_wall - single['elapsed_s']:.1f} s outside the sweep "
        "(imports, exit)"
    )
    print(f"Ray, {args.workers} workers:  {ray_wall:6.1f} s wall  (all: {_fmt(ray_s)})")
    print(
        f"  of which start-up {engine['startup_s']:.1f} s (Ray up, {args.workers} workers' "
        f"models built), measuring {ray_measuring:.1f} s, and "
        f"{ray_wall - engine['wall_s']:.1f} s outside the sweep (imports, Ray shutdown, exit)"
    )
    print(
        f"measuring alone: {one_measuring / ray_measuring:.2f}x on {args.workers} workers; "
        f"fixed cost (all but measuring): one process {one_wall - one_measuring:.1f} s, "
        f"Ray {ray_wall - ray_measuring:.1f} s"
    )
    ceiling = one_wall / (ray_wall - ray_measuring + one_measuring / args.workers)
    paired = ", ".join(f"{one / on_ray:.2f}x" for one, on_ray in zip(single_s, ray_s, strict=True))
    print(
        f"speed-up, whole commands: {one_wall / ray_wall:.2f}x (start-up included; "
        f"each round's pair: {paired})"
    )
    print(f"ceiling with measuring scaled {args.workers}x and this fixed cost: {ceiling:.2f}x")
    print(f"restarts: {engine['restarts']}; load after: {os.getloadavg()[0]:.2f}")


def _engine(root: Path) -> dict[str, Any]:
    """The ``engine`` section of a sweep's run log, with the sweep's elapsed time."""
    log = json.loads((root / "logs" / "run.json").read_text())
    return {**log["engine"], "elapsed_s": log["elapsed_s"]}


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


if __name__ == "__main__":
    main()
