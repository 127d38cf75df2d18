"""What a profiling sweep is, whichever engine measures it.

The settings of ``latkit profile`` and their validation; the plan (which files, which drawn
samples, what ``--resume`` skips) and the interleaved order of its samples; and
:class:`Sweep`, which collects the timings (journaling each sample in ``logs/samples.jsonl``
as it lands), writes each file atomically once its samples are in, and keeps
``logs/run.json``. Two engines feed it and import it, never each other:
``toolkit.profiler.runner`` measures in this process, ``toolkit.profiler.ray_runner`` on the
``ProfileWorker`` actors of a Ray cluster; :func:`toolkit.profiler.run_profile` picks one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sys
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
from toolkit.features import (
    GRID_BLOCKS,
    GRID_TOP_K,
    TIER_CROP_RANGE,
    TIERS,
    VISION_TOKENS_PER_CROP,
)
from toolkit.profiler.datasets import (
    DATASETS,
    SampleSpec,
    check_output_tokens,
    draw_samples,
    parse_datasets,
)
from toolkit.profiler.journal import JOURNAL_NAME, JournaledSample, SampleJournal
from toolkit.profiler.measure import (
    DTYPES,
    SampleTask,
    TaskResult,
)
from toolkit.profiler.model import MAX_POSITIONS, get_preset
from toolkit.profiler.timing import SampleTiming
from toolkit.profiler.writer import (
    dataset_dir_name,
    noise_records,
    noise_summary,
    result_document,
    result_stem,
    write_result,
)
from toolkit.versions import installed_versions

log = logging.getLogger(__name__)

#: The packages a run log records the versions of (read from their metadata: a Ray driver
#: that never builds a model does not import transformers).
RECORDED_PACKAGES = ("torch", "transformers", "numpy")

_RAY_ADDRESS = re.compile(r"^(ray://)?[A-Za-z0-9_.\-]+:\d{1,5}$")
#: How often (seconds of the sweep's clock) ``logs/run.json`` is rewritten while it runs.
LOG_EVERY_S = 30.0
#: How the samples are ordered, as ``logs/run.json`` says it (``schedule``).
SCHEDULE = (
    "rounds across all files: round j measures sample j of every (dataset, configuration) "
    "file, in a fresh seeded random order over all files; a file is written when its last "
    "sample is in, and every sample is journaled in logs/samples.jsonl as it lands"
)
SCHEDULE_WHY = (
    "the machine's speed drifts over a sweep; measured dataset after dataset, the drift "
    "aliased with the datasets and their prompt and answer lengths (in the bundled sweeps "
    "measured that way, the other datasets' decode pass ran 0.98-1.60x the time of the same "
    "configurations' coco_caption samples, and the vision encoder per crop, which no dataset "
    "changes, 0.95-1.34x); measured across all files, it spreads evenly over datasets, "
    "prompt and answer lengths and knobs"
)


@dataclass
class RaySettings:
    """Where a sweep runs on Ray (``latkit profile --ray``)."""

    #: ``local`` (start Ray on this machine), ``auto`` (join the running cluster),
    #: ``host:port`` or ``ray://host:port``.
    address: str
    #: ProfileWorker actors (default: one per GPU; on CPUs, the cluster's CPUs / threads).
    workers: int | None = None
    #: Accept workers that report different device names (recorded on every sample).
    allow_mixed_devices: bool = False


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
    #: Re-time the canary every N samples per measuring process (None: no canary).
    canary_every: int | None = None
    #: ``--output-tokens LO-HI``: answer lengths drawn uniformly in [LO, HI] (None: the
    #: datasets' own).
    output_tokens: tuple[int, int] | None = None
    #: Run on Ray (None: in this process).
    ray: RaySettings | None = None


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
    engine: str = "single-process"
    #: Samples of unfinished files taken from ``logs/samples.jsonl`` (``--resume``).
    samples_reused: int = 0
    workers: int = 1
    restarts: int = 0
    startup_s: float = 0.0


@dataclass(frozen=True)
class Job:
    """One result file of the sweep: a (configuration, dataset) and its drawn samples."""

    config_index: int
    tier: str
    top_k: int
    blocks: int
    dataset: str
    specs: tuple[SampleSpec, ...]
    path: Path

    def task(self, job: int, index: int) -> SampleTask:
        """Sample ``index`` of this file, as job number ``job`` of the plan."""
        return SampleTask(
            job=job,
            index=index,
            config=self.config_index,
            top_k=self.top_k,
            blocks=self.blocks,
            spec=self.specs[index],
            warm_spec=self.specs[0],
        )

    @property
    def key(self) -> str:
        """The file's path under the results directory without ``.json``/``.json.gz``: its
        key in the sample journal (the same whether or not the sweep is gzipped)."""
        name = self.path.name.removesuffix(".gz").removesuffix(".json")
        return f"{self.path.parent.name}/{name}"


#: The interleaved order of a sweep: rounds of (job, sample index).
Schedule = list[list[tuple[int, int]]]


def make_ray_settings(
    address: str | None, workers: int | None = None, allow_mixed_devices: bool = False
) -> RaySettings | None:
    """``--ray``, ``--workers`` and ``--allow-mixed-devices`` as one setting (None: no Ray)."""
    if address is None:
        for flag, given in (
            ("--workers", workers is not None),
            ("--allow-mixed-devices", allow_mixed_devices),
        ):
            if given:
                raise LatkitError(f"{flag} needs --ray (local, auto or host:port)")
        return None
    return RaySettings(address, workers, allow_mixed_devices)


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


def check_address(address: str) -> str:
    """``--ray``'s value, checked for its form (nothing is contacted)."""
    if address in ("local", "auto") or _RAY_ADDRESS.match(address):
        return address
    raise LatkitError(f"--ray {address!r}: expected local, auto, host:port or ray://host:port")


def validate_settings(settings: ProfileSettings) -> None:
    """Every setting checked before anything is built or contacted (one-line LatkitErrors)."""
    preset = get_preset(settings.preset)
    num_layers, num_experts = preset.num_layers, preset.num_experts
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
    if settings.canary_every is not None and settings.canary_every < 1:
        raise LatkitError("--canary-every must be at least 1")
    if settings.ray is not None:
        check_address(settings.ray.address)
        if settings.ray.workers is not None and settings.ray.workers < 1:
            raise LatkitError("--workers must be at least 1")
    if settings.output_tokens is not None:
        low, high = check_output_tokens(settings.output_tokens)
        longest_prompt = max(
            (TIER_CROP_RANGE[tier][1] + 1) * VISION_TOKENS_PER_CROP for tier in settings.tiers
        ) + max(DATASETS[name].prompt_tokens.high for name in settings.datasets)
        if longest_prompt + high > MAX_POSITIONS:
            raise LatkitError(
                f"--output-tokens {low}-{high}: prompts of up to {longest_prompt} tokens plus "
                f"the answer must fit the model's {MAX_POSITIONS} positions (HI at most "
                f"{MAX_POSITIONS - longest_prompt})"
            )


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


def plan_jobs(settings: ProfileSettings, out_dir: Path) -> tuple[list[Job], int]:
    """The files to measure (in measuring order) and how many ``--resume`` skips."""
    suffix = ".json.gz" if settings.gzip else ".json"
    plan: list[Job] = []
    skipped = 0
    for config_index, (tier, top_k, blocks) in enumerate(_configurations(settings)):
        for dataset in settings.datasets:
            # The sample ids of a configuration depend on its place in the full grid, so they
            # stay unique within a dataset however the sweep is split.
            first_id = _grid_ordinal(tier, top_k, blocks) * settings.samples_per_config
            specs = draw_samples(
                dataset,
                tier,
                top_k,
                blocks,
                settings.samples_per_config,
                settings.seed,
                first_id,
                settings.output_tokens,
            )
            mean_crops = float(np.mean([s.num_crops for s in specs]))
            stem = result_stem(dataset, tier, top_k, blocks, mean_crops)
            path = out_dir / dataset_dir_name(dataset) / (stem + suffix)
            if settings.resume and any(
                (path.parent / (stem + ext)).exists() for ext in (".json", ".json.gz")
            ):
                skipped += 1
                continue
            plan.append(Job(config_index, tier, top_k, blocks, dataset, tuple(specs), path))
    return plan, skipped


def interleaved_schedule(plan: list[Job], seed: int) -> Schedule:
    """The order samples are measured in, the same for every engine: rounds across all files.

    Round j measures sample j of every file of the plan (every dataset and configuration), in
    a fresh seeded random order. On a shared machine the load drifts over minutes. Measuring
    one configuration after another aliased that drift with the knobs (we saw top_k 12
    "faster" than top_k 4). Measuring dataset after dataset (interleaved within each)
    aliased it with the datasets, which differ in prompt and answer lengths: in the bundled
    sweeps the other datasets' median decode pass ran 1.11-1.44x (small preset) and
    0.98-1.60x (tiny) the time of the same configurations' coco_caption samples, and the
    vision encoder per crop, which no dataset changes, moved with it (1.05-1.17x,
    0.95-1.34x; ``benchmarks/schedule_drift.py``), so a model learnt a speed difference
    between long and short answers that was only the time each dataset was measured at.
    Across all files the drift spreads evenly over datasets, prompt and answer lengths and
    knobs alike.
    """
    shuffle = np.random.default_rng([seed, 11])
    rounds: Schedule = []
    for round_index in range(max((len(job.specs) for job in plan), default=0)):
        order = shuffle.permutation(len(plan)).tolist()
        rounds.append([(i, round_index) for i in order if round_index < len(plan[i].specs)])
    return rounds


def _measurement(settings: ProfileSettings) -> dict[str, Any]:
    """What a sample's timings depend on beyond its drawn spec (the journal's header)."""
    return {
        "preset": settings.preset,
        "device": settings.device,
        "dtype": settings.dtype,
        "repeats": settings.repeats,
        "threads": settings.threads,
        "seed": settings.seed,
        "canary_every": settings.canary_every,
    }


def sample_metadata(result: TaskResult, device_name: str | None = None) -> dict[str, Any]:
    """The ``metadata`` a sample carries: its device (mixed-device sweeps) and speed factor."""
    metadata: dict[str, Any] = {}
    if device_name is not None:
        metadata["device"] = device_name
    if result.speed_factor is not None:
        metadata["speed_factor"] = round(result.speed_factor, 5)
    return metadata


class Sweep:
    """The bookkeeping both engines share: the plan and its interleaved schedule, the samples
    measured so far (each (file, sample) kept once and journaled as it lands), the files
    (written atomically once all their samples are in) and ``logs/run.json``.

    An engine sets ``describe`` (a function giving the log's ``device``, ``model``,
    ``engine`` and optionally ``canary``) before the first :meth:`write_log`, and ends with
    :meth:`finish` (or :meth:`close`, if it fails).
    """

    def __init__(self, settings: ProfileSettings, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.preset = get_preset(settings.preset)
        self.clock = clock
        self.out_dir = Path(settings.output_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out_dir / "logs" / "run.json"
        self.started = clock()
        self.started_at = datetime.now(UTC).isoformat(timespec="seconds")
        self.records: dict[str, dict[str, list[float]]] = {}
        if settings.resume and self.log_path.exists():
            try:
                self.records = json.loads(self.log_path.read_text()).get("noise_records", {})
            except (OSError, ValueError):
                log.warning(
                    "could not read %s: noise records of earlier runs are lost", self.log_path
                )
        self.plan, self.skipped = plan_jobs(settings, self.out_dir)
        self.schedule = interleaved_schedule(self.plan, settings.seed)
        self.describe: Callable[[], dict[str, Any]] = dict
        self.written = 0
        self.measured = 0
        self._results: dict[int, dict[int, tuple[SampleTiming, dict[str, Any]]]] = {}
        self._written_jobs: set[int] = set()
        self._logged_at = self.started
        self.journal = SampleJournal(self.out_dir / "logs" / JOURNAL_NAME, _measurement(settings))
        reused = self._reuse_journal() if settings.resume else []
        if not settings.resume and self.journal.path.exists():
            log.warning(
                "Starting afresh (no --resume): the samples in %s are discarded",
                self.journal.path,
            )
        self.journal.start(reused)
        self.reused = len(reused)
        for job_index, held in list(self._results.items()):
            if len(held) == len(self.plan[job_index].specs):
                self._write_file(job_index)  # its last sample was journaled, its file not

    def _reuse_journal(self) -> list[JournaledSample]:
        """The journal's samples of this sweep's unwritten files, held as if measured now."""
        samples, unreadable = self.journal.read()
        jobs = {job.key: job_index for job_index, job in enumerate(self.plan)}
        kept: list[JournaledSample] = []
        stale = outside = 0
        for sample in samples:
            job_index = jobs.get(sample.key)
            if job_index is None:
                # A written file's sample (expected), or a file outside this sweep's grid.
                outside += not any(
                    (self.out_dir / (sample.key + ext)).exists() for ext in (".json", ".json.gz")
                )
                continue
            specs = self.plan[job_index].specs
            if sample.index >= len(specs) or specs[sample.index] != sample.timing.spec:
                stale += 1
                continue
            held = self._results.setdefault(job_index, {})
            if sample.index not in held:
                held[sample.index] = (sample.timing, sample.metadata)
                kept.append(sample)
        path = self.journal.path
        if unreadable:
            log.warning(
                "%s: %d unreadable line(s) ignored (a sample being written when the sweep "
                "was killed)",
                path,
                unreadable,
            )
        if stale:
            log.warning(
                "%s: %d sample(s) drawn otherwise than this sweep draws them (another --seed, "
                "--output-tokens or --samples-per-config?) are measured again",
                path,
                stale,
            )
        if outside:
            log.warning("%s: %d sample(s) of files outside this sweep dropped", path, outside)
        if kept:
            log.info("Reusing %d measured sample(s) from %s", len(kept), path)
        return kept

    @property
    def total_samples(self) -> int:
        return sum(len(job.specs) for job in self.plan)

    def pending(self) -> list[tuple[int, int]]:
        """The (job, sample index) still to measure, in schedule order."""
        return [
            (job, index)
            for units in self.schedule
            for job, index in units
            if job not in self._written_jobs and index not in self._results.get(job, {})
        ]

    def out_of_time(self) -> bool:
        limit = self.settings.max_minutes
        return limit is not None and self.clock() - self.started >= limit * 60

    def add(self, result: TaskResult, metadata: dict[str, Any]) -> bool:
        """Keep a measured sample: journal it, and write its file if it was the file's last
        (the log too, every :data:`LOG_EVERY_S`). False (and ignored) if it is already in."""
        if result.job in self._written_jobs:
            return False
        held = self._results.setdefault(result.job, {})
        if result.index in held:
            return False
        held[result.index] = (result.timing, metadata)
        job = self.plan[result.job]
        self.journal.append(JournaledSample(job.key, result.index, result.timing, metadata))
        self.measured += 1
        if len(held) == len(job.specs):
            self._write_file(result.job)
        if self.clock() - self._logged_at >= LOG_EVERY_S:
            self.write_log("running")
        return True

    def _write_file(self, job_index: int) -> None:
        job = self.plan[job_index]
        held = self._results.pop(job_index)
        timings = [held[index][0] for index in range(len(job.specs))]
        metadata = [held[index][1] for index in range(len(job.specs))]
        document = result_document(
            job.tier, job.top_k, job.blocks, self.preset.num_layers, timings, metadata
        )
        write_result(job.path, document)
        self.records[str(job.path.relative_to(self.out_dir))] = noise_records(timings)
        self._written_jobs.add(job_index)
        self.written += 1

    def progress_bar(self) -> Any:
        from tqdm import tqdm

        return tqdm(
            total=self.total_samples,
            initial=self.reused,
            unit="sample",
            desc="profile",
            file=sys.stderr,
            disable=not self.settings.progress,
            dynamic_ncols=True,
        )

    def show_progress(self, bar: Any, workers_alive: int | None = None) -> None:
        """Files done (and workers alive) beside the samples count and ETA of the bar."""
        text = f"files {self.written}/{len(self.plan)}"
        if workers_alive is not None:
            text += f", workers {workers_alive}"
        bar.set_postfix_str(text, refresh=False)

    def write_log(self, status: str) -> dict[str, Any]:
        merged: dict[str, list[float]] = {}
        for per_file in self.records.values():
            for key, values in per_file.items():
                merged.setdefault(key, []).extend(values)
        noise = noise_summary(merged) if merged else {}
        context = self.describe()
        document: dict[str, Any] = {
            "status": status,
            "started_at": self.started_at,
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "elapsed_s": round(self.clock() - self.started, 1),
            "command": sys.argv,
            "settings": _settings_dict(self.settings),
            "versions": {**installed_versions(RECORDED_PACKAGES), "latkit": __version__},
            "device": context.pop("device", {}),
            "model": context.pop("model", {}),
            **context,
            "schedule": {"order": SCHEDULE, "why": SCHEDULE_WHY, "rounds": len(self.schedule)},
            "files": {
                "planned": len(self.plan),
                "written": self.written,
                "skipped_existing": self.skipped,
            },
            "samples": {
                "planned": self.total_samples,
                "reused_from_journal": self.reused,
                "measured": self.measured,
            },
            "noise_floor": noise,
            "noise_records": self.records,
        }
        write_json_atomic(self.log_path, document, indent=None)
        self._logged_at = self.clock()
        return noise

    def close(self) -> None:
        """Close the journal (kept for ``--resume``); :meth:`finish` calls it."""
        self.journal.close()

    def finish(self, stopped: bool) -> ProfileReport:
        """Write the final log, say how it ended, and report. A complete sweep removes its
        journal: its files hold every sample (keeping it would double the size of a results
        tree, and a complete tree has nothing to resume)."""
        settings = self.settings
        remaining = len(self.plan) - self.written
        if stopped:
            status = f"stopped: --max-minutes {settings.max_minutes} reached"
            log.warning(
                "Stopped after %.1f min (--max-minutes %s): %d of %d files written, %d of %d "
                "samples measured (kept in %s); rerun with --resume to finish.",
                (self.clock() - self.started) / 60,
                settings.max_minutes,
                self.written,
                len(self.plan),
                self.reused + self.measured,
                self.total_samples,
                self.journal.path,
            )
        else:
            status = "complete"
        noise = self.write_log(status)
        if stopped:
            self.journal.close()
        else:
            self.journal.remove()
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
            output_dir=self.out_dir,
            files_written=self.written,
            files_skipped=self.skipped,
            files_remaining=remaining,
            samples_measured=self.measured,
            stopped_early=stopped,
            elapsed_s=self.clock() - self.started,
            noise=noise,
            log_path=self.log_path,
            samples_reused=self.reused,
        )


def _grid_ordinal(tier: str, top_k: int, blocks: int) -> int:
    """Position of a configuration in a fixed enumeration of all tiers x top_k x blocks."""
    return (TIERS.index(tier) * 64 + (top_k - 1)) * 64 + (blocks - 1)
