"""Write a SIMULATED, GPU-shaped sweep in the core-exp format (precise data, ~1 % noise).

Both bundled sweeps are CPU measurements whose identical work scatters by 8-17 %; on them no
model can show whether it would reach the ~1 % of a GPU. This writes the MolmoE-1B knob grid
as an H100-like roofline would time it (``benchmarks/gpu_roofline.py``: wave and tile
quantisation, the MoE's memory- to compute-bound crossover, attention quadratic in the
prompt, launch overheads, decode passes linear in the KV cache), with multiplicative
log-normal noise of ``--noise`` (1 %) per stage and run, and each decode pass jittered by
the same again. The samples (crops, prompt and answer lengths of the nine datasets, file
names, sample ids) are exactly those ``latkit profile --samples-per-config N --seed S`` would
measure (``toolkit.profiler.sweep.plan_jobs``), written by the profiler's own writer.

**It is a simulation, not a measurement**: every file carries a ``simulation`` block, every
sample ``metadata.simulated = true``, and ``logs/run.json`` says so. Never bundle it as data.

    python benchmarks/precise_sweep.py [--output-dir DIR] [--samples-per-config 6]
        [--repeats 1] [--noise 0.01] [--seed 0] [--gzip] [--device h100|a100]
        [--datasets coco_caption --output-tokens 128-448]

``--output-tokens LO-HI`` draws every answer's length uniformly in [LO, HI], as ``latkit
profile --output-tokens`` does: a long-answer sweep with the same noise model as the
default one (``benchmarks/accuracy.py`` scores the precise model on one).

Without ``--output-dir`` it writes into a new temporary directory and prints its path.
Default: 9 datasets x 75 configurations x 6 samples = 4050 samples, in a few seconds.
With one run per sample (the default), the noise floor comes from samples that repeat
identical work (same configuration, crops and prompt length; ~1/3 of the samples), as
``reports.evaluation.noise_floor`` measures it; ``--repeats R`` also times every sample R
times (files hold medians, as the profiler's do) and records the spread of the repeats.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import zlib
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_roofline

from toolkit.atomic import write_json_atomic
from toolkit.features import VISION_TOKENS_PER_CROP
from toolkit.profiler.datasets import parse_datasets, parse_output_tokens
from toolkit.profiler.sweep import Job, ProfileSettings, plan_jobs
from toolkit.profiler.timing import SampleTiming
from toolkit.profiler.writer import noise_records, noise_summary, result_document, write_result

log = logging.getLogger(__name__)

#: What every file, sample and log of the sweep says about itself.
SIMULATION_NOTE = (
    "SIMULATED data, not a measurement: benchmarks/precise_sweep.py, a roofline of MolmoE-1B "
    "on a simulated GPU (benchmarks/gpu_roofline.py) with multiplicative noise"
)


def _simulate_job(
    job: Job, device: gpu_roofline.Device, repeats: int, noise: float, seed: int
) -> tuple[list[SampleTiming], dict[str, list[float]]]:
    """Timings (ms) of one file's samples: the roofline times noise per stage and run."""
    rng = np.random.default_rng(
        [seed, zlib.crc32(job.dataset.encode()), job.config_index, job.top_k, job.blocks]
    )
    timings = []
    for spec in job.specs:
        vision_tokens = (spec.num_crops + 1) * VISION_TOKENS_PER_CROP
        prompt = vision_tokens + spec.text_tokens
        vision = gpu_roofline.vision_us(spec.num_crops, device) / 1000.0
        prefill = gpu_roofline.llm_prefill_us(prompt, job.top_k, job.blocks, device) / 1000.0
        passes = spec.output_tokens - 1
        kv = prompt + np.arange(1, passes + 1)
        pass_ms = gpu_roofline.decode_pass_us(job.top_k, job.blocks, kv, device) / 1000.0
        # Per run: one factor per stage (clocks, contention), then each decode pass's own jitter.
        stage = np.exp(noise * rng.standard_normal((3, repeats)))
        jitter = np.exp(noise * rng.standard_normal((passes, repeats)))
        decode_runs = pass_ms[:, None] * stage[2][None, :] * jitter
        vision_runs = vision * stage[0]
        prefill_runs = prefill * stage[1]
        total_runs = vision_runs + prefill_runs + decode_runs.sum(axis=0)
        timings.append(
            SampleTiming(
                spec=spec,
                vision_runs=vision_runs.tolist(),
                prefill_runs=prefill_runs.tolist(),
                decode_runs=decode_runs.tolist(),
                total_runs=total_runs.tolist(),
            )
        )
    return timings, noise_records(timings)


def write_precise_sweep(
    output_dir: str | Path,
    *,
    samples_per_config: int = 6,
    repeats: int = 1,
    noise: float = 0.01,
    seed: int = 0,
    datasets: list[str] | None = None,
    gzip: bool = False,
    device: str = "h100",
    output_tokens: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Write the simulated sweep into ``output_dir``; returns its ``logs/run.json`` document."""
    if samples_per_config < 1 or repeats < 1:
        raise ValueError("samples_per_config and repeats must be at least 1")
    if device not in gpu_roofline.DEVICES:
        raise ValueError(f"device must be one of {', '.join(gpu_roofline.DEVICES)}, got {device!r}")
    if not 0.0 <= noise < 0.5:
        raise ValueError(f"noise must be a relative sigma in [0, 0.5), got {noise}")
    started = time.perf_counter()
    out = Path(output_dir)
    settings = ProfileSettings(
        output_dir=out,
        preset="molmoe-1b (simulated)",
        device="simulated",
        dtype="bfloat16",
        datasets=parse_datasets(",".join(datasets) if datasets else None),
        samples_per_config=samples_per_config,
        repeats=repeats,
        seed=seed,
        gzip=gzip,
        progress=False,
        output_tokens=output_tokens,
    )
    plan, _ = plan_jobs(settings, out)
    gpu, model = gpu_roofline.DEVICES[device], gpu_roofline.MODEL
    simulation = {
        "note": SIMULATION_NOTE,
        "device": asdict(gpu),
        "model": {
            **model.to_dict(),
            "expert_popularity_sigma": gpu_roofline.EXPERT_POPULARITY_SIGMA,
        },
        "noise_sigma_per_stage_and_run": noise,
        "noise_sigma_per_decode_pass": noise,
    }
    records: dict[str, dict[str, list[float]]] = {}
    n_samples = 0
    for job in plan:
        timings, job_records = _simulate_job(job, gpu, repeats, noise, seed)
        metadata = [{"simulated": True, "device": gpu.name}] * len(timings)
        document = result_document(
            job.tier, job.top_k, job.blocks, model.num_layers, timings, metadata
        )
        document["simulation"] = {"note": SIMULATION_NOTE}
        job.path.parent.mkdir(parents=True, exist_ok=True)
        write_result(job.path, document)
        records[str(job.path.relative_to(out))] = job_records
        n_samples += len(timings)
    merged: dict[str, list[float]] = {}
    for per_file in records.values():
        for key, values in per_file.items():
            merged.setdefault(key, []).extend(values)
    run_log: dict[str, Any] = {
        "status": "complete",
        "simulated": True,
        "note": SIMULATION_NOTE,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "elapsed_s": round(time.perf_counter() - started, 1),
        "command": sys.argv,
        "settings": {
            "datasets": settings.datasets,
            "tiers": settings.tiers,
            "top_k": settings.top_k,
            "blocks": settings.blocks,
            "samples_per_config": samples_per_config,
            "repeats": repeats,
            "noise": noise,
            "seed": seed,
            "gzip": gzip,
            "device": device,
            "output_tokens": list(output_tokens) if output_tokens else None,
        },
        "simulation": simulation,
        "files": {"planned": len(plan), "written": len(plan)},
        "samples": n_samples,
        # Spread of each sample's repeated runs (empty with one run per sample).
        "noise_floor": noise_summary(merged) if repeats > 1 else {},
    }
    write_json_atomic(out / "logs" / "run.json", run_log, indent=1)
    return run_log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, help="default: a new temporary directory")
    parser.add_argument("--samples-per-config", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=1, help="runs per sample (medians kept)")
    parser.add_argument("--noise", type=float, default=0.01, help="log-normal sigma per stage")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--datasets", help="comma-separated (default: all nine)")
    parser.add_argument("--gzip", action="store_true")
    parser.add_argument(
        "--device", choices=sorted(gpu_roofline.DEVICES), default="h100", help="simulated GPU"
    )
    parser.add_argument(
        "--output-tokens", metavar="LO-HI", help="answer lengths drawn uniformly in [LO, HI]"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = args.output_dir or Path(tempfile.mkdtemp(prefix="latkit-precise-sweep-"))
    run_log = write_precise_sweep(
        out,
        samples_per_config=args.samples_per_config,
        repeats=args.repeats,
        noise=args.noise,
        seed=args.seed,
        datasets=args.datasets.split(",") if args.datasets else None,
        gzip=args.gzip,
        device=args.device,
        output_tokens=parse_output_tokens(args.output_tokens),
    )
    print(
        f"SIMULATED sweep (not a measurement): {run_log['samples']} samples in "
        f"{run_log['files']['written']} files, {run_log['elapsed_s']} s -> {out}"
    )


if __name__ == "__main__":
    main()
