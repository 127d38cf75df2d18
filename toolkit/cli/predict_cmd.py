"""``latkit predict``: latency of one configuration, or of every row of a CSV/Parquet file."""

from __future__ import annotations

import click

from toolkit.cli.options import setup_logging
from toolkit.errors import LatkitError


@click.command("predict")
@click.option(
    "--checkpoint",
    "--checkpoint-path",
    "--checkpoint_path",
    "checkpoint",
    type=click.Path(path_type=str),
    required=True,
    help="Model artifact directory written by `latkit train`.",
)
@click.option(
    "--input-file",
    "--input_file",
    "input_file",
    type=click.Path(path_type=str),
    default=None,
    help="Batch mode: CSV or Parquet with columns vision_tokens, "
    "text_tokens, tier (name or 0-2), top_k, num_active_blocks, output_tokens.",
)
@click.option(
    "--output-file",
    "--output_file",
    "output_file",
    type=click.Path(path_type=str),
    default=None,
    help="Batch mode: where to write input + predictions (.csv/.parquet).",
)
@click.option("--tier", default=None, help="Single mode: low, medium or high (or 0-2).")
@click.option(
    "--top-k",
    "--top_k",
    "top_k",
    type=click.IntRange(min=1),
    default=None,
    help="Single mode: MoE top_k.",
)
@click.option(
    "--blocks",
    "--num-active-blocks",
    "--num_active_blocks",
    "blocks",
    type=click.IntRange(min=1),
    default=None,
    help="Single mode: active blocks.",
)
@click.option(
    "--vision-tokens",
    "--vision_tokens",
    "vision_tokens",
    type=float,
    default=None,
    help="Single mode: vision tokens; default (mean crops of the tier + 1) x 144 "
    "(low 432, medium 1008, high 1872).",
)
@click.option(
    "--text-tokens",
    "--text_tokens",
    "text_tokens",
    type=float,
    default=None,
    help="Single mode: prompt text tokens.",
)
@click.option(
    "--output-tokens",
    "--output_tokens",
    "output_tokens",
    type=float,
    default=None,
    help="Single mode: tokens to generate (N tokens = N-1 decode passes).",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def predict_command(
    checkpoint: str,
    input_file: str | None,
    output_file: str | None,
    tier: str | None,
    top_k: int | None,
    blocks: int | None,
    vision_tokens: float | None,
    text_tokens: float | None,
    output_tokens: float | None,
    verbose: bool,
) -> None:
    """Predict prefill, decode and total latency with a trained checkpoint.

    Single mode prints the original tool's block; batch mode (--input-file/--output-file)
    writes the input table with prefill_ms, decode_total_ms, decode_per_token_ms, total_ms,
    prefill_p50_ms, prefill_p90_ms and prefill_p95_ms added.
    """
    from exporters.export import load_model
    from exporters.predict import predict_file, predict_single

    setup_logging(verbose)
    if input_file is not None or output_file is not None:
        if input_file is None or output_file is None:
            raise LatkitError("batch mode needs both --input-file and --output-file")
        model = load_model(checkpoint)
        result = predict_file(model, input_file, output_file)
        click.echo(f"Wrote {result.height} predictions to {output_file}")
        return
    missing = [
        flag
        for flag, value in (
            ("--tier", tier),
            ("--top-k", top_k),
            ("--blocks", blocks),
            ("--text-tokens", text_tokens),
            ("--output-tokens", output_tokens),
        )
        if value is None
    ]
    if missing:
        raise LatkitError(f"single mode needs {', '.join(missing)} (or use --input-file)")
    assert tier is not None and top_k is not None and blocks is not None
    assert text_tokens is not None and output_tokens is not None
    model = load_model(checkpoint)
    single = predict_single(
        model,
        tier=tier,
        top_k=top_k,
        num_active_blocks=blocks,
        vision_tokens=vision_tokens,
        text_tokens=text_tokens,
        output_tokens=output_tokens,
    )
    click.echo(single.block())
