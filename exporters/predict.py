"""Batch and single predictions from a model checkpoint (``latkit predict``).

Input tables (CSV or Parquet, by suffix) hold one row per query with the columns
``vision_tokens, text_tokens, tier, top_k, num_active_blocks, output_tokens``; ``tier`` is a
name (low/medium/high) or an index (0-2). The output is the input plus ``OUTPUT_COLUMNS``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from exporters.runtime import InputError, tier_to_index
from toolkit.atomic import atomic_path
from toolkit.errors import LatkitError
from toolkit.features import (
    FEATURE_MINIMUM,
    FEATURE_NAMES,
    OUTPUT_NAMES,
    PREFILL_BOUND_COLUMNS,
    TIERS,
    default_vision_tokens,
    request_problems,
)

if TYPE_CHECKING:
    from toolkit.models.hybrid import HybridLatencyModel

INPUT_COLUMNS: tuple[str, ...] = (
    "vision_tokens",
    "text_tokens",
    "tier",
    "top_k",
    "num_active_blocks",
    "output_tokens",
)
#: Output columns of batch mode: the four of the contract, the prefill bounds in ascending
#: order, then (appended in latkit 0.3) the total bounds; then the ``extrapolated`` flag.
OUTPUT_COLUMNS: tuple[str, ...] = (
    *OUTPUT_NAMES[:4],
    *list(PREFILL_BOUND_COLUMNS.values())[1:],
    *[name for name in OUTPUT_NAMES if name.startswith("total_p")],
)
EXTRAPOLATED_COLUMN = "extrapolated"
_NUMERIC = ("vision_tokens", "text_tokens", "top_k", "num_active_blocks", "output_tokens")
#: ``latkit predict``'s option of each input (single mode's error messages).
_FLAGS = {"top_k": "--top-k", "num_active_blocks": "--blocks"}


def read_table(path: str | Path) -> pl.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise LatkitError(f"{path}: no such input file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pl.read_parquet(path)
        if suffix in (".csv", ".txt"):
            return pl.read_csv(path, infer_schema_length=None)
    except Exception as exc:  # polars raises several error types for bad files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LatkitError(f"{path}: cannot read ({first})") from None
    raise LatkitError(f"{path}: unknown input format {suffix!r} (use .csv or .parquet)")


def write_table(frame: pl.DataFrame, path: str | Path) -> None:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise LatkitError(f"{path}: unknown output format {suffix!r} (use .csv or .parquet)")
    with atomic_path(path) as tmp:
        if suffix == ".parquet":
            frame.write_parquet(tmp)
        else:
            frame.write_csv(tmp)


def table_inputs(
    frame: pl.DataFrame, source: str = "input", num_total_blocks: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 [B, 5], output_tokens float32 [B]) of a query table, validated: an
    impossible request (``toolkit.features.request_problems``) is an error naming the column
    and the first row."""
    missing = [c for c in INPUT_COLUMNS if c not in frame.columns]
    if missing:
        raise LatkitError(f"{source}: missing column(s) {', '.join(missing)}")
    if frame.height == 0:
        raise LatkitError(f"{source}: no rows")
    columns: dict[str, np.ndarray] = {}
    for name in _NUMERIC:
        try:
            values = frame[name].cast(pl.Float64, strict=True).to_numpy()
        except Exception:
            raise LatkitError(f"{source}: column {name} is not numeric") from None
        bad = ~np.isfinite(values)
        if bad.any():
            raise LatkitError(
                f"{source}: row {int(np.argmax(bad)) + 1} column {name} is empty, NaN or infinite"
            )
        if (values < 0).any():
            raise LatkitError(
                f"{source}: row {int(np.argmax(values < 0)) + 1} column {name} is negative"
            )
        columns[name] = values
    tiers = frame["tier"].to_list()
    tier_idx = np.empty(len(tiers), dtype=np.float32)
    for i, tier in enumerate(tiers):
        if tier is None:
            raise LatkitError(f"{source}: row {i + 1} column tier is empty")
        try:
            tier_idx[i] = tier_to_index(
                str(tier) if not isinstance(tier, int | float) else tier, TIERS
            )[0]
        except InputError as exc:
            raise LatkitError(f"{source}: row {i + 1}: {exc}") from None
    columns["tier_idx"] = tier_idx
    features = np.stack([columns[name] for name in FEATURE_NAMES], axis=1).astype(np.float32)
    tokens = columns["output_tokens"].astype(np.float32)
    # Checked on the float64 values read: a float32 cast would hide 4.0000001.
    raw = np.stack([columns[name] for name in FEATURE_NAMES], axis=1)
    problems = request_problems(raw, columns["output_tokens"], num_total_blocks)
    if problems:
        raise LatkitError(f"{source}: impossible input: " + "; ".join(_one_based(problems)))
    return features, tokens


def _one_based(problems: list[str]) -> list[str]:
    """Row numbers in messages 1-based, like the other input errors of a table."""
    return [re.sub(r"first row (\d+)", lambda m: f"first row {int(m[1]) + 1}", p) for p in problems]


@dataclass(frozen=True)
class BatchPrediction:
    frame: pl.DataFrame
    warnings: list[str]


def predict_file(
    model: HybridLatencyModel, input_file: str | Path, output_file: str | Path
) -> BatchPrediction:
    """Predict every row of ``input_file`` and write input + predictions (and the
    ``extrapolated`` flag) to ``output_file``; ``warnings`` has one line per feature that
    lies beyond the model's supported range."""
    frame = read_table(input_file)
    features, tokens = table_inputs(frame, str(input_file), model.num_total_blocks)
    out = model.predict(features, tokens)
    flags, warnings = model.extrapolation(features, tokens)
    result = frame.with_columns(
        [pl.Series(name, np.asarray(out[name], dtype=np.float64)) for name in OUTPUT_COLUMNS]
        + [pl.Series(EXTRAPOLATED_COLUMN, flags)]
    )
    write_table(result, output_file)
    return BatchPrediction(frame=result, warnings=warnings)


@dataclass(frozen=True)
class SinglePrediction:
    tier: str
    top_k: int
    num_active_blocks: int
    vision_tokens: float
    text_tokens: float
    output_tokens: float
    values: dict[str, float]
    warnings: list[str]

    def block(self) -> str:
        """The block the original ``test_adaptive_inference.py --test_latency_estimator``
        printed for each configuration."""
        v = self.values
        return "\n".join(
            [
                f"Config: tier={self.tier}, top_k={self.top_k}, blocks={self.num_active_blocks}",
                f"  T_prefill_total: {v['prefill_ms']:.2f}ms",
                f"  T_decode_total: {v['decode_total_ms']:.2f}ms (sum of positioned latencies)",
                f"  T_decode_per_token_avg: {v['decode_per_token_ms']:.2f}ms/token (average)",
                f"  T_total (estimated): {v['total_ms']:.2f}ms",
                f"  Bounds: prefill P90 {v['prefill_p90_ms']:.2f}ms, P95 "
                f"{v['prefill_p95_ms']:.2f}ms; total P90 {v['total_p90_ms']:.2f}ms, P95 "
                f"{v['total_p95_ms']:.2f}ms",
            ]
        )


def predict_single(
    model: HybridLatencyModel,
    *,
    tier: str | int,
    top_k: int,
    num_active_blocks: int,
    text_tokens: float,
    output_tokens: float,
    vision_tokens: float | None = None,
) -> SinglePrediction:
    try:
        index = int(tier_to_index(tier, TIERS)[0])
    except InputError as exc:
        raise LatkitError(f"--tier: {exc}") from None
    name = TIERS[index]
    if vision_tokens is None:
        vision_tokens = float(default_vision_tokens(name))
    values = {
        "vision_tokens": vision_tokens,
        "text_tokens": text_tokens,
        "top_k": top_k,
        "num_active_blocks": num_active_blocks,
        "output_tokens": output_tokens,
    }
    for key, value in values.items():
        minimum = FEATURE_MINIMUM[key]
        if not np.isfinite(value) or value < minimum:
            raise LatkitError(f"--{key.replace('_', '-')}: must be a number >= {minimum:g}")
    raw = np.array([[vision_tokens, text_tokens, index, top_k, num_active_blocks]], np.float64)
    problems = request_problems(raw, np.array([output_tokens]), model.num_total_blocks)
    if problems:
        # One line per input, named as its option: "--output-tokens must be >= 1 (...)".
        first = problems[0].split(":")[0]
        name, _, rule = first.partition(" must be ")
        flag = _FLAGS.get(name, "--" + name.replace("_", "-"))
        raise LatkitError(f"{flag} {float(values[name]):g}: must be {rule}")
    features = raw.astype(np.float32)
    tokens = np.array([output_tokens], dtype=np.float32)
    out: dict[str, Any] = model.predict(features, tokens)
    _, warnings = model.extrapolation(features, tokens)
    return SinglePrediction(
        tier=name,
        top_k=int(top_k),
        num_active_blocks=int(num_active_blocks),
        vision_tokens=float(vision_tokens),
        text_tokens=float(text_tokens),
        output_tokens=float(output_tokens),
        values={k: float(np.asarray(out[k])[0]) for k in OUTPUT_COLUMNS},
        warnings=warnings,
    )
