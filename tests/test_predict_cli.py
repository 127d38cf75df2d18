"""``latkit predict``: single-configuration block and batch CSV/Parquet mode."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from synthetic import fit_small_model

from exporters.predict import OUTPUT_COLUMNS
from toolkit.cli import main
from toolkit.errors import LatkitError
from toolkit.features import OUTPUT_TOKENS_MULTIPLE
from toolkit.models.hybrid import HybridLatencyModel


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[HybridLatencyModel, Path]:
    root = tmp_path_factory.mktemp("predict")
    model = fit_small_model(root / "results", seed=3)
    model.save(root / "ckpt")
    return model, root / "ckpt"


def _queries() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "vision_tokens": [1008, 432, 1872, 720],
            "text_tokens": [60, 30, 100, 45],
            "tier": ["medium", "low", "high", "1"],
            "top_k": [8, 4, 12, 6],
            "num_active_blocks": [12, 8, 16, 10],
            "output_tokens": [24, 1, 1, 2],
        }
    )


def _run(*args: str):
    return CliRunner().invoke(main, ["predict", *args])


def _run_file(checkpoint: Path, src: Path, dst: Path, *args: str):
    """``predict`` in batch mode: ``src`` table in, ``dst`` table out."""
    return _run(
        "--checkpoint", str(checkpoint), "--input-file", str(src), "--output-file", str(dst), *args
    )


def test_single_mode_prints_the_original_block(checkpoint) -> None:
    model, ckpt = checkpoint
    result = _run(
        "--checkpoint",
        str(ckpt),
        "--tier",
        "medium",
        "--top-k",
        "8",
        "--blocks",
        "12",
        "--vision-tokens",
        "1008",
        "--text-tokens",
        "60",
        "--output-tokens",
        "24",
    )
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0] == "Config: tier=medium, top_k=8, blocks=12"
    assert re.fullmatch(r"  T_prefill_total: \d+\.\d\dms", lines[1])
    assert re.fullmatch(r"  T_decode_total: \d+\.\d\dms \(sum of positioned latencies\)", lines[2])
    assert re.fullmatch(r"  T_decode_per_token_avg: \d+\.\d\dms/token \(average\)", lines[3])
    assert re.fullmatch(r"  T_total \(estimated\): \d+\.\d\dms", lines[4])
    want = model.predict(np.array([[1008, 60, 1, 8, 12]], np.float32), np.array([24.0]))
    assert lines[4].endswith(f"{want['total_ms'][0]:.2f}ms")


def test_single_mode_vision_tokens_default_from_tier(checkpoint) -> None:
    _, ckpt = checkpoint
    common = [
        "--checkpoint",
        str(ckpt),
        "--tier",
        "medium",
        "--top_k",
        "8",
        "--blocks",
        "12",
        "--text-tokens",
        "60",
        "--output-tokens",
        "24",
    ]
    implicit = _run(*common)
    explicit = _run(*common, "--vision-tokens", "1008")
    assert implicit.exit_code == 0 and implicit.output == explicit.output


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_batch_mode_adds_prediction_columns(checkpoint, tmp_path: Path, suffix: str) -> None:
    model, ckpt = checkpoint
    queries = _queries()
    src, dst = tmp_path / f"in{suffix}", tmp_path / f"out{suffix}"
    if suffix == ".csv":
        queries.write_csv(src)
    else:
        queries.write_parquet(src)
    result = _run_file(ckpt, src, dst)
    assert result.exit_code == 0, result.output
    out = pl.read_csv(dst) if suffix == ".csv" else pl.read_parquet(dst)
    assert out.columns == [*queries.columns, *OUTPUT_COLUMNS, "extrapolated"]
    assert OUTPUT_COLUMNS[-2:] == ("total_p90_ms", "total_p95_ms")  # appended after 0.2's
    assert not out["extrapolated"].any()
    features = np.array(
        [[1008, 60, 1, 8, 12], [432, 30, 0, 4, 8], [1872, 100, 2, 12, 16], [720, 45, 1, 6, 10]],
        np.float32,
    )
    want = model.predict(features, queries["output_tokens"].to_numpy())
    for name in OUTPUT_COLUMNS:
        np.testing.assert_allclose(out[name].to_numpy(), want[name], rtol=1e-6)
    assert out["decode_total_ms"][1] == 0 and out["decode_per_token_ms"][2] == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.drop("top_k"), "missing column(s) top_k"),
        (
            lambda f: f.with_columns(pl.Series("text_tokens", [1.0, None, 3.0, 4.0])),
            "row 2 column text_tokens",
        ),
        (
            lambda f: f.with_columns(pl.Series("text_tokens", [1.0, float("nan"), 3.0, 4.0])),
            "row 2 column text_tokens",
        ),
        (
            lambda f: f.with_columns(pl.Series("tier", ["low", "huge", "low", "low"])),
            "unknown tier 'huge'",
        ),
        (lambda f: f.with_columns(pl.Series("top_k", ["a", "b", "c", "d"])), "not numeric"),
    ],
)
def test_bad_csv_is_one_line_and_exit_2(checkpoint, tmp_path: Path, change, message: str) -> None:
    _, ckpt = checkpoint
    src = tmp_path / "in.csv"
    change(_queries()).write_csv(src)
    result = _run_file(ckpt, src, tmp_path / "out.csv")
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert message in result.output
    assert not (tmp_path / "out.csv").exists()


def test_single_mode_needs_its_flags(checkpoint) -> None:
    _, ckpt = checkpoint
    result = _run("--checkpoint", str(ckpt), "--tier", "medium")
    assert result.exit_code == 2 and "--top-k" in result.output
    bad_tier = _run(
        "--checkpoint",
        str(ckpt),
        "--tier",
        "huge",
        "--top-k",
        "8",
        "--blocks",
        "12",
        "--text-tokens",
        "5",
        "--output-tokens",
        "5",
    )
    assert bad_tier.exit_code == 2 and "unknown tier" in bad_tier.output


def test_single_mode_warns_once_per_feature_beyond_the_margin(checkpoint) -> None:
    """Synthetic training range: top_k 4-12, blocks 8-16; supported 1-16 and 4-20 (blocks
    above the model's 16 are impossible, an error: see the impossible-request tests)."""
    _, ckpt = checkpoint
    args = ["--checkpoint", str(ckpt), "--tier", "medium", "--text-tokens", "60"]
    args += ["--output-tokens", "8", "--vision-tokens", "1008"]
    inside = CliRunner().invoke(main, ["predict", *args, "--top-k", "16", "--blocks", "4"])
    assert inside.exit_code == 0 and "warning" not in inside.output
    beyond = CliRunner().invoke(main, ["predict", *args, "--top-k", "99", "--blocks", "3"])
    assert beyond.exit_code == 0, beyond.output
    warnings = [line for line in beyond.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2
    assert "top_k 99 is beyond the training range 4-12" in warnings[0]
    assert "num_active_blocks 3" in warnings[1]
    assert "T_prefill_total" in beyond.stdout and "warning" not in beyond.stdout


def test_batch_mode_flags_extrapolated_rows(checkpoint, tmp_path: Path) -> None:
    _, ckpt = checkpoint
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    _queries().with_columns(pl.Series("top_k", [8, 99, 12, 6])).write_csv(src)
    result = _run_file(ckpt, src, dst)
    assert result.exit_code == 0, result.output
    assert pl.read_csv(dst)["extrapolated"].to_list() == [False, True, False, False]
    assert [line for line in result.stderr.splitlines() if "top_k 99" in line]


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("top_k", 0, "top_k must be >= 1"),
        ("num_active_blocks", 0, "num_active_blocks must be >= 1"),
        ("text_tokens", -5, "row 2 column text_tokens is negative"),
    ],
)
def test_impossible_batch_inputs_are_errors(
    checkpoint, tmp_path: Path, column: str, value: int, message: str
) -> None:
    _, ckpt = checkpoint
    src = tmp_path / "in.csv"
    queries = _queries()
    values = queries[column].to_list()
    values[1] = value
    queries.with_columns(pl.Series(column, values)).write_csv(src)
    result = _run_file(ckpt, src, tmp_path / "o.csv")
    assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("top_k", 4.5, "top_k must be a whole number: 1 row(s), first row 2 has 4.5"),
        ("output_tokens", 0, "output_tokens must be >= 1"),
        ("output_tokens", 8.5, "output_tokens must be a whole number"),
        ("text_tokens", 30.25, "text_tokens must be a whole number"),
        ("num_active_blocks", 99, "num_active_blocks must be <= 16 (the model has 16 blocks)"),
    ],
)
def test_impossible_requests_in_a_batch_are_errors(
    checkpoint, tmp_path: Path, column: str, value: float, message: str
) -> None:
    """A request the profiled model cannot run is an error, not an extrapolation: counts
    that are not whole, an answer of no token, more blocks than the model has (16, read from
    the training data's num_total_blocks and kept in the manifest)."""
    model, ckpt = checkpoint
    assert model.num_total_blocks == 16
    values = _queries()[column].cast(pl.Float64).to_list()
    values[1] = value
    src = tmp_path / "in.csv"
    _queries().with_columns(pl.Series(column, values)).write_csv(src)
    result = _run_file(ckpt, src, tmp_path / "o.csv")
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--output-tokens", "0", "--output-tokens 0: must be >= 1"),
        ("--output-tokens", "8.5", "--output-tokens 8.5: must be a whole number"),
        ("--blocks", "99", "--blocks 99: must be <= 16 (the model has 16 blocks)"),
        ("--text-tokens", "60.5", "--text-tokens 60.5: must be a whole number"),
    ],
)
def test_impossible_single_requests_are_errors(
    checkpoint, flag: str, value: str, message: str
) -> None:
    _, ckpt = checkpoint
    args = {"--tier": "medium", "--top-k": "8", "--blocks": "12", "--text-tokens": "60"}
    args["--output-tokens"] = "8"
    args[flag] = value
    result = _run("--checkpoint", str(ckpt), *[x for pair in args.items() for x in pair])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_long_answers_are_flagged_beyond_the_supported_multiple(checkpoint, tmp_path: Path) -> None:
    """Decode is trusted to OUTPUT_TOKENS_MULTIPLE x the longest trained answer (24 tokens
    in the synthetic data): beyond it single mode warns naming output_tokens and batch mode
    flags the row; a top_k beyond the grid stays a warning (the format does not say how
    many experts the model has)."""
    model, ckpt = checkpoint
    longest = model.manifest["training_summary"]["output_tokens_range"][1]
    limit = OUTPUT_TOKENS_MULTIPLE * longest
    assert model.supported_output_tokens() == limit
    args = ["--checkpoint", str(ckpt), "--tier", "medium", "--top-k", "8", "--blocks", "12"]
    args += ["--text-tokens", "60"]
    far = _run(*args, "--output-tokens", "5000")
    assert far.exit_code == 0, far.output
    warnings = [line for line in far.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "output_tokens 5000" in warnings[0], far.stderr
    near = _run(*args, "--output-tokens", str(int(limit)))
    assert near.exit_code == 0 and "warning" not in near.stderr
    src, dst = tmp_path / "in.csv", tmp_path / "out.csv"
    _queries().with_columns(pl.Series("output_tokens", [20, 5000, 1, int(limit) + 1])).write_csv(
        src
    )
    result = _run_file(ckpt, src, dst)
    assert result.exit_code == 0, result.output
    assert pl.read_csv(dst)["extrapolated"].to_list() == [False, True, False, True]
    assert f"output_tokens {int(limit) + 1}, 5000 is beyond" in result.stderr
    many_experts = _run(*args[:4], "--top-k", "99", *args[6:], "--output-tokens", "8")
    assert many_experts.exit_code == 0 and "top_k 99" in many_experts.stderr


def test_model_refuses_impossible_inputs(checkpoint) -> None:
    model, _ = checkpoint
    with pytest.raises(LatkitError, match="text_tokens must be >= 0"):
        model.predict(np.array([[432, -5, 0, 8, 12]], np.float32), np.array([8.0]))
    with pytest.raises(LatkitError, match="tier_idx must be 0, 1 or 2"):
        model.predict(np.array([[432, 5, 3, 8, 12]], np.float32), np.array([8.0]))
