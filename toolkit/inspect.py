"""What a results directory holds: datasets, files, samples per dataset and config, skips."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from toolkit.data import LoadResult, load_results
from toolkit.data.loader import count_by


def inspect_results(
    results_dir: str | Path,
    dataset_names: Sequence[str] | None = None,
    outlier_ms: float | None = 60.0,
    outlier_rel: float | None = None,
) -> LoadResult:
    """Load a results directory exactly as training would, for reporting."""
    return load_results(
        results_dir,
        dataset_names=dataset_names,
        outlier_ms=outlier_ms,
        outlier_rel=outlier_rel,
    )


def samples_per_device(result: LoadResult) -> dict[str, int]:
    """Samples per ``metadata.device`` (empty unless the samples name their device)."""
    named = result.samples.filter(pl.col("device").is_not_null())
    return {str(device): int(count) for device, count in count_by(named, ["device"]).iter_rows()}


def summary_json(result: LoadResult) -> dict[str, Any]:
    """The ``inspect --json`` object."""
    return {
        "datasets": list(result.datasets),
        "n_files": result.n_files,
        "n_samples": result.n_samples,
        "n_steps": result.n_steps,
        "skipped": dict(result.skipped),
        "files_failed": list(result.files_failed),
        "files_skipped": dict(result.files_skipped),
        "samples_per_device": samples_per_device(result),
    }


def summary_text(result: LoadResult) -> str:
    """A human-readable report of a load."""
    lines = [
        f"Datasets ({len(result.datasets)}): {', '.join(result.datasets)}",
        f"Result files read: {result.n_files}",
        f"Usable samples: {result.n_samples}  (decode passes with per-step times: "
        f"{result.n_steps})",
        "",
        "Samples per dataset:",
    ]
    for dataset, count in count_by(result.samples, ["dataset"]).sort("dataset").iter_rows():
        lines.append(f"  {dataset:<24} {count:>8}")
    devices = samples_per_device(result)
    if devices:
        unnamed = result.n_samples - sum(devices.values())
        lines += ["", f"Samples per device ({len(devices)} devices):"]
        lines += [f"  {device:<40} {count:>8}" for device, count in sorted(devices.items())]
        if unnamed:
            lines.append(f"  {'(not recorded)':<40} {unnamed:>8}")
    per_config = count_by(result.samples, ["config"]).sort("config")
    lines += ["", f"Samples per configuration ({per_config.height} configurations):"]
    rows = [f"{config:<16}{count:>6}" for config, count in per_config.iter_rows()]
    for start in range(0, len(rows), 4):
        lines.append("  " + "   ".join(rows[start : start + 4]))
    stats = result.samples.select(
        pl.col("T_prefill_total").median().alias("prefill"),
        pl.col("T_decode_per_token").median().alias("per_pass"),
        pl.col("output_tokens").median().alias("out"),
    ).row(0)
    lines += [
        "",
        f"Median prefill total: {stats[0]:.2f} ms, median decode time per pass: "
        f"{stats[1]:.2f} ms, median output tokens: {stats[2]:.0f}",
        "",
        "Skipped samples by reason:" if result.skipped else "Skipped samples: none",
    ]
    for reason, count in result.skipped.items():
        lines.append(f"  {reason:<32} {count:>8}")
    for reason, count in result.files_skipped.items():
        lines.append(f"Skipped files ({reason}): {count}")
    if result.files_failed:
        lines.append(f"Files that could not be parsed ({len(result.files_failed)}):")
        lines += [f"  {path}" for path in result.files_failed]
    return "\n".join(lines)
