"""Polars loader of core-experiment results, with validation that counts every skip.

Clean files take a fast path: many files are joined into one JSON array and parsed by
Polars in one call against an explicit schema (only the fields latkit uses). A chunk that
fails (truncated file, ``NaN`` literal, a string where a number belongs) is retried file
by file, and a file Polars cannot take is read by Python's json module with per-field
coercion, so one bad record costs that record, not its file.

Parsing JSON is most of the cost of a load, and the same results directory is read by
train, evaluate, plot and export in turn: each dataset folder's parsed frame is cached as
Parquet (plain data, nothing in it executes) under ``default_cache_dir()``, keyed by the
names, sizes and modification times of its files, and validation runs anew on every load.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import polars as pl

from toolkit.atomic import atomic_directory, write_json_atomic
from toolkit.errors import LatkitError
from toolkit.features import TIERS

log = logging.getLogger("latkit.data")

_I = pl.Int64
_F = pl.Float64

#: Integer fields of a sample that latkit reads.
_SAMPLE_INT_FIELDS: Final[tuple[str, ...]] = (
    "sample_id",
    "top_k",
    "num_active_blocks",
    "output_tokens",
    "actual_num_crops",
    "actual_vision_tokens",
    "actual_text_tokens",
    "total_sequence_length",
)
#: Stage times of a sample (ms).
_SAMPLE_TIME_FIELDS: Final[tuple[str, ...]] = (
    "T_vision_total",
    "T_LLM_prefill",
    "T_LLM_decode",
    "T_total",
    "T_decode_per_token",
)
#: Fields without which a sample is unusable ("missing_<field>" when absent).
_REQUIRED_FIELDS: Final[tuple[str, ...]] = (
    "tier",
    "top_k",
    "num_active_blocks",
    "output_tokens",
    "actual_vision_tokens",
    "actual_text_tokens",
    "T_vision_total",
    "T_LLM_prefill",
    "T_LLM_decode",
)

_REASON: Final[str] = "_latkit_skip_reason"
#: The part of a sample's ``metadata`` object that latkit reads: the device that measured it
#: (``latkit profile --ray --allow-mixed-devices`` writes it).
_METADATA_STRUCT: Final[pl.DataType] = pl.Struct({"device": pl.String})
_RAW_SAMPLE_STRUCT: Final[pl.DataType] = pl.Struct(
    {
        "tier": pl.String,
        **{name: _I for name in _SAMPLE_INT_FIELDS},
        **{name: _F for name in _SAMPLE_TIME_FIELDS},
        "T_decode_per_step": pl.List(pl.List(_F)),
        "metadata": _METADATA_STRUCT,
        # Filled only by the tolerant reader: why it could not use a record.
        _REASON: pl.String,
    }
)
_RAW_FILE_SCHEMA: Final[dict[str, pl.DataType]] = {
    "tier": pl.String(),
    "top_k": _I(),
    "num_active_blocks": _I(),
    # Blocks in the profiled model (a file-level field; null where a file omits it).
    "num_total_blocks": _I(),
    "per_sample_results": pl.List(_RAW_SAMPLE_STRUCT),
}

#: Columns of the samples frame, in order (see the package docstring).
SAMPLE_SCHEMA: Final[dict[str, pl.DataType]] = {
    "sample_key": _I(),
    "dataset": pl.String(),
    "file": pl.String(),
    "sample_id": _I(),
    "tier": pl.String(),
    "tier_idx": _I(),
    "top_k": _I(),
    "num_active_blocks": _I(),
    "config": pl.String(),
    "output_tokens": _I(),
    "n_decode_passes": _I(),
    "actual_num_crops": _I(),
    "vision_tokens": _I(),
    "text_tokens": _I(),
    "total_sequence_length": _I(),
    "T_vision_total": _F(),
    "T_LLM_prefill": _F(),
    "T_LLM_decode": _F(),
    "T_total": _F(),
    "T_decode_per_token": _F(),
    "T_prefill_total": _F(),
    "num_total_blocks": _I(),
    "device": pl.String(),
}
#: Columns of the steps frame (one row per decode pass).
STEP_SCHEMA: Final[dict[str, pl.DataType]] = {
    "sample_key": _I(),
    "k": _I(),
    "T_decode_pass": _F(),
    "n_runs": _I(),
}

_RANK_FILE = re.compile(r"^(?P<stem>.+)_rank\d+\.json(?:\.gz)?$")
_CHUNK_FILES: Final[int] = 64
#: Bump when the raw frame layout changes: old cache entries are then ignored.
_CACHE_VERSION: Final[int] = 3
#: Warn loudly when the outlier rules drop more than this fraction of valid samples.
_OUTLIER_WARN_FRACTION: Final[float] = 0.03


@dataclass
class LoadResult:
    """What ``load_results`` read: usable samples, decode passes, and what it skipped."""

    samples: pl.DataFrame
    steps: pl.DataFrame
    datasets: list[str]
    n_files: int
    skipped: dict[str, int] = field(default_factory=dict)
    files_failed: list[str] = field(default_factory=list)
    files_skipped: dict[str, int] = field(default_factory=dict)
    n_filtered_outliers: int = 0

    @property
    def n_samples(self) -> int:
        return self.samples.height

    @property
    def n_steps(self) -> int:
        return self.steps.height


@dataclass
class _Dataset:
    name: str
    folder: Path


def _is_result_name(path: Path) -> bool:
    return path.name.endswith(".json") or path.name.endswith(".json.gz")


def discover_datasets(results_dir: str | Path) -> list[tuple[str, Path]]:
    """Dataset folders under ``results_dir``: every folder with result files but ``logs``.

    Names are the folder names with hyphens written as underscores.
    """
    root = Path(results_dir)
    if not root.is_dir():
        raise LatkitError(f"results directory not found: {root}")
    found: list[tuple[str, Path]] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name == "logs" or folder.name.startswith("."):
            continue
        if any(_is_result_name(p) for p in folder.iterdir() if p.is_file()):
            found.append((folder.name.replace("-", "_"), folder))
    return found


def _select_datasets(
    results_dir: Path, dataset_names: Sequence[str] | None, use_all_datasets: bool
) -> list[_Dataset]:
    available = discover_datasets(results_dir)
    if not available:
        raise LatkitError(
            f"no dataset folders with *.json result files under {results_dir} "
            "(expected RESULTS_DIR/<dataset>/<dataset>_imgsizetier-..._blocks<n>.json)"
        )
    if dataset_names is None or (use_all_datasets and not dataset_names):
        chosen = available
    else:
        by_name = {name: folder for name, folder in available}
        wanted = [name.strip().replace("-", "_") for name in dataset_names]
        unknown = [name for name in wanted if name not in by_name]
        if unknown:
            raise LatkitError(
                f"dataset(s) not found under {results_dir}: {', '.join(unknown)} "
                f"(available: {', '.join(by_name)})"
            )
        chosen = [(name, by_name[name]) for name in dict.fromkeys(wanted)]
    return [_Dataset(name, folder) for name, folder in chosen]


def _result_files(folder: Path, files_skipped: Counter[str]) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and _is_result_name(p))
    names = {p.name for p in files}
    kept: list[Path] = []
    for path in files:
        match = _RANK_FILE.match(path.name)
        if match and (f"{match['stem']}.json" in names or f"{match['stem']}.json.gz" in names):
            # Distributed runs leave per-rank files beside the merged one: duplicates.
            files_skipped["rank_duplicate"] += 1
            continue
        kept.append(path)
    return kept


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    return data


def _parse_chunk(blobs: Sequence[bytes]) -> pl.DataFrame:
    document = b"[" + b",".join(blobs) + b"]"
    return pl.read_json(io.BytesIO(document), schema=_RAW_FILE_SCHEMA)


def _number(value: Any, integer: bool) -> tuple[float | int | None, bool]:
    """Coerce a JSON value; returns (value, ok). ``None`` with ok=True means missing."""
    if value is None:
        return None, True
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None, False
    if integer:
        if isinstance(value, float):
            if not math.isfinite(value) or value != int(value):
                return None, False
            return int(value), True
        return value, True
    return float(value), True


def _coerce_file(document: Any) -> pl.DataFrame | None:
    """Build the raw frame of one file from Python objects; None if not a result file."""
    if not isinstance(document, dict) or not isinstance(document.get("per_sample_results"), list):
        return None
    samples: list[dict[str, Any]] = []
    for raw in document["per_sample_results"]:
        record: dict[str, Any] = {}
        reason: str | None = None
        if not isinstance(raw, dict):
            samples.append({_REASON: "not_an_object"})
            continue
        tier = raw.get("tier")
        if tier is not None and not isinstance(tier, str):
            reason = reason or "non_numeric_tier"
            tier = None
        record["tier"] = tier
        for name in _SAMPLE_INT_FIELDS:
            value, ok = _number(raw.get(name), integer=True)
            if not ok:
                reason = reason or f"non_numeric_{name}"
            record[name] = value
        for name in _SAMPLE_TIME_FIELDS:
            value, ok = _number(raw.get(name), integer=False)
            if not ok:
                reason = reason or f"non_numeric_{name}"
            record[name] = value
        steps = raw.get("T_decode_per_step")
        record["T_decode_per_step"] = None
        if steps is not None:
            cleaned = _coerce_steps(steps)
            if cleaned is None:
                reason = reason or "bad_T_decode_per_step"
            else:
                record["T_decode_per_step"] = cleaned
        record["metadata"] = _coerce_metadata(raw.get("metadata"))
        record[_REASON] = reason
        samples.append(record)
    file_fields: dict[str, Any] = {}
    for name in ("top_k", "num_active_blocks", "num_total_blocks"):
        value, ok = _number(document.get(name), integer=True)
        file_fields[name] = value if ok else None
    tier = document.get("tier")
    file_fields["tier"] = tier if isinstance(tier, str) else None
    frame = pl.DataFrame(
        {"per_sample_results": [samples]},
        schema={"per_sample_results": pl.List(_RAW_SAMPLE_STRUCT)},
    )
    frame = frame.with_columns(
        pl.lit(file_fields["tier"], dtype=pl.String).alias("tier"),
        pl.lit(file_fields["top_k"], dtype=_I).alias("top_k"),
        pl.lit(file_fields["num_active_blocks"], dtype=_I).alias("num_active_blocks"),
        pl.lit(file_fields["num_total_blocks"], dtype=_I).alias("num_total_blocks"),
    )
    return frame


def _coerce_metadata(metadata: Any) -> dict[str, Any]:
    """The metadata fields latkit reads; anything unexpected is treated as absent (metadata
    never makes a sample unusable)."""
    device = metadata.get("device") if isinstance(metadata, dict) else None
    return {"device": device if isinstance(device, str) else None}


def _coerce_steps(steps: Any) -> list[list[float]] | None:
    if not isinstance(steps, list):
        return None
    cleaned: list[list[float]] = []
    for runs in steps:
        if isinstance(runs, int | float) and not isinstance(runs, bool):
            runs = [runs]  # a flat list of pass times: one run per pass
        if not isinstance(runs, list):
            return None
        values: list[float] = []
        for value in runs:
            number, ok = _number(value, integer=False)
            if not ok or number is None:
                return None
            values.append(float(number))
        cleaned.append(values)
    return cleaned


def _read_files(
    files: list[tuple[str, Path]],
    files_failed: list[str],
    files_skipped: Counter[str],
    bar: Any | None,
) -> list[pl.DataFrame]:
    """Raw frames (one row per file) with dataset and file columns attached."""
    frames: list[pl.DataFrame] = []
    chunks = [files[i : i + _CHUNK_FILES] for i in range(0, len(files), _CHUNK_FILES)]
    for chunk in chunks:
        blobs: list[bytes] = []
        readable: list[tuple[str, Path]] = []
        for dataset, path in chunk:
            try:
                blobs.append(_read_bytes(path))
                readable.append((dataset, path))
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                files_failed.append(str(path))
                log.warning("Skipping unreadable file %s: %s", path, exc)
        try:
            parsed = [(_parse_chunk(blobs), readable)]
        except Exception:  # any parse error sends the chunk to the file-by-file path
            parsed = []
            for blob, item in zip(blobs, readable, strict=True):
                frame = _parse_one(blob, item[1], files_failed)
                if frame is not None:
                    parsed.append((frame, [item]))
        for frame, items in parsed:
            frame = frame.with_columns(
                pl.Series("dataset", [d for d, _ in items], dtype=pl.String),
                pl.Series("file", [str(p) for _, p in items], dtype=pl.String),
            )
            not_results = frame.filter(pl.col("per_sample_results").is_null())
            for path in not_results["file"]:
                files_skipped["not_a_result_file"] += 1
                log.info("Skipping %s: not a result file (no per_sample_results)", path)
            frames.append(frame.filter(pl.col("per_sample_results").is_not_null()))
        if bar is not None:
            bar.update(len(chunk))
    return frames


def default_cache_dir() -> Path:
    """Where parsed results are cached: ``$LATKIT_CACHE_DIR`` or ``~/.cache/latkit``."""
    configured = os.environ.get("LATKIT_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "latkit"


def _fingerprint(folder: Path, files: Sequence[Path], files_skipped: Counter[str]) -> str:
    """Changes whenever a file of the folder is added, removed, resized or rewritten."""
    digest = hashlib.sha256(f"{_CACHE_VERSION}\0{folder.resolve()}".encode())
    for path in files:
        stat = path.stat()
        digest.update(f"\0{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    digest.update(json.dumps(sorted(files_skipped.items())).encode())
    return digest.hexdigest()[:32]


def _cache_load(entry: Path) -> tuple[pl.DataFrame, list[str], dict[str, int]] | None:
    """A cached folder (parquet: data only, nothing executes), or None if absent/unreadable."""
    try:
        info = json.loads((entry / "info.json").read_text())
        frame = pl.read_parquet(entry / "raw.parquet")
        return frame, list(info["files_failed"]), dict(info["files_skipped"])
    except (OSError, ValueError, KeyError, pl.exceptions.PolarsError):
        return None


def _cache_store(
    entry: Path, frame: pl.DataFrame, files_failed: list[str], files_skipped: Counter[str]
) -> None:
    try:
        with atomic_directory(entry) as tmp:
            frame.write_parquet(tmp / "raw.parquet", compression="lz4")
            write_json_atomic(
                tmp / "info.json",
                {"files_failed": files_failed, "files_skipped": dict(files_skipped)},
            )
    except OSError as exc:  # a read-only or full cache disk must not stop a load
        log.debug("Could not write the results cache %s: %s", entry, exc)


def _read_folder(
    dataset: _Dataset,
    cache_dir: Path | None,
    files_failed: list[str],
    files_skipped: Counter[str],
    bar: Any | None,
) -> pl.DataFrame | None:
    folder_skipped: Counter[str] = Counter()
    paths = _result_files(dataset.folder, folder_skipped)
    entry = None
    if cache_dir is not None:
        entry = cache_dir / "results" / _fingerprint(dataset.folder, paths, folder_skipped)
        cached = _cache_load(entry)
        if cached is not None:
            frame, failed, skipped = cached
            for path in failed:
                log.warning("Skipping file that can't be parsed: %s (cached result)", path)
            files_failed.extend(failed)
            files_skipped.update(skipped)
            if bar is not None:
                bar.update(len(paths))
            return frame
    folder_failed: list[str] = []
    frames = _read_files(
        [(dataset.name, path) for path in paths], folder_failed, folder_skipped, bar
    )
    parsed = pl.concat(frames, how="vertical") if frames else None
    if entry is not None and parsed is not None:
        _cache_store(entry, parsed, folder_failed, folder_skipped)
    files_failed.extend(folder_failed)
    files_skipped.update(folder_skipped)
    return parsed


def _parse_one(blob: bytes, path: Path, files_failed: list[str]) -> pl.DataFrame | None:
    try:
        return _parse_chunk([blob])
    except Exception:
        pass
    try:
        document = json.loads(blob)
    except (ValueError, UnicodeDecodeError) as exc:
        files_failed.append(str(path))
        log.warning("Skipping file that can't be parsed: %s (%s)", path, exc)
        return None
    frame = _coerce_file(document)
    if frame is None:
        return pl.DataFrame(
            {
                "tier": [None],
                "top_k": [None],
                "num_active_blocks": [None],
                "num_total_blocks": [None],
                "per_sample_results": [None],
            },
            schema=_RAW_FILE_SCHEMA,
        )
    return frame.select(list(_RAW_FILE_SCHEMA))


def _explode_samples(raw: pl.DataFrame) -> pl.DataFrame:
    """One row per sample; the sample's own tier/top_k/blocks, else the file's."""
    exploded = (
        raw.rename(
            {"tier": "_file_tier", "top_k": "_file_top_k", "num_active_blocks": "_file_blocks"}
        )
        .explode("per_sample_results")
        .filter(pl.col("per_sample_results").is_not_null())
        .unnest("per_sample_results")
    )
    return exploded.with_columns(
        pl.coalesce("tier", "_file_tier").alias("tier"),
        pl.coalesce("top_k", "_file_top_k").alias("top_k"),
        pl.coalesce("num_active_blocks", "_file_blocks").alias("num_active_blocks"),
    ).drop("_file_tier", "_file_top_k", "_file_blocks")


def _skip_reason(outlier_ms: float | None) -> pl.Expr:
    """The first reason a sample is unusable, or null. Order matters: first match wins."""
    times = [*_SAMPLE_TIME_FIELDS]
    finite = [pl.col(name).is_not_null() & ~pl.col(name).is_finite() for name in times]
    rules: list[tuple[pl.Expr, str]] = [(pl.col(_REASON).is_not_null(), "")]
    rules += [(pl.col(name).is_null(), f"missing_{name}") for name in _REQUIRED_FIELDS]
    rules += [
        (~pl.col("tier").str.to_lowercase().is_in(list(TIERS)), "unknown_tier"),
        (pl.any_horizontal(finite), "nan_or_inf_time"),
        (pl.any_horizontal([pl.col(name) < 0 for name in times]), "negative_time"),
        (pl.col("output_tokens") < 1, "output_tokens_lt_1"),
        (
            (pl.col("actual_vision_tokens") < 0)
            | (pl.col("actual_text_tokens") < 0)
            | (pl.col("top_k") < 1)
            | (pl.col("num_active_blocks") < 1),
            "invalid_knob_or_token_count",
        ),
        (pl.col("T_LLM_prefill") <= 0, "zero_prefill_time"),
        ((pl.col("n_decode_passes") > 0) & (pl.col("T_LLM_decode") <= 0), "zero_decode_time"),
        (pl.col("_bad_steps"), "bad_T_decode_per_step"),
    ]
    if outlier_ms is not None:
        rules.append((pl.col("_per_pass_ms") > outlier_ms, "outlier"))
    expr = pl.lit(None, dtype=pl.String)
    for condition, reason in reversed(rules):
        value = pl.col(_REASON) if reason == "" else pl.lit(reason)
        expr = pl.when(condition.fill_null(False)).then(value).otherwise(expr)
    return expr


def load_results(
    results_dir: str | Path,
    dataset_names: Sequence[str] | None = None,
    use_all_datasets: bool = True,
    outlier_ms: float | None = 60.0,
    outlier_rel: float | None = None,
    progress: bool | None = None,
    cache: bool | str | Path = True,
) -> LoadResult:
    """Read a core-experiment results directory into samples and steps frames.

    Args:
        results_dir: RESULTS_DIR with one folder per dataset.
        dataset_names: datasets to read (underscore or hyphen spelling); None reads all.
        use_all_datasets: read every dataset folder (ignored when names are given).
        outlier_ms: drop samples whose decode time per pass exceeds this (ms); None: off.
        outlier_rel: also drop samples whose time per pass exceeds this many times the
            median of their configuration; None: off.
        progress: show a progress bar (default: when stderr is a terminal).
        cache: reuse parsed folders from the results cache (True: ``default_cache_dir()``;
            a path: that directory; False: always parse). A folder is re-read whenever
            any of its files is added, removed, resized or rewritten.

    Raises:
        LatkitError: the directory is missing, a named dataset is unknown, or no usable
            sample remains (the message says what was skipped and why).
    """
    root = Path(results_dir)
    datasets = _select_datasets(root, dataset_names, use_all_datasets)
    log.info("Found %d datasets: %s", len(datasets), ", ".join(d.name for d in datasets))
    files_skipped: Counter[str] = Counter()
    files_failed: list[str] = []
    n_candidates = sum(
        1 for d in datasets for p in d.folder.iterdir() if p.is_file() and _is_result_name(p)
    )
    if progress is None:
        progress = sys.stderr.isatty() and n_candidates > 200
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_candidates, desc="Loading results", unit="file", file=sys.stderr)
    cache_dir = (default_cache_dir() if cache is True else Path(cache)) if cache else None
    raw_frames = [
        frame
        for dataset in datasets
        if (frame := _read_folder(dataset, cache_dir, files_failed, files_skipped, bar)) is not None
    ]
    if bar is not None:
        bar.close()
    n_files = sum(frame.height for frame in raw_frames)
    skipped: Counter[str] = Counter()
    if raw_frames:
        samples, steps = _build_frames(
            pl.concat(raw_frames, how="vertical"), outlier_ms, outlier_rel, skipped
        )
    else:
        samples = pl.DataFrame(schema=SAMPLE_SCHEMA)
        steps = pl.DataFrame(schema=STEP_SCHEMA)
    n_outliers = skipped.get("outlier", 0) + skipped.get("outlier_relative", 0)
    if outlier_ms is not None:
        log.info(
            "Filtered out %d outliers (decode per-token latency > %gms/token)",
            skipped.get("outlier", 0),
            outlier_ms,
        )
    if outlier_rel is not None:
        log.info(
            "Filtered out %d outliers (decode per-token latency > %g x median of config)",
            skipped.get("outlier_relative", 0),
            outlier_rel,
        )
    valid = samples.height + n_outliers
    if valid and n_outliers / valid > _OUTLIER_WARN_FRACTION:
        log.warning(
            "WARNING: the outlier rules removed %d of %d valid samples (%.1f%%). "
            "--outlier-ms %s suits the original H100 data; on other hardware raise it or "
            "use --outlier-rel.",
            n_outliers,
            valid,
            100 * n_outliers / valid,
            outlier_ms,
        )
    other_skips = {k: v for k, v in skipped.items() if not k.startswith("outlier")}
    if other_skips:
        log.info(
            "Skipped %d invalid samples: %s",
            sum(other_skips.values()),
            ", ".join(f"{k}={v}" for k, v in sorted(other_skips.items())),
        )
    if files_failed:
        log.warning("%d file(s) could not be parsed and were skipped", len(files_failed))
    result = LoadResult(
        samples=samples,
        steps=steps,
        datasets=[d.name for d in datasets],
        n_files=n_files,
        skipped=dict(sorted(skipped.items())),
        files_failed=files_failed,
        files_skipped=dict(sorted(files_skipped.items())),
        n_filtered_outliers=n_outliers,
    )
    if samples.height == 0:
        raise LatkitError(_no_samples_message(root, result))
    return result


def _no_samples_message(root: Path, result: LoadResult) -> str:
    parts = [f"no usable samples in {root}: read {result.n_files} result file(s)"]
    if result.files_failed:
        parts.append(f"{len(result.files_failed)} file(s) could not be parsed")
    if result.skipped:
        reasons = ", ".join(f"{k}={v}" for k, v in result.skipped.items())
        parts.append(f"samples skipped: {reasons}")
    return "; ".join(parts)


def _build_frames(
    raw: pl.DataFrame,
    outlier_ms: float | None,
    outlier_rel: float | None,
    skipped: Counter[str],
) -> tuple[pl.DataFrame, pl.DataFrame]:
    samples = _explode_samples(raw).with_row_index("_row")
    steps_all = (
        samples.select("_row", "T_decode_per_step")
        .filter(pl.col("T_decode_per_step").list.len() > 0)
        .explode("T_decode_per_step")
        .with_columns(
            (pl.int_range(pl.len()).over("_row") + 1).cast(_I).alias("k"),
            pl.col("T_decode_per_step").list.mean().alias("T_decode_pass"),
            pl.col("T_decode_per_step").list.len().cast(_I).alias("n_runs"),
            pl.col("T_decode_per_step")
            .list.eval(~pl.element().is_finite() | (pl.element() < 0))
            .list.any()
            .alias("_bad_value"),
        )
    )
    bad_steps = steps_all.group_by("_row").agg(
        ((pl.col("n_runs") == 0) | pl.col("_bad_value").fill_null(True)).any().alias("_bad_steps")
    )
    n_steps = pl.col("T_decode_per_step").list.len().fill_null(0)
    samples = (
        samples.join(bad_steps, on="_row", how="left")
        .with_columns(
            pl.col("_bad_steps").fill_null(False),
            pl.when(n_steps > 0)
            .then(n_steps.cast(_I))
            .otherwise((pl.col("output_tokens") - 1).clip(lower_bound=0))
            .alias("n_decode_passes"),
        )
        .with_columns(
            pl.when(pl.col("n_decode_passes") > 0)
            .then(pl.col("T_LLM_decode") / pl.col("n_decode_passes"))
            .otherwise(0.0)
            .alias("_per_pass_ms")
        )
        .with_columns(_skip_reason(outlier_ms).alias("_skip"))
    )
    if outlier_rel is not None:
        config_median = (
            pl.col("_per_pass_ms")
            .filter(pl.col("_skip").is_null() & (pl.col("n_decode_passes") > 0))
            .median()
            .over("tier", "top_k", "num_active_blocks")
        )
        samples = samples.with_columns(
            pl.when(
                pl.col("_skip").is_null()
                & (pl.col("n_decode_passes") > 0)
                & (pl.col("_per_pass_ms") > outlier_rel * config_median)
            )
            .then(pl.lit("outlier_relative"))
            .otherwise(pl.col("_skip"))
            .alias("_skip")
        )
    for reason, count in samples["_skip"].drop_nulls().value_counts().iter_rows():
        skipped[reason] += count
    usable = samples.filter(pl.col("_skip").is_null())
    tier = pl.col("tier").str.to_lowercase()
    vision = pl.col("actual_vision_tokens")
    text = pl.col("actual_text_tokens")
    stage_sum = pl.col("T_vision_total") + pl.col("T_LLM_prefill") + pl.col("T_LLM_decode")
    usable = usable.with_columns(
        pl.int_range(pl.len(), dtype=_I).alias("sample_key"),
        tier.alias("tier"),
        tier.replace_strict({name: i for i, name in enumerate(TIERS)}, return_dtype=_I).alias(
            "tier_idx"
        ),
        pl.concat_str([tier, pl.col("top_k"), pl.col("num_active_blocks")], separator="_").alias(
            "config"
        ),
        vision.alias("vision_tokens"),
        text.alias("text_tokens"),
        pl.coalesce("total_sequence_length", vision + text).alias("total_sequence_length"),
        pl.when(pl.col("T_total").is_null() | (pl.col("T_total") <= 0))
        .then(stage_sum)
        .otherwise(pl.col("T_total"))
        .alias("T_total"),
        pl.coalesce("T_decode_per_token", pl.col("_per_pass_ms")).alias("T_decode_per_token"),
        (pl.col("T_vision_total") + pl.col("T_LLM_prefill")).alias("T_prefill_total"),
        pl.col("sample_id").fill_null(-1),
        pl.col("metadata").struct.field("device").alias("device"),
    )
    steps = (
        steps_all.join(usable.select("_row", "sample_key"), on="_row", how="inner")
        .select(list(STEP_SCHEMA))
        .cast(STEP_SCHEMA)  # type: ignore[arg-type]
        .sort("sample_key", "k")
    )
    return usable.select(list(SAMPLE_SCHEMA)).cast(SAMPLE_SCHEMA), steps  # type: ignore[arg-type]


def count_by(samples: pl.DataFrame, columns: Iterable[str]) -> pl.DataFrame:
    """Sample counts grouped by ``columns``, largest first."""
    return samples.group_by(list(columns)).len("count").sort("count", descending=True)
