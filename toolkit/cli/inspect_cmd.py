"""``latkit inspect``: what a results directory holds, and what the loader skips."""

from __future__ import annotations

import json

import click

from toolkit.cli.options import parse_dataset_names, results_selection_options, setup_logging


@click.command("inspect")
@results_selection_options()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def inspect_command(
    results_dir: str,
    use_all_datasets: bool,
    dataset_names: str | None,
    outlier_ms: float,
    outlier_rel: float | None,
    as_json: bool,
) -> None:
    """Summarise a core-experiment results directory.

    Prints datasets, files, samples per dataset and per configuration, and every skipped
    record counted by reason. Exit status 2 when no usable sample exists.
    """
    from toolkit.inspect import inspect_results, summary_json, summary_text

    setup_logging()
    result = inspect_results(
        results_dir,
        dataset_names=parse_dataset_names(dataset_names),
        outlier_ms=outlier_ms,
        outlier_rel=outlier_rel,
    )
    if as_json:
        click.echo(json.dumps(summary_json(result)))
    else:
        click.echo(summary_text(result))
