"""The loader reads the core-exp format exactly and counts every skip by reason."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from synthetic import make_samples, sample_record, write_results_dir

from toolkit.data import SAMPLE_SCHEMA, STEP_SCHEMA, load_results
from toolkit.errors import LatkitError


def _files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.json"))


def _edit(path: Path, edit: object) -> None:
    document = json.loads(path.read_text())
    edit(document)  # type: ignore[operator]
    path.write_text(json.dumps(document))


def test_clean_directory_loads_every_sample(results_dir: Path) -> None:
    result = load_results(results_dir)
    assert result.datasets == ["coco_2014_vqa", "doc_qa", "text_vqa"]
    assert result.n_files == 81
    assert result.n_samples == 162
    assert result.skipped == {}
    assert result.files_failed == []
    assert dict(result.samples.schema) == SAMPLE_SCHEMA
    assert dict(result.steps.schema) == STEP_SCHEMA
    assert result.samples["sample_key"].to_list() == list(range(162))


def test_derived_columns_follow_the_spec(tmp_path: Path) -> None:
    samples = make_samples(
        n_per_config=1, seed=3, datasets=["okvqa"], tiers=["medium"], top_ks=[8], blocks=[12]
    )
    write_results_dir(tmp_path, samples)
    result = load_results(tmp_path)
    row = result.samples.row(0, named=True)
    source = samples[0]
    assert row["dataset"] == "okvqa"
    assert row["config"] == "medium_8_12"
    assert row["tier_idx"] == 1
    assert row["vision_tokens"] == source.vision_tokens
    assert row["text_tokens"] == source.text_tokens
    assert row["n_decode_passes"] == source.output_tokens - 1
    assert row["T_prefill_total"] == pytest.approx(source.t_vision + source.t_prefill)
    steps = result.steps.filter(pl.col("sample_key") == row["sample_key"])
    assert steps["k"].to_list() == list(range(1, source.output_tokens))
    expected = [sum(runs) / len(runs) for runs in source.pass_runs_ms]
    assert steps["T_decode_pass"].to_list() == pytest.approx(expected)
    assert steps["T_decode_pass"].sum() == pytest.approx(row["T_LLM_decode"])


def test_gzip_files_read_the_same(tmp_path: Path) -> None:
    samples = make_samples(n_per_config=2, seed=1)
    write_results_dir(tmp_path / "plain", samples)
    write_results_dir(tmp_path / "gz", samples, gzip_files=True)
    plain = load_results(tmp_path / "plain").samples.drop("file")
    packed = load_results(tmp_path / "gz").samples.drop("file")
    assert plain.equals(packed)


def test_dataset_selection_and_auto_detection(
    results_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (results_dir / "logs").mkdir()
    (results_dir / "logs" / "run.json").write_text("{}")
    (results_dir / "empty-folder").mkdir()
    with caplog.at_level(logging.INFO, logger="latkit.data"):
        result = load_results(results_dir, use_all_datasets=True)
    assert "Found 3 datasets: coco_2014_vqa, doc_qa, text_vqa" in caplog.text
    assert result.datasets == ["coco_2014_vqa", "doc_qa", "text_vqa"]
    picked = load_results(results_dir, dataset_names=["text-vqa", "doc_qa"])
    assert set(picked.samples["dataset"].unique()) == {"text_vqa", "doc_qa"}
    with pytest.raises(LatkitError, match=r"not found.*mmmu"):
        load_results(results_dir, dataset_names=["mmmu"])


def test_rank_files_are_skipped_beside_a_merged_file(results_dir: Path) -> None:
    merged = _files(results_dir / "doc-qa")[0]
    merged.with_name(merged.stem + "_rank0.json").write_text(merged.read_text())
    merged.with_name(merged.stem + "_rank1.json").write_text(merged.read_text())
    orphan = results_dir / "doc-qa" / "doc-qa_imgsizetier-low_crops2_topk6_blocks8_rank0.json"
    orphan.write_text(merged.read_text())
    result = load_results(results_dir)
    assert result.files_skipped == {"rank_duplicate": 2}
    assert result.n_files == 82  # the orphan rank file has no merged file: it is data


def test_junk_records_are_counted_by_reason(results_dir: Path) -> None:
    files = _files(results_dir)

    def junk(document: dict) -> None:
        samples = document["per_sample_results"]
        samples[0]["T_LLM_prefill"] = "12.5ms"
        samples[1]["T_LLM_decode"] = float("nan")

    _edit(files[0], junk)
    _edit(files[1], lambda d: d["per_sample_results"][0].update(T_vision_total=-1.0))
    _edit(files[1], lambda d: d["per_sample_results"][1].update(tier="ultra"))
    _edit(files[2], lambda d: d["per_sample_results"][0].update(output_tokens=0))
    _edit(files[2], lambda d: d["per_sample_results"][1].pop("T_LLM_prefill"))
    _edit(files[3], lambda d: d["per_sample_results"][0].update(T_LLM_prefill=0.0))
    _edit(files[3], lambda d: d["per_sample_results"][1].update(T_total=float("inf")))
    _edit(files[4], lambda d: d["per_sample_results"][0].update(T_decode_per_step=[[1.0], "x"]))
    result = load_results(results_dir)
    assert result.skipped == {
        "bad_T_decode_per_step": 1,
        "missing_T_LLM_prefill": 1,
        "nan_or_inf_time": 2,
        "negative_time": 1,
        "non_numeric_T_LLM_prefill": 1,
        "output_tokens_lt_1": 1,
        "unknown_tier": 1,
        "zero_prefill_time": 1,
    }
    assert result.n_samples == 162 - 9


def test_truncated_and_non_result_files_are_named_and_skipped(
    results_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = _files(results_dir)
    files[0].write_text(files[0].read_text()[:300])
    (results_dir / "text-vqa" / "summary.json").write_text(json.dumps({"accuracy": 0.5}))
    (results_dir / "text-vqa" / "list.json").write_text("[1, 2, 3]")
    with caplog.at_level(logging.INFO, logger="latkit.data"):
        result = load_results(results_dir)
    assert result.files_failed == [str(files[0])]
    assert str(files[0]) in caplog.text
    assert result.files_skipped == {"not_a_result_file": 2}
    assert result.n_files == 80
    assert result.n_samples == 160


def test_empty_decode_steps_and_missing_per_sample_knobs(tmp_path: Path) -> None:
    samples = make_samples(
        n_per_config=2, seed=2, datasets=["st_qa"], tiers=["low"], top_ks=[4], blocks=[8]
    )
    [path] = write_results_dir(tmp_path, samples)

    def strip(document: dict) -> None:
        for record in document["per_sample_results"]:
            del record["tier"], record["top_k"], record["num_active_blocks"]
        document["per_sample_results"][0]["T_decode_per_step"] = []

    _edit(path, strip)
    result = load_results(tmp_path)
    assert result.samples["config"].to_list() == ["low_4_8", "low_4_8"]
    first = result.samples.row(0, named=True)
    assert first["n_decode_passes"] == samples[0].output_tokens - 1
    assert result.steps.filter(pl.col("sample_key") == 0).height == 0
    assert result.steps.filter(pl.col("sample_key") == 1).height == samples[1].output_tokens - 1


def test_total_time_is_derived_when_zero(tmp_path: Path) -> None:
    samples = make_samples(
        n_per_config=1, seed=4, datasets=["mmmu"], tiers=["high"], top_ks=[12], blocks=[16]
    )
    [path] = write_results_dir(tmp_path, samples)
    _edit(path, lambda d: d["per_sample_results"][0].update(T_total=0))
    row = load_results(tmp_path).samples.row(0, named=True)
    assert row["T_total"] == pytest.approx(
        row["T_vision_total"] + row["T_LLM_prefill"] + row["T_LLM_decode"]
    )


def test_single_token_answers_have_no_decode(tmp_path: Path) -> None:
    samples = make_samples(
        n_per_config=1, seed=5, datasets=["tally_qa"], tiers=["low"], top_ks=[4], blocks=[8]
    )
    samples[0].output_tokens = 1
    samples[0].pass_runs_ms = []
    write_results_dir(tmp_path, samples)
    row = load_results(tmp_path).samples.row(0, named=True)
    assert row["n_decode_passes"] == 0
    assert row["T_LLM_decode"] == 0.0
    assert row["T_decode_per_token"] == 0.0


def test_outlier_threshold_is_an_option(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    samples = make_samples(
        n_per_config=10, seed=6, datasets=["coco_caption"], tiers=["low"], top_ks=[4], blocks=[8]
    )
    samples[0].output_tokens = 3
    samples[0].pass_runs_ms = [[90.0, 91.0], [95.0, 96.0]]
    write_results_dir(tmp_path, samples)
    with caplog.at_level(logging.INFO, logger="latkit.data"):
        result = load_results(tmp_path)
    assert result.skipped == {"outlier": 1}
    assert result.n_filtered_outliers == 1
    assert "Filtered out 1 outliers (decode per-token latency > 60ms/token)" in caplog.text
    assert "WARNING: the outlier rules removed 1 of 10" in caplog.text
    assert load_results(tmp_path, outlier_ms=100.0).n_samples == 10
    assert load_results(tmp_path, outlier_ms=None).n_samples == 10


def test_relative_outlier_rule(tmp_path: Path) -> None:
    samples = make_samples(
        n_per_config=12, seed=7, datasets=["coco_caption"], tiers=["low"], top_ks=[4], blocks=[8]
    )
    samples[3].output_tokens = 3
    samples[3].pass_runs_ms = [[30.0], [31.0]]  # ~10x the config's median, below 60 ms
    write_results_dir(tmp_path, samples)
    assert load_results(tmp_path).n_samples == 12
    result = load_results(tmp_path, outlier_rel=3.0)
    assert result.skipped == {"outlier_relative": 1}
    assert 3 not in result.samples["sample_id"].to_list()


def test_missing_directory_and_nothing_usable_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(LatkitError, match="results directory not found"):
        load_results(tmp_path / "absent")
    with pytest.raises(LatkitError, match="no dataset folders"):
        load_results(tmp_path)
    folder = tmp_path / "doc-qa"
    folder.mkdir()
    (folder / "doc-qa_x.json").write_text('{"per_sample_results": [')
    record = sample_record(
        make_samples(1, 0, datasets=["doc_qa"], tiers=["low"], top_ks=[4], blocks=[8])[0]
    )
    record["tier"] = "giant"
    gz = folder / "doc-qa_y.json.gz"
    gz.write_bytes(gzip.compress(json.dumps({"per_sample_results": [record]}).encode()))
    with pytest.raises(
        LatkitError, match=r"no usable samples.*could not be parsed.*unknown_tier=1"
    ):
        load_results(tmp_path)


def test_cache_gives_the_same_frames_and_sees_changes(results_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cold = load_results(results_dir, cache=cache)
    assert len(list((cache / "results").iterdir())) == 3  # one entry per dataset folder
    warm = load_results(results_dir, cache=cache)
    assert warm.samples.equals(cold.samples)
    assert warm.steps.equals(cold.steps)
    uncached = load_results(results_dir, cache=False)
    assert uncached.samples.equals(cold.samples)

    first = _files(results_dir)[0]
    _edit(first, lambda d: d["per_sample_results"][0].update(tier="ultra"))
    changed = load_results(results_dir, cache=cache)
    assert changed.skipped == {"unknown_tier": 1}
    first.write_text(first.read_text()[:100])
    truncated = load_results(results_dir, cache=cache)
    assert truncated.files_failed == [str(first)]
    again = load_results(results_dir, cache=cache)
    assert again.files_failed == [str(first)]
    assert again.samples.equals(truncated.samples)


def test_unwritable_cache_does_not_stop_a_load(results_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    assert load_results(results_dir, cache=blocker).n_samples == 162


def test_metadata_device_is_read_and_junk_metadata_ignored(results_dir: Path) -> None:
    """``metadata.device`` (mixed-device Ray sweeps) becomes the device column; metadata
    of other shapes (real files carry questions, answers, ids) never costs a sample."""
    first, second = _files(results_dir)[:2]

    def name_devices(document: dict[str, Any]) -> None:
        samples = document["per_sample_results"]
        samples[0]["metadata"] = {"device": "NVIDIA H100", "question": "?", "ids": [1, 2]}
        samples[1]["metadata"] = {"device": {"vendor": "?"}}  # not a name: ignored

    _edit(first, name_devices)
    _edit(second, lambda d: d["per_sample_results"][0].update(metadata="not an object"))
    result = load_results(results_dir, cache=False)
    assert result.n_samples == 162 and not result.skipped
    devices = result.samples["device"]
    assert devices.drop_nulls().to_list() == ["NVIDIA H100"]
