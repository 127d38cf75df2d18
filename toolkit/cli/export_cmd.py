"""``latkit export``: write the fused predictor (ONNX, TorchScript) and prove its parity."""

from __future__ import annotations

import click

from toolkit.cli.options import checkpoint_option, output_dir_option, setup_logging, verbose_option


@click.command("export")
@checkpoint_option()
@output_dir_option("Directory for latency_predictor.onnx / latency_predictor.ts.")
@click.option(
    "--format",
    "formats",
    default="onnx,torchscript",
    show_default=True,
    help="Comma-separated formats: onnx, torchscript.",
)
@click.option(
    "--opset",
    type=click.IntRange(min=17),
    default=18,
    show_default=True,
    help="ONNX opset version.",
)
@click.option(
    "--max-cells",
    "--max_cells",
    "max_cells",
    type=click.IntRange(min=1),
    default=None,
    help="Largest prefill lookup table (cells) to build; default 4194304.",
)
@verbose_option
def export_command(
    checkpoint: str,
    output_dir: str,
    formats: str,
    opset: int,
    max_cells: int | None,
    verbose: bool,
) -> None:
    """Export ONE predictor per format: the physics baseline, the prefill trees compiled to
    an exact lookup table, the decode network and the calibrated bounds, as one graph of
    ordinary ops.

    Inputs `features` float32 [B, 5] (vision_tokens, text_tokens, tier_idx, top_k,
    num_active_blocks) and `output_tokens` float32 [B]; outputs prefill_ms, decode_total_ms,
    decode_per_token_ms, total_ms, prefill_p90_ms, prefill_p95_ms, prefill_p50_ms,
    total_p90_ms, total_p95_ms. Every file is checked against the Python model on the
    checkpoint's training data and on every split threshold before it is written.

    Beside each predictor goes the budget query, latency_budget.onnx / .ts: inputs
    `features` [B, 5] and `budget_ms` [B], outputs max_output_tokens (on total_ms),
    max_output_tokens_p90 and _p95 (on total_p90_ms / total_p95_ms): the largest answer
    length that fits, 0 if even the prefill does not.
    """
    from exporters.export import export_checkpoint
    from exporters.tree_table import DEFAULT_MAX_CELLS

    setup_logging(verbose)
    result = export_checkpoint(
        checkpoint, output_dir, formats, opset, max_cells or DEFAULT_MAX_CELLS
    )
    bins = ", ".join(f"{k}={v}" for k, v in result.thresholds_per_feature.items())
    click.echo(f"Prefill lookup table: {result.n_cells:,} cells (split thresholds: {bins})")
    click.echo(f"Decode network: {result.decode_form} form")
    for fmt, path in result.written.items():
        click.echo(f"Wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
        for label, report in result.parity[fmt]:
            click.echo("  parity " + report.line(label))
    for fmt, path in result.budget_written.items():
        click.echo(
            f"Wrote {path} (budget query: max output tokens within budget_ms; equals the "
            f"Python controller on {100 * result.budget_agreement[fmt]:.2f}% of checked rows)"
        )
