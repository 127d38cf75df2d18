"""The whole pipeline at the size of the original study: wall time and peak RSS per command.

Writes a seed-size core-exp tree (9 datasets x 75 configurations x 2000 samples = 1.35M
samples, every decode pass in ``T_decode_per_step``, ~1 GB of JSON) and runs every command
on it as a user would, each in its own process: ``inspect``, ``train``, ``evaluate
--baselines``, ``plot``, ``report`` (when the installed latkit has it), ``export``, a
1M-row ``predict`` and ``recalibrate --samples 25``. For each it prints the wall time and
the peak resident memory of the command's process (``wait4``'s ``ru_maxrss``).

Targets (DESIGN.md): every command <= 6 GB peak RSS, the whole pipeline <= 12 minutes on
2 CPU cores. The loader's Parquet cache lives in the work directory: ``inspect`` parses
every file, the later commands read the cache (as train/evaluate/plot/export of one
results directory do for a user).

    python benchmarks/scale.py                  # full size (~10 min on 2 cores)
    python benchmarks/scale.py --scale 0.02     # 40 samples per file, 20k predict rows
    python benchmarks/scale.py --work-dir /tmp/scale --keep   # reuse the tree next time

Generating the tree is not part of the pipeline's time (it is printed separately).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _common  # noqa: F401  (puts tests/ on sys.path for the synthetic generator)
import numpy as np
from synthetic import config_document, decode_pass_ms, file_name, prefill_ms, vision_ms

from toolkit.features import GRID_BLOCKS, GRID_TOP_K, TIER_CROP_RANGE, TIERS
from toolkit.profiler.datasets import DATASETS, LengthDist

FULL_SAMPLES_PER_CONFIG = 2000
FULL_PREDICT_ROWS = 1_000_000
RUNS_PER_PASS = 2
NOISE = 0.03
RSS_TARGET_GB = 6.0
WALL_TARGET_S = 12 * 60.0
#: Bump when the generated tree changes: a kept work directory is then rewritten.
TREE_VERSION = 2


# -- the tree ------------------------------------------------------------------------------


def _lengths(rng: np.random.Generator, dist: LengthDist, n: int) -> np.ndarray:
    """``n`` draws of ``dist`` at once (``LengthDist.draw`` draws one)."""
    values = np.round(dist.median * np.exp(dist.sigma * rng.standard_normal(n)))
    return np.clip(values, dist.low, dist.high).astype(np.int64)


def _file_records(
    rng: np.random.Generator, dataset: str, tier: str, top_k: int, blocks: int, n: int
) -> list[dict[str, Any]]:
    """The per-sample records of one configuration file, vectorised."""
    low, high = TIER_CROP_RANGE[tier]
    crops = rng.integers(low, high + 1, n)
    vision = (crops + 1) * 144
    profile = DATASETS[dataset]
    text = _lengths(rng, profile.prompt_tokens, n)
    output = _lengths(rng, profile.answer_tokens, n) + 1  # EOS
    passes = output - 1
    # Every decode pass of every sample, flattened: pass k of sample i attends over
    # prompt + k tokens.
    first = np.repeat(np.cumsum(passes) - passes, passes)
    k = np.arange(passes.sum()) - first + 1
    kv = np.repeat(vision + text, passes) + k
    runs = decode_pass_ms(top_k, blocks, kv)[:, None] * (
        1 + NOISE * rng.standard_normal((kv.size, RUNS_PER_PASS))
    )
    runs = np.round(runs, 4)
    starts = np.cumsum(passes) - passes
    decode = np.add.reduceat(runs.mean(axis=1), starts) if runs.size else np.zeros(n)
    decode = np.where(passes > 0, decode, 0.0)
    t_vision = np.array([vision_ms(int(c)) for c in range(high + 1)])[crops]
    t_prefill = np.frompyfunc(lambda v, t: prefill_ms(v, t, top_k, blocks), 2, 1)(vision, text)
    t_vision = np.round(t_vision * (1 + NOISE * rng.standard_normal(n)), 4)
    t_prefill = np.round(t_prefill.astype(np.float64) * (1 + NOISE * rng.standard_normal(n)), 4)
    decode = np.round(decode, 4)
    total = np.round(t_vision + t_prefill + decode, 4)
    per_token = np.round(np.where(passes > 0, decode / np.maximum(passes, 1), 0.0), 4)
    steps = runs.tolist()
    offsets = np.concatenate([[0], np.cumsum(passes)]).tolist()
    columns = zip(
        crops.tolist(),
        vision.tolist(),
        text.tolist(),
        output.tolist(),
        t_vision.tolist(),
        t_prefill.tolist(),
        decode.tolist(),
        total.tolist(),
        per_token.tolist(),
        strict=True,
    )
    records = []
    for i, (c, v, t, o, tv, tp, td, tt, tpt) in enumerate(columns):
        records.append(
            {
                "sample_id": i,
                "tier": tier,
                "top_k": top_k,
                "num_active_blocks": blocks,
                "output_tokens": o,
                "content_tokens": o - 1,
                "ends_with_eos": True,
                "actual_num_crops": c,
                "target_vision_tokens": v,
                "actual_vision_tokens": v,
                "actual_text_tokens": t,
                "total_sequence_length": v + t,
                "accuracy": 1.0,
                "pred": "a short answer to the question",
                "metadata": {
                    "question": f"Question {i}: what is shown in this image, and what does "
                    "the text in it say?",
                    "answers": ["a short answer"],
                },
                "T_vision_total": tv,
                "T_LLM_prefill": tp,
                "T_LLM_decode": td,
                "T_total": tt,
                "T_decode_per_token": tpt,
                "T_decode_per_step": steps[offsets[i] : offsets[i + 1]],
            }
        )
    return records


def write_tree(root: Path, samples_per_config: int, seed: int = 0) -> tuple[int, int, int]:
    """Write the tree (one file at a time: memory stays at one file's records).

    Returns (files, samples, decode passes)."""
    rng = np.random.default_rng(seed)
    n_files = n_samples = n_passes = 0
    for dataset in DATASETS:
        folder = root / dataset.replace("_", "-")
        folder.mkdir(parents=True, exist_ok=True)
        for tier in TIERS:
            for top_k in GRID_TOP_K:
                for blocks in GRID_BLOCKS:
                    records = _file_records(rng, dataset, tier, top_k, blocks, samples_per_config)
                    document = config_document(records, tier, top_k, blocks)
                    mean_crops = document["selected_crops_mean"]
                    path = folder / file_name(dataset, tier, mean_crops, top_k, blocks)
                    path.write_text(json.dumps(document))
                    n_files += 1
                    n_samples += len(records)
                    n_passes += sum(len(r["T_decode_per_step"]) for r in records)
    return n_files, n_samples, n_passes


def write_predict_input(path: Path, rows: int, seed: int = 1) -> None:
    """A batch of ``rows`` queries over the grid (Parquet)."""
    import polars as pl

    rng = np.random.default_rng(seed)
    tier = rng.integers(0, 3, rows)
    crops = np.array([TIER_CROP_RANGE[t] for t in TIERS])
    n_crops = rng.integers(crops[tier, 0], crops[tier, 1] + 1)
    pl.DataFrame(
        {
            "vision_tokens": (n_crops + 1) * 144,
            "text_tokens": rng.integers(20, 120, rows),
            "tier": tier,
            "top_k": rng.choice(GRID_TOP_K, rows),
            "num_active_blocks": rng.choice(GRID_BLOCKS, rows),
            "output_tokens": rng.integers(1, 41, rows),
        }
    ).write_parquet(path)


def prepare_tree(work: Path, samples_per_config: int) -> dict[str, Any]:
    """The results tree under ``work/results``, written unless a matching one is there."""
    marker = work / "tree.json"
    wanted = {"version": TREE_VERSION, "samples_per_config": samples_per_config}
    if marker.is_file():
        info: dict[str, Any] = json.loads(marker.read_text())
        if {k: info.get(k) for k in wanted} == wanted:
            print(f"Reusing the tree in {work / 'results'}", flush=True)
            return info
    shutil.rmtree(work / "results", ignore_errors=True)
    shutil.rmtree(work / "cache", ignore_errors=True)
    started = time.perf_counter()
    n_files, n_samples, n_passes = write_tree(work / "results", samples_per_config)
    n_bytes = sum(p.stat().st_size for p in (work / "results").rglob("*.json"))
    info = {
        **wanted,
        "files": n_files,
        "samples": n_samples,
        "decode_passes": n_passes,
        "bytes": n_bytes,
        "write_s": time.perf_counter() - started,
    }
    marker.write_text(json.dumps(info))
    return info


# -- running the commands -------------------------------------------------------------------


@dataclass
class Run:
    name: str
    argv: list[str]
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_gb: float = 0.0
    returncode: int | None = None


def run_measured(run: Run, env: dict[str, str], log_path: Path) -> None:
    """Run ``run.argv``; record its wall and CPU time and its process's peak RSS (ru_maxrss;
    CPU time says how busy the command kept the cores, whatever else the machine ran)."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(run.argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    run.wall_s = time.perf_counter() - started
    run.cpu_s = usage.ru_utime + usage.ru_stime
    run.peak_rss_gb = usage.ru_maxrss * 1024 / 1e9  # Linux: kilobytes
    run.returncode = os.waitstatus_to_exitcode(status)
    process.returncode = run.returncode  # reaped by wait4: keep Popen from waiting again


def latkit_argv(*args: str) -> list[str]:
    """``latkit ARGS`` with this interpreter (the benchmark's environment's latkit)."""
    return [sys.executable, "-c", "from toolkit.cli import main; main()", *args]


def has_command(name: str, env: dict[str, str]) -> bool:
    """Whether the installed latkit has ``name`` (``report`` arrives in a later branch)."""
    done = subprocess.run(latkit_argv(name, "--help"), capture_output=True, env=env)
    return done.returncode == 0


def pipeline(work: Path, predict_rows: int, env: dict[str, str]) -> Iterator[Run]:
    results, checkpoint = str(work / "results"), str(work / "checkpoint")
    yield Run("inspect", latkit_argv("inspect", "--results-dir", results))
    yield Run(
        "train",
        latkit_argv(
            "train", "--results-dir", results, "--use-all-datasets", "--output-dir", checkpoint
        ),
    )
    selection = ["--checkpoint", checkpoint, "--results-dir", results, "--use-all-datasets"]
    yield Run(
        "evaluate --baselines",
        latkit_argv(
            "evaluate", *selection, "--baselines", "--output-file", str(work / "evaluation.json")
        ),
    )
    yield Run("plot", latkit_argv("plot", *selection, "--output-dir", str(work / "plots")))
    if has_command("report", env):
        yield Run(
            "report", latkit_argv("report", *selection, "--output-file", str(work / "report.html"))
        )
    yield Run(
        "export",
        latkit_argv("export", "--checkpoint", checkpoint, "--output-dir", str(work / "exported")),
    )
    yield Run(
        f"predict ({predict_rows:,} rows)",
        latkit_argv(
            "predict",
            "--checkpoint",
            checkpoint,
            "--input-file",
            str(work / "predict_in.parquet"),
            "--output-file",
            str(work / "predict_out.parquet"),
        ),
    )
    yield Run(
        "recalibrate --samples 25",
        latkit_argv(
            "recalibrate",
            "--checkpoint",
            checkpoint,
            "--results-dir",
            results,
            "--samples",
            "25",
            "--output-dir",
            str(work / "recalibrated"),
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="fraction of the full size: samples per file and predict rows (default 1.0: "
        "2000 samples per file, 1M rows)",
    )
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="where the tree and outputs go (default: temp)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep --work-dir (and reuse its tree next time)"
    )
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated commands to run (e.g. evaluate,plot; with --work-dir, later "
        "commands reuse the checkpoint an earlier run left there)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 1:
        parser.error("--scale must be in (0, 1]")
    samples_per_config = max(1, round(FULL_SAMPLES_PER_CONFIG * args.scale))
    predict_rows = max(1000, round(FULL_PREDICT_ROWS * args.scale))

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="latkit-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        info = prepare_tree(work, samples_per_config)
        write_predict_input(work / "predict_in.parquet", predict_rows)
        print(
            f"Tree: {len(DATASETS)} datasets x 75 configurations x {samples_per_config} samples "
            f"= {info['samples']:,} samples, {info['decode_passes']:,} decode passes, "
            f"{info['files']} files, {info['bytes'] / 1e9:.2f} GB of JSON "
            f"(written in {info['write_s']:.0f} s); predict input: {predict_rows:,} rows",
            flush=True,
        )
        env = {**os.environ, "LATKIT_CACHE_DIR": str(work / "cache")}
        env.pop("LATKIT_NO_PROGRESS", None)
        runs: list[Run] = []
        only = set(args.only.split(",")) if args.only else None
        for run in pipeline(work, predict_rows, env):
            if only is not None and run.name.split()[0] not in only:
                continue
            log_path = work / f"{run.name.split()[0]}.log"
            run_measured(run, env, log_path)
            runs.append(run)
            print(
                f"{run.name:<28}{run.wall_s:>8.1f} s wall{run.cpu_s:>8.1f} s CPU"
                f"{run.peak_rss_gb:>8.2f} GB"
                f"{'' if run.returncode == 0 else f'   exit {run.returncode}, see {log_path}'}",
                flush=True,
            )
            if run.returncode != 0:
                print(log_path.read_text()[-3000:], file=sys.stderr)
        return report(runs)
    finally:
        if args.work_dir is None or not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def report(runs: list[Run]) -> int:
    total = sum(r.wall_s for r in runs)
    worst = max(runs, key=lambda r: r.peak_rss_gb)
    failed = [r.name for r in runs if r.returncode != 0]
    cpu = sum(r.cpu_s for r in runs)
    print("\n| command | wall | CPU | peak RSS |\n|---|---|---|---|")
    for run in runs:
        print(
            f"| `{run.name}` | {run.wall_s:.1f} s | {run.cpu_s:.1f} s | {run.peak_rss_gb:.2f} GB |"
        )
    print(
        f"| whole pipeline | {total:.0f} s ({total / 60:.1f} min) | {cpu:.0f} s | "
        f"{worst.peak_rss_gb:.2f} GB |"
    )
    rss_ok = worst.peak_rss_gb <= RSS_TARGET_GB
    wall_ok = total <= WALL_TARGET_S
    print(
        f"\npeak RSS {worst.peak_rss_gb:.2f} GB ({worst.name}) vs target {RSS_TARGET_GB:g} GB: "
        f"{'ok' if rss_ok else 'OVER'}; whole pipeline {total / 60:.1f} min vs target "
        f"{WALL_TARGET_S / 60:g} min: {'ok' if wall_ok else 'OVER'}"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    return 0 if not failed and rss_ok else 1


if __name__ == "__main__":
    sys.exit(main())
