"""``latkit inspect``: text and JSON reports, exit 0 with samples and 2 without."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from toolkit.cli import main


def test_inspect_json_counts_usable_samples(results_dir: Path) -> None:
    first = sorted(results_dir.rglob("*.json"))[0]
    document = json.loads(first.read_text())
    document["per_sample_results"][0]["tier"] = "ultra"
    first.write_text(json.dumps(document))
    result = CliRunner().invoke(main, ["inspect", "--results-dir", str(results_dir), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) >= {"datasets", "n_files", "n_samples", "n_steps", "skipped", "files_failed"}
    assert report["datasets"] == ["coco_2014_vqa", "doc_qa", "text_vqa"]
    assert report["n_files"] == 81
    assert report["n_samples"] == 161
    assert report["skipped"] == {"unknown_tier": 1}
    assert report["n_steps"] > report["n_samples"]


def test_inspect_text_report_and_underscore_aliases(results_dir: Path) -> None:
    result = CliRunner().invoke(
        main, ["inspect", "--results_dir", str(results_dir), "--dataset_names", "doc_qa"]
    )
    assert result.exit_code == 0, result.output
    assert "Datasets (1): doc_qa" in result.stdout
    assert "Usable samples: 54" in result.stdout
    assert "medium_8_12" in result.stdout


def test_inspect_exit_2_on_junk_or_missing_directory(tmp_path: Path) -> None:
    junk = tmp_path / "junk" / "text-vqa"
    junk.mkdir(parents=True)
    (junk / "a.json").write_text("{ truncated")
    result = CliRunner().invoke(
        main, ["inspect", "--results-dir", str(tmp_path / "junk"), "--json"]
    )
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "Error: no usable samples" in result.stderr
    assert "Traceback" not in result.output
    missing = CliRunner().invoke(main, ["inspect", "--results-dir", str(tmp_path / "nope")])
    assert missing.exit_code == 2
    assert "results directory not found" in missing.stderr
