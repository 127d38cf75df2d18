"""``latkit train`` end to end on generated core-exp results (CliRunner, a few seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from toolkit.cli import main
from toolkit.models import HybridLatencyModel


def _train(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["train", *args])
    return result.exit_code, result.output


def test_train_writes_a_loadable_model(results_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    code, output = _train(
        [
            "--results-dir",
            str(results_dir),
            "--use-all-datasets",
            "--output-dir",
            str(out),
            "--num-epochs",
            "3",
            "--device",
            "cpu",
        ]
    )
    assert code == 0, output
    assert "Found 3 datasets" in output
    # Quiet by default: no per-epoch lines, one summary line.
    assert "Epoch" not in output
    summary = [line for line in output.splitlines() if line.startswith("Trained on")]
    assert len(summary) == 1, output
    assert (
        "Trained on 104 samples (sample split; 32 for early stopping, 26 to calibrate" in summary[0]
    )
    assert "total_p95 covers" in summary[0] and summary[0].endswith(f"-> {out}")
    model = HybridLatencyModel.load(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training_summary"]["split"] == "sample"
    assert manifest["training_summary"]["n_calibration"] == 26
    assert manifest["validation_metrics"]["prefill"]["n"] == 32
    assert model.manifest["training_summary"]["datasets"] == ["coco_2014_vqa", "doc_qa", "text_vqa"]


def test_underscore_aliases_and_config_split(results_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    code, output = _train(
        [
            "--results_dir",
            str(results_dir),
            "--dataset_names",
            "doc_qa,text_vqa",
            "--checkpoint_path",
            str(out),
            "--num_epochs",
            "2",
            "--batch_size",
            "32",
            "--max_samples",
            "80",
            "--split",
            "config",
            "--seed",
            "1",
            "-v",
        ]
    )
    assert code == 0, output
    # -v shows the original tool's per-epoch lines and the split details.
    assert "Epoch 1/2: loss=" in output and "prefill_mae=" in output
    assert "decode_total_mae=" in output and "Epoch 2/2" in output
    assert f"Training completed! Best model saved to {out}" in output
    assert "Held-out configurations:" in output
    summary = json.loads((out / "manifest.json").read_text())["training_summary"]
    assert summary["split"] == "config"
    assert summary["n_train"] + summary["n_val"] + summary["n_calibration"] == 80
    assert summary["datasets"] == ["doc_qa", "text_vqa"]


def test_missing_or_empty_results_dir_exits_2(tmp_path: Path) -> None:
    code, output = _train(
        ["--results-dir", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o")]
    )
    assert code == 2 and "Traceback" not in output
    assert "nope" in output
    empty = tmp_path / "empty"
    empty.mkdir()
    code, output = _train(["--results-dir", str(empty), "--output-dir", str(tmp_path / "o")])
    assert code == 2 and "Traceback" not in output
    assert not (tmp_path / "o").exists()


def test_bad_option_exits_2(results_dir: Path, tmp_path: Path) -> None:
    code, _ = _train(
        ["--results-dir", str(results_dir), "--output-dir", str(tmp_path / "o"), "--split", "bogus"]
    )
    assert code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_gpu_exits_2(results_dir: Path, tmp_path: Path) -> None:
    code, output = _train(
        [
            "--results-dir",
            str(results_dir),
            "--output-dir",
            str(tmp_path / "o"),
            "--device",
            "cuda",
            "--num-epochs",
            "1",
        ]
    )
    assert code == 2 and "CUDA" in output and "Traceback" not in output
