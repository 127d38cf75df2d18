"""``latkit profile``: a thin wrapper around :func:`toolkit.profiler.run_profile`."""

from __future__ import annotations

from pathlib import Path

import click

from toolkit.cli.options import output_dir_option, setup_logging, verbose_option


@click.command("profile")
@output_dir_option("Results directory: one folder per dataset, plus logs/run.json.", path_type=Path)
@click.option(
    "--preset",
    type=click.Choice(["tiny", "small", "molmoe-1b"]),
    default="tiny",
    show_default=True,
    help="Model dimensions (all: 16 OLMoE blocks, 64 experts, top-k routing, CLIP ViT over "
    "336 px crops, 144 tokens per crop). 'molmoe-1b': MolmoE-1B's (d_model 2048, 16 heads, "
    "expert hidden 1024, ViT-L 1024 x 23 layers; for a GPU). 'small': d_model 128, 4 heads, "
    "expert hidden 128, ViT 128 x 2 layers; compute sets its CPU latency, a full sweep takes "
    "about 45 min on one thread. 'tiny': d_model 16, 1 head, expert hidden 16, ViT 16 x 1 "
    "layer; per-op overhead sets its latency, a full sweep takes about 20 min.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where to run; auto picks CUDA when available.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="Weights and activations dtype (bfloat16 is MolmoE's usual one on a GPU).",
)
@click.option(
    "--datasets",
    default=None,
    help="Comma-separated datasets whose prompt/answer lengths to draw "
    "(default: all nine, e.g. coco_2014_vqa,coco_caption,doc_qa,...).",
)
@click.option(
    "--tiers", default="low,medium,high", show_default=True, help="Image tiers (crop ranges)."
)
@click.option(
    "--top-k",
    "--top_k",
    "top_k",
    default="4,6,8,10,12",
    show_default=True,
    help="MoE top-k values (experts per token in every block).",
)
@click.option(
    "--blocks",
    default="8,10,12,14,16",
    show_default=True,
    help="Numbers of active decoder blocks (the first n of 16 run).",
)
@click.option(
    "--samples-per-config",
    "--samples_per_config",
    "samples_per_config",
    type=int,
    default=5,
    show_default=True,
    help="Samples per (dataset, configuration) file.",
)
@click.option(
    "--repeats",
    type=int,
    default=3,
    show_default=True,
    help="Timed runs per sample; files hold the medians (and every decode pass's runs), "
    "logs/run.json the spread of the repeats: the machine's noise floor.",
)
@click.option(
    "--threads",
    type=int,
    default=None,
    help="torch threads (CPU default: 1, the steadiest timings on a shared machine).",
)
@click.option(
    "--max-minutes",
    "--max_minutes",
    "max_minutes",
    type=float,
    default=None,
    help="Stop cleanly between samples after this many minutes; every measured sample is "
    "kept in logs/samples.jsonl (finish later with --resume).",
)
@click.option(
    "--output-tokens",
    "--output_tokens",
    "output_tokens",
    default=None,
    metavar="LO-HI",
    help="Draw every sample's output length (tokens, EOS included) uniformly in [LO, HI] "
    "instead of its dataset's answer lengths, e.g. 128-448 for long answers; images and "
    "prompts stay the default draws. Recorded in logs/run.json.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the drawn samples.")
@click.option(
    "--resume",
    is_flag=True,
    help="Skip files that already exist in --output-dir and reuse the samples of unfinished "
    "files from its logs/samples.jsonl: only the missing samples are measured.",
)
@click.option(
    "--gzip", "use_gzip", is_flag=True, help="Write .json.gz files (the loader reads both)."
)
@click.option(
    "--ray",
    "ray_address",
    default=None,
    metavar="local|auto|ADDRESS",
    help="Run the sweep on Ray (needs `pip install 'latkit[ray]'`): 'local' starts Ray on "
    "this machine (CPU: --workers x --threads CPUs; GPU: one worker per GPU), 'auto' joins "
    "the running cluster, ADDRESS is host:port or ray://host:port. One ProfileWorker actor "
    "per GPU (or per --threads CPUs); same files as without --ray. Joining a cluster with "
    "token authentication (Ray 2.59+) by address needs RAY_AUTH_MODE=token and the head's "
    "token (RAY_AUTH_TOKEN or ~/.ray/auth_token) in this shell.",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    help="With --ray: number of ProfileWorker actors (default: one per GPU; on CPUs, the "
    "cluster's CPUs / --threads).",
)
@click.option(
    "--allow-mixed-devices",
    is_flag=True,
    help="With --ray: accept workers on different devices (refused by default) and record "
    "each sample's device in metadata.device.",
)
@click.option(
    "--canary-every",
    type=int,
    default=None,
    metavar="N",
    help="Every N samples each worker re-times a fixed canary sample; its time against the "
    "worker's first canary is stored per sample (metadata.speed_factor) and summarised "
    "in logs/run.json.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@verbose_option
def profile_command(
    output_dir: Path,
    preset: str,
    device: str,
    dtype: str,
    datasets: str | None,
    tiers: str,
    top_k: str,
    blocks: str,
    samples_per_config: int,
    repeats: int,
    threads: int | None,
    max_minutes: float | None,
    output_tokens: str | None,
    seed: int,
    resume: bool,
    use_gzip: bool,
    ray_address: str | None,
    workers: int | None,
    allow_mixed_devices: bool,
    canary_every: int | None,
    no_progress: bool,
    verbose: bool,
) -> None:
    """Measure a random-weight model of MolmoE-1B's architecture over the knob grid.

    For every configuration (tier x top-k x active blocks) and dataset it times the vision
    stage (ViT + projector), the prefill pass and every decode pass of drawn samples, and
    writes one core-experiment JSON file per (dataset, configuration). Samples are measured
    in rounds across all files (round j: sample j of every file, in a seeded random order),
    so the machine's drift spreads evenly over datasets and knobs; each sample is journaled
    in logs/samples.jsonl as it lands, each file written once its last sample is in. Weights
    are random: the latency follows the architecture, accuracy fields are empty.

    \b
    Example (the bundled small sweep: 675 files, about 45 minutes on one CPU thread):
      latkit profile --preset small --output-dir data/core_exp_small_cpu \\
          --samples-per-config 3 --repeats 2 --gzip
    On a Ray cluster of GPUs (one ProfileWorker per GPU, lost workers replaced):
      latkit profile --ray auto --preset molmoe-1b --device cuda --dtype bfloat16 \\
          --output-dir results/core_exp_h100
    """
    from toolkit.profiler import (
        ProfileSettings,
        make_ray_settings,
        parse_datasets,
        parse_int_list,
        parse_output_tokens,
        parse_tiers,
        run_profile,
    )

    setup_logging(verbose)
    settings = ProfileSettings(
        output_dir=output_dir,
        preset=preset,
        device=device,
        dtype=dtype,
        datasets=parse_datasets(datasets),
        tiers=parse_tiers(tiers),
        top_k=parse_int_list(top_k, "--top-k"),
        blocks=parse_int_list(blocks, "--blocks"),
        samples_per_config=samples_per_config,
        repeats=repeats,
        threads=threads,
        max_minutes=max_minutes,
        seed=seed,
        resume=resume,
        gzip=use_gzip,
        progress=not no_progress,
        canary_every=canary_every,
        output_tokens=parse_output_tokens(output_tokens),
        ray=make_ray_settings(ray_address, workers, allow_mixed_devices),
    )
    report = run_profile(settings)
    state = "stopped early (rerun with --resume)" if report.stopped_early else "done"
    on_ray = ""
    if report.engine == "ray":
        on_ray = (
            f" on Ray ({report.workers} workers, {report.restarts} restarts, start-up "
            f"{report.startup_s:.1f} s)"
        )
    reused = f" (+{report.samples_reused} from the journal)" if report.samples_reused else ""
    click.echo(
        f"profile {state}{on_ray}: {report.files_written} files written, "
        f"{report.files_skipped} skipped, {report.files_remaining} left, "
        f"{report.samples_measured} samples{reused} in {report.elapsed_s / 60:.1f} min -> "
        f"{report.output_dir} (log: {report.log_path})"
    )
