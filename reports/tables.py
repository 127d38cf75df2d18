"""An evaluation's tables, view-neutral: header, rows of raw values, digits per column.

``reports.text`` prints them and ``reports.html`` lays them out (with each number's full
value kept for sorting), so both views show the same cells of the same ``Evaluation``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from reports.evaluation import FLOOR_FACTOR, MIN_FLOOR_GROUPS
from toolkit.features import BOUND_LEVELS

#: Display names of the models in the side-by-side tables.
MODEL_LABELS: Final[dict[str, str]] = {
    "hybrid": "hybrid (physics x trees + decode net)",
    "lookup_table": "lookup table (config means)",
    "linear": "linear regression",
    "single_network": "original single network",
    "trees_only": "trees-only prefill (latkit 0.2)",
}
#: Cell of a metric a model does not predict (the trees-only baseline has no decode).
MISSING: Final[str] = "—"
#: Targets of the headline tables and their bounds (decode has none of its own).
TARGET_LABELS: Final[dict[str, str]] = {
    "prefill": "prefill",
    "decode_total": "decode total",
    "total": "total",
}
TARGET_BOUNDS: Final[dict[str, tuple[str, str] | None]] = {
    "prefill": ("prefill_p90_ms", "prefill_p95_ms"),
    "decode_total": None,
    "total": ("total_p90_ms", "total_p95_ms"),
}


def format_value(value: Any, digits: int = 2) -> str:
    """A cell as text: n/a for missing or non-finite numbers, yes/no for flags."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


@dataclass
class Table:
    """Rows of raw values (str, int, float, bool or None) under ``header``; floats show
    ``digits[column]`` decimals."""

    header: list[str]
    rows: list[list[Any]]
    digits: list[int]

    def text_rows(self) -> list[list[str]]:
        return [
            [format_value(value, self.digits[i]) for i, value in enumerate(row)]
            for row in self.rows
        ]


def _models(result: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    return [("hybrid", result), *result.get("baselines", {}).items()]


def headline_table(result: Mapping[str, Any], target: str) -> Table:
    """Every model (and the noise floor) on one target: MAE, MAPE, R², bias, and the
    coverage of the target's P90/P95 bounds."""
    bounds = TARGET_BOUNDS[target]
    header = ["model", "n", "MAE ms", "MAPE %", "R²", "bias"]
    digits = [0, 0, 2, 2, 4, 2]
    if bounds:
        header += [f"{bounds[0]} covers", f"{bounds[1]} covers"]
        digits += [3, 3]
    rows: list[list[Any]] = []
    for name, scores in _models(result):
        block = scores.get(target)
        label = MODEL_LABELS.get(name, name)
        if block is None:
            rows.append([label, *([MISSING] * (len(header) - 1))])
            continue
        row = [
            label,
            block["n"],
            block["mae_ms"],
            block["mape_pct"],
            block["r2"],
            scores.get("bias", {}).get(target),
        ]
        if bounds:
            coverage = scores.get("coverage")
            row += [MISSING, MISSING] if not coverage else [coverage.get(b) for b in bounds]
        rows.append(row)
    floor = result.get("noise_floor", {}).get(target)
    if floor and floor.get("n"):
        row = ["noise floor (repeated identical work)", floor["n"], floor["mae_ms"]]
        rows.append([*row, floor["mape_pct"], *([""] * (len(header) - 4))])
    return Table(header, rows, digits)


def both_groups(scores: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ``profiling`` block when it has samples of both profiled and never-profiled
    configurations, else None (then one column says it all)."""
    profiling = scores.get("profiling")
    if profiling is None:
        return None
    both = profiling["profiled"]["n_samples"] and profiling["unprofiled"]["n_samples"]
    return profiling if both else None


def checks_table(result: Mapping[str, Any]) -> Table:
    """The model's accuracy, bias and bound coverage: all samples, and the profiled and
    never-profiled configurations separately when both are there."""
    profiling = both_groups(result)
    columns: list[Mapping[str, Any]] = [result]
    header = ["", "all"]
    if profiling is not None:
        columns += [profiling["profiled"], profiling["unprofiled"]]
        header += ["profiled", "never profiled"]

    def row(label: str, key: str, inner: str) -> list[Any]:
        return [label, *((block.get(key) or {}).get(inner) for block in columns)]

    rows: list[list[Any]] = []
    if profiling is not None:
        rows.append(["configurations", result["n_configs"], *(b["n_configs"] for b in columns[1:])])
        rows.append(["samples", result["n_samples"], *(b["n_samples"] for b in columns[1:])])
        rows.append(row("prefill MAPE %", "prefill", "mape_pct"))
        rows.append(row("decode total MAPE %", "decode_total", "mape_pct"))
    for target in ("prefill", "decode_total", "total"):
        rows.append(row(f"bias {TARGET_LABELS[target]}", "bias", target))
    for name, level in BOUND_LEVELS.items():
        if name in result.get("coverage", {}):
            rows.append(row(f"coverage {name} (nominal {level:.2f})", "coverage", name))
    return Table(header, rows, [2] * len(header))


def mape_ratio_text(value: Any) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.2f}x"


def unprofiled_table(result: Mapping[str, Any]) -> Table:
    """One row per model with both groups: MAPE on profiled and on never-profiled
    configurations, and their ratio."""
    header = [
        "model",
        "prefill MAPE % profiled",
        "never",
        "ratio",
        "decode total MAPE % profiled",
        "never",
        "ratio",
        "prefill bias never",
    ]
    rows: list[list[Any]] = []
    for name, scores in _models(result):
        profiling = both_groups(scores)
        if profiling is None:
            continue
        cells: list[Any] = [MODEL_LABELS.get(name, name)]
        for target in ("prefill", "decode_total"):
            seen = profiling["profiled"].get(target)
            never = profiling["unprofiled"].get(target)
            if seen is None:
                cells += [MISSING] * 3
                continue
            ratio = profiling["mape_ratio"].get(target)
            cells += [seen["mape_pct"], never["mape_pct"], mape_ratio_text(ratio)]
        cells.append(profiling["unprofiled"]["bias"].get("prefill"))
        rows.append(cells)
    return Table(header, rows, [2] * len(header))


#: How far from nominal observed coverage may be and still count as calibrated ("within a few
#: points", DESIGN.md); the calibration figure shades the same band.
COVERAGE_TOLERANCE: Final[float] = 0.03


def calibration_table(result: Mapping[str, Any]) -> Table:
    """Every bound: nominal and observed coverage (all, profiled, never profiled), and
    whether the whole set is within ``COVERAGE_TOLERANCE`` of nominal."""
    profiling = both_groups(result)
    header = ["bound", "nominal", "observed"]
    groups: list[Mapping[str, Any]] = []
    if profiling is not None:
        header += ["profiled", "never profiled"]
        groups = [profiling["profiled"], profiling["unprofiled"]]
    header.append(f"within ±{100 * COVERAGE_TOLERANCE:.0f} points")
    rows: list[list[Any]] = []
    coverage = result.get("coverage", {})
    for name, level in BOUND_LEVELS.items():
        if name not in coverage:
            continue
        observed = coverage[name]
        near = observed is not None and abs(observed - level) <= COVERAGE_TOLERANCE
        rows.append(
            [
                name,
                level,
                observed,
                *((g.get("coverage") or {}).get(name) for g in groups),
                near,
            ]
        )
    return Table(header, rows, [0, 2, *([3] * (len(header) - 3)), 0])


def config_table(result: Mapping[str, Any], max_rows: int | None = None) -> Table:
    """The per-configuration table (by sample count), with the profiled flag when known."""
    items = list(result["per_config"].items())
    known = any(row.get("profiled") is not None for _, row in items)
    header = [
        "config",
        *(["profiled"] if known else []),
        "count",
        "prefill MAE ms",
        "prefill MAPE %",
        "decode total MAE ms",
        "decode total MAPE %",
    ]
    rows = [
        [
            name,
            *([row.get("profiled")] if known else []),
            row["count"],
            row["prefill_mae_ms"],
            row.get("prefill_mape_pct"),
            row["decode_total_mae_ms"],
            row.get("decode_total_mape_pct"),
        ]
        for name, row in items[:max_rows]
    ]
    return Table(header, rows, [2] * len(header))


def long_answers_table(block: Mapping[str, Any]) -> Table:
    """The long-answer summary (``reports.long_answers``) as label / value rows."""
    growth, in_range = block["growth"], block["in_range"]
    low, high = block["output_tokens_range"]
    rows: list[list[Any]] = [
        ["samples (answers longer than any trained)", block["n_samples"]],
        ["output tokens of those answers", f"{low}-{high}"],
        ["longest trained answer (output tokens)", block["trained_max_output_tokens"]],
        [
            "answers beyond the model's supported length "
            f"({format_value(block.get('supported_output_tokens'), 0)} output tokens)",
            block.get("n_beyond_supported"),
        ],
        ["decode total MAPE %", block["decode_total"]["mape_pct"]],
        [
            f"in-range decode total MAPE % (answers of {in_range['min_output_tokens']}+ "
            f"tokens, {in_range['n']} samples)",
            in_range["decode_total_mape_pct"],
        ],
        ["decode total bias (share of actuals <= prediction)", block["decode_total_bias"]],
        [
            f"growth error % (whole answer / first {growth['passes']} passes; "
            f"{growth['n']} samples with those passes timed)",
            growth["mean_abs_rel_error_pct"],
        ],
        ["largest growth error %", growth["max_abs_rel_error_pct"]],
        ["share of answers whose growth is predicted too slow", growth["share_predicted_too_slow"]],
    ]
    for name, share in block.get("coverage", {}).items():
        rows.append([f"{name} covers (nominal {BOUND_LEVELS[name]:.2f})", share])
    return Table(["", "value"], rows, [0, 2])


def verdict_text(target_label: str, verdict: Mapping[str, Any]) -> str:
    """One line: is the MAPE within its target, and which target (and why) was used."""
    mape, threshold = verdict["mape_pct"], verdict["threshold_pct"]
    floor, groups = verdict["noise_floor_pct"], verdict.get("noise_floor_groups", 0)
    if verdict["basis"] == "noise floor":
        why = (
            f"{FLOOR_FACTOR:g} x the noise floor of {floor:.2f} %, as the design target of "
            f"{verdict['design_target_pct']:g} % is below what this data allows"
        )
    elif floor is not None and math.isfinite(floor) and groups < MIN_FLOOR_GROUPS:
        why = (
            f"the design target; the noise floor ({floor:.2f} %) rests on {groups} group(s) "
            f"of identical work, too few to judge by ({MIN_FLOOR_GROUPS} needed)"
        )
    elif floor is not None and math.isfinite(floor):
        why = f"the design target; noise floor {floor:.2f} %"
    else:
        why = "the design target"
    if verdict["ok"]:
        return f"{target_label}: ✓ within target (MAPE {mape:.2f} % <= {threshold:.2f} %: {why})"
    shown = format_value(mape)
    return f"{target_label}: ⚠ Needs improvement (MAPE {shown} % > {threshold:.2f} %: {why})"


#: The columns of a recalibration curve row (``toolkit.recalibrate.CurveRow``).
CURVE_KEYS: Final[tuple[str, ...]] = (
    "model",
    "n_samples",
    "prefill_mape_pct",
    "prefill_r2",
    "decode_total_mape_pct",
    "decode_total_r2",
    "total_p95_coverage",
)


def curve_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    """The recalibration curve (``latkit recalibrate --curve``'s recalibration_curve.json)."""
    header = [
        "model",
        "N",
        "prefill MAPE %",
        "prefill R²",
        "decode total MAPE %",
        "decode total R²",
        "total_p95 covers",
    ]
    cells = [[row.get(k) for k in CURVE_KEYS] for row in rows]
    return Table(header, cells, [0, 0, 2, 4, 2, 4, 3])
