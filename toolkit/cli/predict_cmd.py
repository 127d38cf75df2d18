"""``latkit predict``: latency of one configuration, or of every row of a CSV/Parquet file."""

from __future__ import annotations

import click

from toolkit.cli.options import checkpoint_option, setup_logging, verbose_option
from toolkit.errors import LatkitError


@click.command("predict")
@checkpoint_option()
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
@click.option(
    "--budget-ms",
    "--budget_ms",
    "budget_ms",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Budget mode: rank the configurations of the grid (or --configs) for one request "
    "(--text-tokens, optional --vision-tokens and expected --output-tokens) within this "
    "latency budget, with the largest output length each leaves room for.",
)
@click.option(
    "--bound",
    type=click.Choice(["mean", "p50", "p90", "p95"]),
    default="mean",
    show_default=True,
    help="Budget mode: estimates the rule uses: mean, or the calibrated bounds "
    "(p90/p95: prefill_pXX_ms against budget x safety, total_pXX_ms against the budget).",
)
@click.option(
    "--safety",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=0.8,
    show_default=True,
    help="Budget mode: prefill must fit budget x safety (the original controller's rule).",
)
@click.option(
    "--rank",
    type=click.Choice(["fastest", "quality"]),
    default="fastest",
    show_default=True,
    help="Budget mode: order of the feasible configurations (quality: highest tier, top_k "
    "and blocks first).",
)
@click.option(
    "--configs",
    default=None,
    help="Budget mode: comma-separated configurations <tier>_<top_k>_<blocks> "
    "(default: all 75 of the grid).",
)
@click.option("--json", "as_json", is_flag=True, help="Budget mode: print JSON rows.")
@verbose_option
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
    budget_ms: float | None,
    bound: str,
    safety: float,
    rank: str,
    configs: str | None,
    as_json: bool,
    verbose: bool,
) -> None:
    """Predict prefill, decode and total latency with a trained checkpoint.

    Single mode prints the original tool's block (plus the calibrated bounds); batch mode
    (--input-file/--output-file) writes the input table with prefill_ms, decode_total_ms,
    decode_per_token_ms, total_ms, prefill_p50_ms, prefill_p90_ms, prefill_p95_ms,
    total_p90_ms, total_p95_ms and extrapolated added. Budget mode (--budget-ms) answers
    which configurations fit a latency budget for one request, ranked.

    Inputs beyond the training range by more than half its width (the margin the model is
    tested to extrapolate over), and output lengths beyond 8x the longest trained answer
    (how far decode's growth was measured to hold), are answered with one warning line per
    input on stderr (batch mode: the extrapolated column says which rows). Impossible
    requests are errors: negative or fractional token counts, fewer than 1 output token,
    top_k or blocks below 1 or fractional, more blocks than the profiled model has.
    """
    from exporters.export import load_model
    from exporters.predict import predict_file, predict_single

    setup_logging(verbose)
    if budget_ms is not None:
        _budget_mode(
            checkpoint,
            budget_ms,
            text_tokens,
            vision_tokens,
            output_tokens,
            bound,
            safety,
            rank,
            configs,
            as_json,
        )
        return
    if input_file is not None or output_file is not None:
        if input_file is None or output_file is None:
            raise LatkitError("batch mode needs both --input-file and --output-file")
        model = load_model(checkpoint)
        result = predict_file(model, input_file, output_file)
        for line in result.warnings:
            click.echo(line, err=True)
        click.echo(f"Wrote {result.frame.height} predictions to {output_file}")
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
    for line in single.warnings:
        click.echo(line, err=True)
    click.echo(single.block())


def _budget_mode(
    checkpoint: str,
    budget_ms: float,
    text_tokens: float | None,
    vision_tokens: float | None,
    output_tokens: float | None,
    bound: str,
    safety: float,
    rank: str,
    configs: str | None,
    as_json: bool,
) -> None:
    import json

    from exporters.export import load_model
    from toolkit.controller import answer_budget, format_budget_table, parse_config

    if text_tokens is None:
        raise LatkitError("budget mode needs --text-tokens (the request's prompt length)")
    for flag, value, lowest in (
        ("--text-tokens", text_tokens, 0),
        ("--vision-tokens", vision_tokens, 0),
        ("--output-tokens", output_tokens, 1),
    ):
        if value is not None and not (value >= lowest and float(value).is_integer()):
            raise LatkitError(f"{flag} {value:g}: must be a whole number >= {lowest}")
    try:
        chosen = [parse_config(c) for c in configs.split(",") if c.strip()] if configs else None
    except ValueError as exc:
        raise LatkitError(f"--configs: {exc}") from None
    model = load_model(checkpoint)
    table = answer_budget(
        model.predict,
        int(text_tokens),
        budget_ms,
        vision_tokens=int(vision_tokens) if vision_tokens is not None else None,
        output_tokens=int(output_tokens) if output_tokens is not None else None,
        configs=chosen,
        safety=safety,
        bound=bound,
        rank=rank,
        supported_output_tokens=model.supported_output_tokens(),
    )
    if as_json:
        click.echo(json.dumps(table.to_dicts()))
    else:
        click.echo(format_budget_table(table, budget_ms, bound, safety))
