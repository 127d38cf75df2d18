"""Options shared by several commands (results selection, outlier rules, logging)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def results_selection_options(required: bool = True) -> Callable[[F], F]:
    """``--results-dir``, ``--use-all-datasets``, ``--dataset-names``, outlier rules.

    The underscore spellings of the original research scripts are accepted as aliases.
    """

    def decorate(func: F) -> F:
        options = [
            click.option(
                "--results-dir",
                "--results_dir",
                "results_dir",
                type=click.Path(file_okay=False, path_type=str),
                required=required,
                help="Core-experiment results directory (one folder per dataset).",
            ),
            click.option(
                "--use-all-datasets",
                "--use_all_datasets",
                "use_all_datasets",
                is_flag=True,
                default=False,
                help="Use every dataset folder found under --results-dir (the default when "
                "--dataset-names is not given).",
            ),
            click.option(
                "--dataset-names",
                "--dataset_names",
                "dataset_names",
                default=None,
                help="Comma-separated dataset names to use, e.g. text_vqa,doc_qa.",
            ),
            click.option(
                "--outlier-ms",
                "--outlier_ms",
                "outlier_ms",
                type=float,
                default=60.0,
                show_default=True,
                help="Drop samples whose decode time per pass exceeds this (ms). "
                "60 ms suits the original H100 data; use --outlier-rel on other hardware.",
            ),
            click.option(
                "--outlier-rel",
                "--outlier_rel",
                "outlier_rel",
                type=float,
                default=None,
                help="Also drop samples whose decode time per pass exceeds this many times "
                "the median of their configuration (e.g. 3).",
            ),
        ]
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def checkpoint_option(help: str = "Model artifact directory written by `latkit train`.") -> Any:
    """``--checkpoint`` (also ``--checkpoint-path``, ``--checkpoint_path``): a model directory."""
    return click.option(
        "--checkpoint",
        "--checkpoint-path",
        "--checkpoint_path",
        "checkpoint",
        type=click.Path(path_type=str),
        required=True,
        help=help,
    )


#: ``-v`` / ``--verbose``: debug logging (see ``setup_logging``).
verbose_option = click.option("-v", "--verbose", is_flag=True, help="Debug logging.")


def output_dir_option(help: str, *aliases: str, path_type: type = str) -> Any:
    """``--output-dir`` (also ``--output_dir`` and ``aliases``): a directory to write."""
    return click.option(
        "--output-dir",
        "--output_dir",
        *aliases,
        "output_dir",
        type=click.Path(file_okay=False, path_type=path_type),
        required=True,
        help=help,
    )


def held_out_option(help: str) -> Any:
    """``--held-out-only``: drop the checkpoint's training split before scoring/plotting."""
    return click.option(
        "--held-out-only",
        "--held_out_only",
        "held_out_only",
        is_flag=True,
        default=False,
        help=help,
    )


def unused_option(*names: str, **attrs: Any) -> Any:
    """An option of the original scripts that latkit accepts and ignores (hidden in --help)."""
    return click.option(
        *names,
        default=None,
        hidden=True,
        help="Accepted for compatibility with the original script; unused.",
        **attrs,
    )


def dataset_selection(
    use_all_datasets: bool, dataset_names: str | None
) -> tuple[list[str] | None, bool]:
    """(dataset names, use all datasets) from the two options: all when no names are given."""
    names = parse_dataset_names(dataset_names)
    return names, use_all_datasets or names is None


def parse_dataset_names(dataset_names: str | None) -> list[str] | None:
    if dataset_names is None:
        return None
    names = [name.strip() for name in dataset_names.split(",") if name.strip()]
    return names or None


def setup_logging(verbose: bool = False) -> None:
    """Log lines as the original tools printed them: plain messages on stderr."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        force=True,
    )
