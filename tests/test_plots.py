"""Figures of ``latkit plot``: every file written, a real PNG of sane size, headless."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from synthetic import decode_pass_ms, fit_small_model, make_samples, write_results_dir

from reports.plots import FIGURE_NAMES, make_plots, pick_curve_configs, prepare_plot_data
from toolkit.data import load_results
from toolkit.features import feature_matrix
from toolkit.models.hybrid import HybridLatencyModel
from toolkit.training import knob_split

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class OracleModel:
    """The synthetic physics itself, slightly biased: predictions without any training."""

    def predict_decode_passes(self, features: np.ndarray, ks: np.ndarray) -> np.ndarray:
        kv = features[:, 0:1] + features[:, 1:2] + np.asarray(ks)[None, :]
        return decode_pass_ms(features[:, 3:4], features[:, 4:5], kv) * 1.02  # type: ignore[arg-type]

    def predict_frame(self, samples: pl.DataFrame) -> Mapping[str, np.ndarray]:
        features = feature_matrix(samples)
        passes = samples["n_decode_passes"].to_numpy()
        ks = np.arange(1, max(int(passes.max()), 1) + 1, dtype=np.float32)
        per_pass = self.predict_decode_passes(features, ks)
        total = (per_pass * (ks[None, :] <= passes[:, None])).sum(axis=1)
        noise = np.random.default_rng(0).normal(1.0, 0.02, samples.height)
        return {
            "prefill_ms": samples["T_prefill_total"].to_numpy() * noise,
            "decode_total_ms": total,
        }


def _check_figures(directory: Path) -> None:
    for name in FIGURE_NAMES:
        path = directory / name
        assert path.is_file(), name
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC), name
        assert 20_000 < len(data) < 2_000_000, (name, len(data))


def test_make_plots_writes_every_figure(tmp_path: Path) -> None:
    write_results_dir(tmp_path / "results", make_samples(n_per_config=2, seed=0))
    loaded = load_results(tmp_path / "results")
    paths = make_plots(
        OracleModel(), loaded.samples, loaded.steps, tmp_path / "figs", max_samples=120
    )
    assert [p.name for p in paths] == list(FIGURE_NAMES)
    _check_figures(tmp_path / "figs")
    assert not list((tmp_path / "figs").glob(".*.tmp"))  # atomic writes leave no temp files


#: RGB of matplotlib's tab:blue (profiled) and tab:orange (never profiled).
BLUE = (0x1F, 0x77, 0xB4)
ORANGE = (0xFF, 0x7F, 0x0E)


def _has_colour(path: Path, rgb: tuple[int, int, int], min_pixels: int = 200) -> bool:
    from matplotlib.image import imread

    pixels = np.round(imread(path)[..., :3] * 255).astype(int)
    return int(np.all(np.abs(pixels - np.array(rgb)) <= 2, axis=-1).sum()) >= min_pixels


def test_new_figures_of_a_model_trained_on_a_knob_split(tmp_path: Path) -> None:
    write_results_dir(tmp_path / "results", make_samples(n_per_config=2, seed=6))
    loaded = load_results(tmp_path / "results")
    profiled, _ = knob_split(loaded.samples, "extrap")
    model = HybridLatencyModel(
        num_epochs=2, device="cpu", prefill_params={"n_estimators": 30, "nthread": 1}
    ).fit(profiled, loaded.steps)
    assert model.training_data is not None

    # which samples count as profiled: those whose configuration the model trained on
    data = prepare_plot_data(model, loaded.samples)
    assert data.profiled is not None
    trained_on = loaded.samples["config"].is_in(model.training_data["config"].to_list())
    np.testing.assert_array_equal(data.profiled, trained_on.to_numpy())
    assert 0 < data.profiled.sum() < loaded.samples.height

    paths = make_plots(model, loaded.samples, loaded.steps, tmp_path / "figs")
    assert [p.name for p in paths] == list(FIGURE_NAMES)
    _check_figures(tmp_path / "figs")
    for name in ("calibration.png", "unprofiled_configs.png"):
        path = tmp_path / "figs" / name
        # both groups drawn, each in its own colour
        assert _has_colour(path, BLUE) and _has_colour(path, ORANGE), name

    # without training data the groups are unknown: neither colour appears
    make_plots(OracleModel(), loaded.samples, loaded.steps, tmp_path / "oracle")
    unknown = tmp_path / "oracle" / "unprofiled_configs.png"
    assert not _has_colour(unknown, BLUE) and not _has_colour(unknown, ORANGE)


def test_plots_without_step_timings(tmp_path: Path) -> None:
    write_results_dir(tmp_path / "results", make_samples(n_per_config=1, seed=1), with_steps=False)
    loaded = load_results(tmp_path / "results")
    assert loaded.steps.height == 0
    make_plots(OracleModel(), loaded.samples, loaded.steps, tmp_path / "figs")
    # the pass curve says there is nothing to draw instead of failing
    assert (tmp_path / "figs" / "decode_pass_curve.png").stat().st_size > 5_000


def test_curve_configs_prefer_long_sequences_one_per_tier() -> None:
    samples = pl.DataFrame(
        {
            "sample_key": [0, 1, 2, 3],
            "config": ["low_4_8", "low_8_8", "high_4_8", "medium_4_8"],
            "tier": ["low", "low", "high", "medium"],
        }
    )
    steps = pl.DataFrame(
        {
            "sample_key": [0] * 3 + [1] * 9 + [2] * 5 + [3] * 1,
            "k": [*range(1, 4), *range(1, 10), *range(1, 6), 1],
        }
    )
    # medium reaches only k = 1: no curve; low's longest config first
    assert pick_curve_configs(samples, steps, n_configs=3) == ["low_8_8", "high_4_8", "low_4_8"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:

    root = tmp_path_factory.mktemp("plot-cli")
    results = root / "results"
    fit_small_model(results, seed=4, n_estimators=30).save(root / "checkpoint")
    return root / "checkpoint", results


def test_cli_plot(trained: tuple[Path, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from toolkit.cli import main

    checkpoint, results = trained
    out = tmp_path / "figures"
    result = CliRunner().invoke(
        main,
        [
            "plot",
            "--checkpoint_path",
            str(checkpoint),
            "--results_dir",
            str(results),
            "--output_dir",
            str(out),
            "--max_samples",
            "100",
        ],
    )
    assert result.exit_code == 0, result.output
    _check_figures(out)
    assert "decode_pass_curve.png" in result.output


def test_cli_plot_missing_checkpoint_exits_2(tmp_path: Path, results_dir: Path) -> None:
    from click.testing import CliRunner

    from toolkit.cli import main

    result = CliRunner().invoke(
        main,
        [
            "plot",
            "--checkpoint",
            str(tmp_path / "nope"),
            "--results-dir",
            str(results_dir),
            "--output-dir",
            str(tmp_path / "figs"),
        ],
    )
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1


def test_cli_plot_held_out_only_with_nothing_held_out(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from toolkit.cli import main

    # Under 10 samples the model spares none for calibration: it trains on every sample, so
    # nothing is held out.
    results, checkpoint = tmp_path / "results", tmp_path / "checkpoint"
    few = make_samples(
        n_per_config=1,
        datasets=("text_vqa",),
        tiers=("low", "high"),
        top_ks=(4, 8),
        blocks=(8, 16),
    )
    write_results_dir(results, few)
    loaded = load_results(results)
    assert loaded.samples.height < 10
    model = HybridLatencyModel(num_epochs=1, device="cpu", prefill_params={"n_estimators": 5})
    model.fit(loaded.samples, loaded.steps).save(checkpoint)
    assert model.training_data is not None
    assert model.training_data.height == loaded.samples.height
    result = CliRunner().invoke(
        main,
        [
            "plot",
            "--checkpoint",
            str(checkpoint),
            "--results-dir",
            str(results),
            "--output-dir",
            str(tmp_path / "figs"),
            "--held-out-only",
        ],
    )
    assert result.exit_code == 2
    assert "no held-out samples" in result.output


def test_decode_pass_curve_draws_long_answers_in_their_own_panel(tmp_path: Path) -> None:
    """Answers longer than any trained: measured against predicted in a second panel, with
    the longest trained answer marked; without them, one panel as before."""
    from reports.plots import plot_decode_pass_curve

    short, long = tmp_path / "short", tmp_path / "long"
    model = fit_small_model(short, seed=9, n_estimators=20)
    longest = model.manifest["training_summary"]["output_tokens_range"][1]
    write_results_dir(
        long,
        make_samples(
            n_per_config=2,
            seed=10,
            datasets=("text_vqa",),
            top_ks=(8,),
            blocks=(16,),
            min_output_tokens=40,
            max_output_tokens=60,
        ),
    )
    both = pl.concat(
        [
            load_results(short).samples,
            load_results(long).samples.with_columns(pl.col("sample_key") + 100_000),
        ]
    )
    steps = pl.concat(
        [
            load_results(short).steps,
            load_results(long).steps.with_columns(pl.col("sample_key") + 100_000),
        ]
    )
    figure = plot_decode_pass_curve(model, both, steps)
    axes = [ax for ax in figure.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == [
        "answers within the trained length",
        "long answers, beyond any trained",
    ]
    long_axis = axes[1]
    assert max(line.get_xdata()[-1] for line in long_axis.get_lines()) >= 39  # passes drawn
    marks = [line for line in long_axis.get_lines() if line.get_linestyle() == ":"]
    assert len(marks) == 1 and marks[0].get_xdata()[0] == longest - 1
    predicted = [line for line in long_axis.get_lines() if "predicted" in str(line.get_label())]
    assert len(predicted) == 3  # one per tier (3 configurations of long answers)
    single = plot_decode_pass_curve(model, load_results(short).samples, load_results(short).steps)
    assert len(single.axes) == 1
