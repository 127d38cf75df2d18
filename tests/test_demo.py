"""``latkit demo``'s long-answer line, printed from the bundled long-answer sweep when it is
there (generated data stands in for it here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from synthetic import fit_small_model, make_samples, write_results_dir

from reports.evaluation import drop_training_samples, evaluate_checkpoint
from reports.text import format_value
from toolkit.data import load_results
from toolkit.demo import long_answer_lines


def test_long_answer_line(tmp_path: Path) -> None:
    model = fit_small_model(tmp_path / "short", seed=21, n_estimators=20)
    model.save(tmp_path / "ckpt")
    long = tmp_path / "core_exp_long"
    answers = make_samples(
        n_per_config=1,
        seed=22,
        datasets=("text_vqa",),
        top_ks=(4, 12),
        blocks=(8,),
        min_output_tokens=62,
        max_output_tokens=75,
    )
    write_results_dir(long, answers)
    out = tmp_path / "long.json"
    lines = long_answer_lines(tmp_path / "ckpt", long, out)
    trained = model.manifest["training_summary"]["output_tokens_range"][1]
    assert lines[1] == "Long answers (core_exp_long):"
    low = min(a.output_tokens for a in answers)
    high = max(a.output_tokens for a in answers)
    assert lines[2].startswith(f"  6 answers of {low}-{high} tokens (trained on <= {trained})")
    assert "growth error" in lines[2] and "over 6 answers" in lines[2]
    assert "total_p95 covers" in lines[2]
    assert out.is_file()
    # within the trained lengths: said in one line, no numbers made up
    lines = long_answer_lines(tmp_path / "ckpt", tmp_path / "short", out)
    assert lines[1].endswith("none longer than the model's training answers.")


def test_long_answer_line_compares_with_held_out_answers_in_range(tmp_path: Path) -> None:
    """A sweep of long answers has no in-range answers: the line takes them from the held-out
    part of the sweep the model was trained on (answers of 21+ tokens, within the trained
    length), scored independently here."""
    model = fit_small_model(tmp_path / "short", seed=23, n_estimators=20, val_fraction=0.4)
    model.save(tmp_path / "ckpt")
    long = tmp_path / "core_exp_long"
    write_results_dir(
        long,
        make_samples(
            n_per_config=1, seed=24, datasets=("okvqa",), min_output_tokens=62, max_output_tokens=70
        ),
    )
    held_out = evaluate_checkpoint(tmp_path / "ckpt", tmp_path / "short", held_out_only=True)
    lines = long_answer_lines(tmp_path / "ckpt", long, tmp_path / "long.json", held_out)
    held, _ = drop_training_samples(load_results(tmp_path / "short").samples, model.training_data)
    trained = model.manifest["training_summary"]["output_tokens_range"][1]
    part = held.filter((pl.col("output_tokens") >= 21) & (pl.col("output_tokens") <= trained))
    assert part.height > 0
    truth = part["T_LLM_decode"].to_numpy()
    predicted = model.predict_frame(part)["decode_total_ms"]
    mape = float(np.mean(np.abs(predicted - truth) / truth) * 100)
    assert f"(in range, 21+ tokens: {format_value(mape)} %)" in lines[2]
