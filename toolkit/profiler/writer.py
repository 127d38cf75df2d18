"""Core-experiment result files (``shared/spec/core-exp-format.md``) and the noise floor."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.atomic import write_bytes_atomic
from toolkit.features import TIER_CROP_RANGE
from toolkit.profiler.timing import SampleTiming

#: Stages summarised in ``latency_stats`` (``<stage>_mean/_std/_p50/_p95/_p99``).
STAT_STAGES = ("T_vision_total", "T_LLM_prefill", "T_LLM_decode", "T_total", "T_decode_per_token")


def dataset_dir_name(dataset: str) -> str:
    return dataset.replace("_", "-")


def result_stem(dataset: str, tier: str, top_k: int, num_active_blocks: int, crops: float) -> str:
    return (
        f"{dataset_dir_name(dataset)}_imgsizetier-{tier}_crops{round(crops)}"
        f"_topk{top_k}_blocks{num_active_blocks}"
    )


def latency_stats(samples: Sequence[dict[str, Any]]) -> dict[str, float]:
    stats: dict[str, float] = {}
    for stage in STAT_STAGES:
        values = np.asarray([float(sample[stage]) for sample in samples], dtype=np.float64)
        stats[f"{stage}_mean"] = round(float(values.mean()), 4)
        stats[f"{stage}_std"] = round(float(values.std()), 4)
        for q in (50, 95, 99):
            stats[f"{stage}_p{q}"] = round(float(np.percentile(values, q)), 4)
    return stats


def result_document(
    tier: str,
    top_k: int,
    num_active_blocks: int,
    num_total_blocks: int,
    timings: Sequence[SampleTiming],
    metadata: Sequence[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """One result file; ``metadata[i]`` (if given) is sample i's ``metadata`` object."""
    extras = metadata if metadata is not None else [{}] * len(timings)
    samples = [
        timing.to_sample(tier, top_k, num_active_blocks, extra)
        for timing, extra in zip(timings, extras, strict=True)
    ]
    low, high = TIER_CROP_RANGE[tier]
    return {
        "tier": tier,
        "tier_range": {"min_crops": low, "max_crops": high},
        "max_crops": high,
        "top_k": top_k,
        "num_active_blocks": num_active_blocks,
        "num_total_blocks": num_total_blocks,
        "active_block_indices": list(range(num_active_blocks)),
        "num_samples": len(samples),
        "selected_crops_mean": round(float(np.mean([t.spec.num_crops for t in timings])), 4),
        "latency_stats": latency_stats(samples),
        "per_sample_results": samples,
    }


def write_result(path: Path, document: dict[str, Any]) -> None:
    """Atomically: a killed run leaves the finished file or none, never half of one."""
    text = json.dumps(document, indent=1, allow_nan=False) + "\n"
    data = text.encode("utf-8")
    if path.name.endswith(".gz"):
        # mtime=0: the same measurements give the same bytes.
        data = gzip.compress(data, compresslevel=9, mtime=0)
    write_bytes_atomic(path, data)


def _relative_spread(runs: Sequence[float]) -> float | None:
    """(max - min) / median of one quantity's repeated runs; None when it can't be formed."""
    if len(runs) < 2:
        return None
    median = float(np.median(runs))
    if median <= 0:
        return None
    return (max(runs) - min(runs)) / median


def _relative_mad(runs: Sequence[float]) -> float | None:
    """Median |run - median| / median: how far a single run typically lands from the median."""
    if len(runs) < 2:
        return None
    median = float(np.median(runs))
    if median <= 0:
        return None
    return float(np.median(np.abs(np.asarray(runs) - median))) / median


def noise_records(timings: Iterable[SampleTiming]) -> dict[str, list[float]]:
    """Per-sample relative spreads of the repeats, by stage (input of :func:`noise_summary`)."""
    records: dict[str, list[float]] = {
        "vision_spread": [],
        "prefill_spread": [],
        "prefill_total_spread": [],
        "decode_pass_spread": [],
        "decode_total_spread": [],
        "prefill_total_mad": [],
        "decode_pass_mad": [],
    }

    def add(key: str, value: float | None) -> None:
        if value is not None:
            records[key].append(round(value, 5))

    for timing in timings:
        runs = range(len(timing.total_runs))
        add("vision_spread", _relative_spread(timing.vision_runs))
        add("prefill_spread", _relative_spread(timing.prefill_runs))
        prefill_total = [timing.vision_runs[r] + timing.prefill_runs[r] for r in runs]
        add("prefill_total_spread", _relative_spread(prefill_total))
        add("prefill_total_mad", _relative_mad(prefill_total))
        if timing.decode_runs:
            for step in timing.decode_runs:
                add("decode_pass_spread", _relative_spread(step))
                add("decode_pass_mad", _relative_mad(step))
            totals = [sum(step[r] for step in timing.decode_runs) for r in runs]
            add("decode_total_spread", _relative_spread(totals))
    return records


def noise_summary(records: dict[str, list[float]]) -> dict[str, Any]:
    """Median and p90 over samples of each relative spread, in percent."""
    summary: dict[str, Any] = {}
    for key, values in records.items():
        if values:
            summary[key] = {
                "median_pct": round(100 * float(np.median(values)), 3),
                "p90_pct": round(100 * float(np.percentile(values, 90)), 3),
                "n": len(values),
            }
    summary["definition"] = (
        "per sample: spread = (max - min) / median of its repeated runs; mad = median "
        "|run - median| / median; summarised as median and 90th percentile over samples "
        "(decode_pass_*: over every decode pass)"
    )
    return summary
