"""The terminal view of an evaluation (``latkit evaluate``'s printed report)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from reports.evaluation import FLOOR_FACTOR
from reports.tables import (
    TARGET_LABELS,
    Table,
    both_groups,
    checks_table,
    config_table,
    format_value,
    headline_table,
    long_answers_table,
    mape_ratio_text,
    unprofiled_table,
    verdict_text,
)

__all__ = ["format_report", "format_table", "long_answer_line", "render_table"]


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Plain monospace table: first column left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(c).ljust(widths[i]) if i == 0 else str(c).rjust(widths[i])
            for i, c in enumerate(cells)
        ]
        return "  ".join(parts).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def render_table(table: Table) -> list[str]:
    return format_table(table.header, table.text_rows())


def _metric_block(title: str, metrics: Mapping[str, Any]) -> list[str]:
    return [
        f"{title} (n={metrics['n']}):",
        f"  MAE:            {format_value(metrics['mae_ms'])} ms",
        f"  RMSE:           {format_value(metrics['rmse_ms'])} ms",
        f"  MAPE:           {format_value(metrics['mape_pct'])} %",
        f"  R²:             {format_value(metrics['r2'], 4)}",
        f"  Relative error: {format_value(metrics['rel_error_pct'])} %",
    ]


_METRIC_TITLES: dict[str, str] = {
    "prefill": "Prefill latency (T_vision_total + T_LLM_prefill)",
    "decode_total": "Decode total latency (T_LLM_decode, samples with >= 1 pass)",
    "decode_per_token": "Decode per token (mean time of one pass)",
    "total": "Total latency (prefill + decode)",
}


def _profiling_note(result: Mapping[str, Any]) -> str:
    profiling = both_groups(result)
    if profiling is not None:
        ratio = profiling["mape_ratio"]
        return (
            "never-profiled / profiled MAPE: prefill "
            f"{mape_ratio_text(ratio.get('prefill'))}, decode total "
            f"{mape_ratio_text(ratio.get('decode_total'))} "
            "(DESIGN.md targets: 1.10x interpolation, 1.15x sparse grid, 1.25x beyond the grid)"
        )
    if "profiling" in result:
        seen = result["profiling"]["profiled"]
        return (
            "(every configuration scored is in the model's training data)"
            if seen["n_samples"]
            else "(no configuration scored is in the model's training data)"
        )
    return "(the model carries no training data: profiled configurations unknown)"


def format_report(result: Mapping[str, Any], max_configs: int | None = None) -> str:
    """The printed report: warnings, metric blocks, verdicts, long answers, bias and coverage
    (profiled and never profiled apart), per-config table, models side by side."""
    lines = [
        "=" * 72,
        "Latency model evaluation",
        "=" * 72,
        f"Samples: {result['n_samples']}  (outliers filtered: {result['n_filtered_outliers']})",
    ]
    for warning in result.get("warnings", []):
        lines.append(f"⚠ {warning['message']}")
    lines.append("")
    for target, title in _METRIC_TITLES.items():
        if target in result:
            lines += [*_metric_block(title, result[target]), ""]
    lines.append(
        f"Performance assessment (target: DESIGN.md's MAPE, or {FLOOR_FACTOR:g} x the noise "
        "floor where the data is noisier than that allows):"
    )
    for target, verdict in result.get("verdict", {}).items():
        label = {"prefill": "Prefill latency", "decode_total": "Decode total latency"}[target]
        lines.append("  " + verdict_text(label, verdict))
    lines.append("")
    long_answers = result.get("long_answers")
    if long_answers:
        lines.append("Long answers (longer than any the model was trained on):")
        lines += render_table(long_answers_table(long_answers))
        lines.append("")
    lines += [
        "Bias and bound coverage",
        "  bias: share of actuals <= the point prediction (0.5 = unbiased)",
        "  coverage: share of actuals <= the bound (nominal: the bound's level)",
    ]
    if both_groups(result) is not None:
        lines.append("  profiled: the configuration is in the model's training data")
    lines += render_table(checks_table(result))
    lines += [_profiling_note(result), ""]
    n_configs = len(result["per_config"])
    lines.append(f"Per-configuration errors ({n_configs} configurations, by sample count):")
    lines += render_table(config_table(result, max_configs))
    if max_configs is not None and max_configs < n_configs:
        lines.append(f"... {n_configs - max_configs} more in the JSON")
    lines.append("")
    title = "Models side by side (same samples)"
    n_train = result.get("baselines_train_samples")
    if "baselines" in result and n_train:
        title += f"; baselines fit on {n_train} training samples"
    lines.append(title + ":")
    for target, label in TARGET_LABELS.items():
        if target in result:
            lines.append(f"{label}:")
            lines += render_table(headline_table(result, target))
    floor = result.get("noise_floor", {})
    if floor.get("prefill", {}).get("n") or floor.get("decode_total", {}).get("n"):
        lines.append(
            "(noise floor: the error a perfect model would make, from samples that repeat "
            f"identical work: prefill {floor['prefill']['n']} samples in "
            f"{floor['prefill']['n_groups']} groups, decode {floor['decode_total']['n']} in "
            f"{floor['decode_total']['n_groups']})"
        )
    lookup = result.get("baselines", {}).get("lookup_table", {})
    if lookup.get("n_fallback_samples"):
        lines.append(
            f"(lookup table: {lookup['n_fallback_samples']} samples of configurations unseen in "
            "training used the global means)"
        )
    never = unprofiled_table(result)
    if "baselines" in result and never.rows and both_groups(result) is not None:
        lines += [
            "",
            "Models on profiled vs never-profiled configurations (profiled: in the model's "
            "training data):",
            *render_table(never),
        ]
    return "\n".join(lines)


def _percent(share: Any, digits: int) -> str:
    return format_value(None if share is None else 100.0 * share, digits)


def long_answer_line(block: Mapping[str, Any]) -> str:
    """The long-answer summary in one line (``latkit demo`` prints it)."""
    growth, low_high = block["growth"], block["output_tokens_range"]
    coverage = block.get("coverage", {})
    covers = ", ".join(
        f"{name.removesuffix('_ms')} covers {_percent(share, 1)} %"
        for name, share in coverage.items()
    )
    return (
        f"{block['n_samples']} answers of {low_high[0]}-{low_high[1]} tokens (trained on <= "
        f"{block['trained_max_output_tokens']}): decode total MAPE "
        f"{format_value(block['decode_total']['mape_pct'])} % (in range, "
        f"{block['in_range']['min_output_tokens']}+ tokens: "
        f"{format_value(block['in_range']['decode_total_mape_pct'])} %), bias "
        f"{format_value(block['decode_total_bias'])}, growth error "
        f"{format_value(growth['mean_abs_rel_error_pct'])} % over {growth['n']} answers "
        f"({_percent(growth['share_predicted_too_slow'], 0)} % predicted too slow)"
        + (f", {covers}" if covers else "")
    )
