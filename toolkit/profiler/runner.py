"""The profiling sweep: every (configuration, dataset) measured and written as it finishes."""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit import __version__
from toolkit.atomic import write_json_atomic
from toolkit.errors import LatkitError
from toolkit.features import GRID_BLOCKS, GRID_TOP_K, TIERS
from toolkit.profiler.datasets import draw_samples, parse_datasets
from toolkit.profiler.model import MolmoELike, build_model, get_preset
from toolkit.profiler.timing import SampleTiming, Timer
from toolkit.profiler.writer import (
    dataset_dir_name,
    noise_records,
    noise_summary,
    result_document,
    result_stem,
    write_result,
)

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass
class ProfileSettings:
    """Everything a sweep depends on (all of it lands in ``logs/run.json``)."""

    output_dir: Path
    preset: str = "tiny"
    device: str = "auto"
    dtype: str = "float32"
    datasets: list[str] = field(default_factory=lambda: parse_datasets(None))
    tiers: list[str] = field(default_factory=lambda: list(TIERS))
    top_k: list[int] = field(default_factory=lambda: list(GRID_TOP_K))
    blocks: list[int] = field(default_factory=lambda: list(GRID_BLOCKS))
    samples_per_config: int = 5
    repeats: int = 3
    threads: int | None = None
    max_minutes: float | None = None
    seed: int = 0
    resume: bool = False
    gzip: bool = False
    progress: bool = True


@dataclass
class ProfileReport:
    output_dir: Path
    files_written: int
    files_skipped: int
    files_remaining: int
    samples_measured: int
    stopped_early: bool
    elapsed_s: float
    noise: dict[str, Any]
    log_path: Path


def parse_int_list(text: str, what: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LatkitError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise LatkitError(f"{what}: no values given")
    return values


def parse_tiers(text: str) -> list[str]:
    tiers = [part.strip().lower() for part in text.split(",") if part.strip()]
    unknown = [tier for tier in tiers if tier not in TIERS]
    if unknown or not tiers:
        raise LatkitError(
            f"unknown tier(s) {', '.join(unknown) or text!r}: expected some of {', '.join(TIERS)}"
        )
    return tiers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LatkitError("--device cuda: no CUDA device is available (use --device cpu)")
    if name not in ("cpu", "cuda"):
        raise LatkitError(f"unknown device {name!r}: expected auto, cpu or cuda")
    return torch.device(name)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _device_info(device: torch.device) -> dict[str, Any]:
    import os

    info: dict[str, Any] = {
        "type": device.type,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["gpu_name"] = torch.cuda.get_device_name(device)
    return info


def _versions() -> dict[str, str]:
    import transformers

    return {
        "latkit": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }


def _validate(settings: ProfileSettings, num_layers: int, num_experts: int) -> None:
    parse_datasets(",".join(settings.datasets))
    parse_tiers(",".join(settings.tiers))
    if settings.dtype not in DTYPES:
        raise LatkitError(f"unknown dtype {settings.dtype!r}: expected one of {', '.join(DTYPES)}")
    bad_k = [k for k in settings.top_k if not 1 <= k <= num_experts]
    if bad_k:
        raise LatkitError(f"--top-k {bad_k}: must lie in 1-{num_experts}")
    bad_blocks = [n for n in settings.blocks if not 1 <= n <= num_layers]
    if bad_blocks:
        raise LatkitError(f"--blocks {bad_blocks}: must lie in 1-{num_layers}")
    if settings.samples_per_config < 1:
        raise LatkitError("--samples-per-config must be at least 1")
    if settings.repeats < 1:
        raise LatkitError("--repeats must be at least 1")
    if settings.threads is not None and settings.threads < 1:
        raise LatkitError("--threads must be at least 1")


def _keep_freed_memory(keep: bool = True) -> bool:
    """Ask glibc to keep freed memory instead of returning it to the OS (Linux only).

    Without it every prefill maps its large activations afresh and pays page faults in the
    kernel (a third of the CPU time of a tiny-model sweep, and most of its noise); a CUDA
    run has its caching allocator for that. ``keep=False`` restores glibc's default
    thresholds. Returns whether the setting took.
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        # glibc caps the mmap threshold at 32 MiB on 64-bit systems; 128 KiB is its default.
        mmap_ok = libc.mallopt(m_mmap_threshold, (32 << 20) if keep else (128 << 10))
        trim_ok = libc.mallopt(m_trim_threshold, (1 << 30) if keep else (128 << 10))
        return bool(mmap_ok) and bool(trim_ok)
    except (OSError, AttributeError):
        return False


def _configurations(settings: ProfileSettings) -> list[tuple[str, int, int]]:
    configs = [(t, k, n) for t in settings.tiers for k in settings.top_k for n in settings.blocks]
    # Measure configurations in a seeded random order: a slow drift of the machine (other
    # jobs, thermal state) then spreads over the grid instead of aliasing with one knob.
    order = np.random.default_rng([settings.seed, 7]).permutation(len(configs))
    return [configs[i] for i in order]


def _settings_dict(settings: ProfileSettings) -> dict[str, Any]:
    out = dataclasses.asdict(settings)
    out["output_dir"] = str(settings.output_dir)
    return out


def run_profile(
    settings: ProfileSettings, clock: Callable[[], float] = time.monotonic
) -> ProfileReport:
    """Measure the model over the knob grid and write core-experiment files into output_dir.

    ``clock`` measures elapsed time for ``--max-minutes`` and the log (tests replace it).
    The process's torch thread count and allocator settings are restored afterwards.
    """
    preset = get_preset(settings.preset)
    _validate(settings, preset.num_layers, preset.num_experts)
    device = resolve_device(settings.device)
    threads_before = torch.get_num_threads()
    kept = False
    try:
        if device.type == "cpu":
            # One thread by default: fewer contended cores give steadier timings, and the
            # thread count is a measurement condition of its own.
            torch.set_num_threads(settings.threads or 1)
            kept = _keep_freed_memory(True)
            log.debug("glibc keeps freed memory: %s", kept)
        elif settings.threads:
            torch.set_num_threads(settings.threads)
        return _run(settings, device, clock)
    finally:
        torch.set_num_threads(threads_before)
        if kept:
            _keep_freed_memory(False)


def _run(
    settings: ProfileSettings, device: torch.device, clock: Callable[[], float]
) -> ProfileReport:
    from tqdm import tqdm

    preset = get_preset(settings.preset)
    dtype = DTYPES[settings.dtype]

    out_dir = Path(settings.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "logs" / "run.json"
    started = clock()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")

    previous_records: dict[str, dict[str, list[float]]] = {}
    if settings.resume and log_path.exists():
        try:
            previous_records = json.loads(log_path.read_text()).get("noise_records", {})
        except (OSError, ValueError):
            log.warning("could not read %s: noise records of earlier runs are lost", log_path)

    # Plan the work first so that the progress bar knows the total.
    suffix = ".json.gz" if settings.gzip else ".json"
    plan = []
    skipped = 0
    for config_index, (tier, top_k, blocks) in enumerate(_configurations(settings)):
        for dataset in settings.datasets:
            # The sample ids of a configuration depend on its place in the full grid, so they
            # stay unique within a dataset however the sweep is split.
            first_id = _grid_ordinal(tier, top_k, blocks) * settings.samples_per_config
            specs = draw_samples(
                dataset, tier, top_k, blocks, settings.samples_per_config, settings.seed, first_id
            )
            mean_crops = float(np.mean([s.num_crops for s in specs]))
            stem = result_stem(dataset, tier, top_k, blocks, mean_crops)
            path = out_dir / dataset_dir_name(dataset) / (stem + suffix)
            if settings.resume and any(
                (path.parent / (stem + ext)).exists() for ext in (".json", ".json.gz")
            ):
                skipped += 1
                continue
            plan.append((config_index, tier, top_k, blocks, dataset, specs, path))

    log.info(
        "Profiling preset %s on %s (%s, %d thread(s)): %d files to measure, %d already done",
        preset.name,
        device,
        settings.dtype,
        torch.get_num_threads(),
        len(plan),
        skipped,
    )
    model: MolmoELike = build_model(preset, device, dtype, seed=settings.seed)
    timer = Timer(model, device, dtype)
    records: dict[str, dict[str, list[float]]] = dict(previous_records)

    def write_log(status: str, files_written: int) -> dict[str, Any]:
        merged: dict[str, list[float]] = {}
        for per_file in records.values():
            for key, values in per_file.items():
                merged.setdefault(key, []).extend(values)
        noise = noise_summary(merged) if merged else {}
        write_json_atomic(
            log_path,
            {
                "status": status,
                "started_at": started_at,
                "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "elapsed_s": round(clock() - started, 1),
                "command": sys.argv,
                "settings": _settings_dict(settings),
                "versions": _versions(),
                "device": _device_info(device),
                "model": {
                    "preset": preset.to_dict(),
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "experts_implementation": model.config._experts_implementation,
                    "attention_implementation": "sdpa",
                },
                "files": {
                    "planned": len(plan),
                    "written": files_written,
                    "skipped_existing": skipped,
                },
                "noise_floor": noise,
                "noise_records": records,
            },
            indent=None,
        )
        return noise

    write_log("running", 0)
    total_samples = sum(len(item[5]) for item in plan)
    written = 0
    measured = 0
    stopped = False
    discarded = 0
    warmed: set[int] = set()
    # Interleaved schedule: the files of one dataset are measured together, round by round
    # (round j times sample j of every configuration, in a fresh random order). On a shared
    # machine the load drifts over minutes; measuring one configuration after another would
    # alias that drift with the knobs (we saw top_k 12 "faster" than top_k 4), while
    # interleaving spreads it evenly over all configurations. A dataset's files are written
    # as soon as its last round is done.
    groups: dict[str, list[int]] = {}
    for job_index, job in enumerate(plan):
        groups.setdefault(job[4], []).append(job_index)
    shuffle = np.random.default_rng([settings.seed, 11])

    def out_of_time() -> bool:
        limit = settings.max_minutes
        return limit is not None and clock() - started >= limit * 60

    with tqdm(
        total=total_samples,
        unit="sample",
        desc="profile",
        file=sys.stderr,
        disable=not settings.progress,
        dynamic_ncols=True,
    ) as bar:
        for job_indices in groups.values():
            if out_of_time():
                stopped = True
                break
            timings: dict[int, list[SampleTiming]] = {i: [] for i in job_indices}
            rounds = max(len(plan[i][5]) for i in job_indices)
            for round_index in range(rounds):
                if round_index > 0 and out_of_time():
                    stopped = True
                    discarded = sum(len(t) for t in timings.values())
                    break
                for i in shuffle.permutation(job_indices).tolist():
                    config_index, _tier, top_k, blocks, _dataset, specs, _path = plan[i]
                    if round_index >= len(specs):
                        continue
                    model.set_top_k(top_k)
                    if config_index not in warmed:
                        timer.warm_up(specs[0], blocks)
                        warmed.add(config_index)
                    spec = specs[round_index]
                    timings[i].append(timer.time_sample(spec, blocks, settings.repeats))
                    bar.update(1)
            if stopped:
                break
            for i in job_indices:
                _config_index, tier, top_k, blocks, _dataset, specs, path = plan[i]
                document = result_document(tier, top_k, blocks, preset.num_layers, timings[i])
                write_result(path, document)
                records[str(path.relative_to(out_dir))] = noise_records(timings[i])
                written += 1
                measured += len(specs)
            write_log("running", written)

    if discarded:
        log.warning("Discarded %d samples of an unfinished dataset (no partial files).", discarded)
    remaining = len(plan) - written
    if stopped:
        status = f"stopped: --max-minutes {settings.max_minutes} reached"
        log.warning(
            "Stopped after %.1f min (--max-minutes %s): %d of %d files written, %d left; "
            "rerun with --resume to finish.",
            (clock() - started) / 60,
            settings.max_minutes,
            written,
            len(plan),
            remaining,
        )
    else:
        status = "complete"
    noise = write_log(status, written)
    if settings.repeats < 2:
        log.info("Noise floor: not measured (it needs --repeats 2 or more)")
    elif noise:
        log.info(
            "Noise floor (median relative spread of %d repeats): prefill total %.2f %%, "
            "decode pass %.2f %%",
            settings.repeats,
            noise.get("prefill_total_spread", {}).get("median_pct", float("nan")),
            noise.get("decode_pass_spread", {}).get("median_pct", float("nan")),
        )
    return ProfileReport(
        output_dir=out_dir,
        files_written=written,
        files_skipped=skipped,
        files_remaining=remaining,
        samples_measured=measured,
        stopped_early=stopped,
        elapsed_s=clock() - started,
        noise=noise,
        log_path=log_path,
    )


def _grid_ordinal(tier: str, top_k: int, blocks: int) -> int:
    """Position of a configuration in a fixed enumeration of all tiers x top_k x blocks."""
    return (TIERS.index(tier) * 64 + (top_k - 1)) * 64 + (blocks - 1)
