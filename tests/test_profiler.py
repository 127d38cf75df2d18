"""``latkit profile``: the model's knobs, the timing loop, the files it writes, the CLI."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from synthetic import (
    SAMPLE_TIME_FIELDS,
    clock_advancing_per_sample,
    read_result_file,
    without_times,
)

from toolkit.cli import main
from toolkit.errors import LatkitError
from toolkit.features import VISION_TOKENS_PER_CROP
from toolkit.profiler import (
    DATASETS,
    ProfileSettings,
    draw_samples,
    get_preset,
    parse_tiers,
    run_profile,
)
from toolkit.profiler.datasets import SampleSpec
from toolkit.profiler.journal import (
    JournaledSample,
    SampleJournal,
    parse_sample_line,
    sample_line,
)
from toolkit.profiler.model import EXPERTS_IMPLEMENTATION, MolmoELike, build_model, new_cache
from toolkit.profiler.timing import SampleTiming, Timer

SAMPLE_FIELDS = {
    "sample_id",
    "tier",
    "top_k",
    "num_active_blocks",
    "output_tokens",
    "content_tokens",
    "ends_with_eos",
    "actual_num_crops",
    "target_vision_tokens",
    "actual_vision_tokens",
    "actual_text_tokens",
    "total_sequence_length",
    "accuracy",
    "pred",
    "metadata",
} | SAMPLE_TIME_FIELDS
FILE_FIELDS = {
    "tier",
    "tier_range",
    "max_crops",
    "top_k",
    "num_active_blocks",
    "num_total_blocks",
    "active_block_indices",
    "num_samples",
    "selected_crops_mean",
    "latency_stats",
    "per_sample_results",
}
STAGES = ("T_vision_total", "T_LLM_prefill", "T_LLM_decode", "T_total", "T_decode_per_token")


def _small(tmp: Path, **overrides: Any) -> ProfileSettings:
    settings = ProfileSettings(
        output_dir=tmp,
        datasets=["tally_qa", "coco_caption"],
        tiers=["low"],
        top_k=[4],
        blocks=[8, 10],
        samples_per_config=2,
        repeats=2,
        progress=False,
    )
    for key, value in overrides.items():
        setattr(settings, key, value)
    return settings


def _result_files(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/*.json*") if p.parent.name != "logs")


@pytest.fixture(scope="module")
def tiny_model() -> MolmoELike:
    torch.set_num_threads(1)
    return build_model(get_preset("tiny"), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("profile")
    report = run_profile(_small(out))
    assert report.files_written == 4 and not report.stopped_early
    return out


# --- the model -----------------------------------------------------------------------------


def test_routed_experts_match_transformers_eager(tiny_model: MolmoELike) -> None:
    block = tiny_model.layers[0].mlp
    for tokens in (1, 3, 300):  # the gathered (decode) path and the grouped (prefill) path
        x = torch.randn(1, tokens, tiny_model.preset.d_model)
        with torch.no_grad():
            tiny_model.config._experts_implementation = "eager"
            expected = block(x)
            tiny_model.config._experts_implementation = EXPERTS_IMPLEMENTATION
            got = block(x)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("blocks", [8, 16])
def test_active_blocks_kv_cache_is_consistent(tiny_model: MolmoELike, blocks: int) -> None:
    """A decode pass over the cache of n blocks equals recomputing the whole sequence."""
    d = tiny_model.preset.d_model
    prompt, new = torch.randn(1, 40, d), torch.randn(1, 1, d)
    cache = new_cache()
    tiny_model.decoder_hidden(prompt, cache, blocks)
    assert len(cache.layers) == blocks  # only the first n blocks ran
    cached = tiny_model.decoder_hidden(new, cache, blocks)
    assert cache.get_seq_length() == 41
    full = tiny_model.decoder_hidden(torch.cat([prompt, new], dim=1), new_cache(), blocks)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5)


def test_vision_tokens_per_crop(tiny_model: MolmoELike) -> None:
    pixels = torch.randn(3, 3, 336, 336)  # 2 crops + the global view
    embeds = tiny_model.encode_images(pixels)
    assert embeds.shape == (1, 3 * VISION_TOKENS_PER_CROP, tiny_model.preset.d_model)


def test_molmoe_preset_dimensions() -> None:
    preset = get_preset("molmoe-1b")
    assert (preset.d_model, preset.num_layers, preset.num_heads) == (2048, 16, 16)
    assert (preset.num_experts, preset.default_top_k, preset.expert_hidden) == (64, 8, 1024)
    assert (preset.vit_width, preset.vit_layers, preset.vit_mlp) == (1024, 23, 4096)
    tiny = get_preset("tiny")
    assert (tiny.num_layers, tiny.num_experts) == (16, 64)
    # small: the same structure, widths at which compute (not per-op overhead) sets latency.
    small = get_preset("small")
    assert (small.num_layers, small.num_experts, small.default_top_k) == (16, 64, 8)
    assert (small.d_model, small.num_heads, small.expert_hidden) == (128, 4, 128)
    assert (small.vit_width, small.vit_heads, small.vit_layers) == (128, 4, 2)


def test_compute_grows_with_top_k_and_blocks(tiny_model: MolmoELike) -> None:
    """Measured prefill: top_k 12 > top_k 4 and 16 blocks > 8, by margins noise can't flip.

    Configurations are interleaved run by run so that a change of machine load hits all of
    them alike, and medians of 5 runs are compared.
    """
    timer = Timer(tiny_model, torch.device("cpu"), torch.float32)
    # A long prompt (7 images, 1008 vision tokens) so the decoder dominates.
    spec = SampleSpec(sample_id=0, num_crops=6, text_tokens=30, output_tokens=1)
    configs = [(4, 16), (12, 16), (8, 8), (8, 16)]
    runs: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    tiny_model.set_top_k(8)
    timer.warm_up(spec, 16)
    for _ in range(5):
        for top_k, blocks in configs:
            tiny_model.set_top_k(top_k)
            runs[(top_k, blocks)].extend(timer.time_sample(spec, blocks, 1).prefill_runs)
    median = {c: statistics.median(v) for c, v in runs.items()}
    assert median[(12, 16)] > 1.15 * median[(4, 16)], median
    assert median[(8, 16)] > 1.4 * median[(8, 8)], median


def test_timer_measures_every_decode_pass(tiny_model: MolmoELike) -> None:
    timer = Timer(tiny_model, torch.device("cpu"), torch.float32)
    spec = SampleSpec(sample_id=3, num_crops=1, text_tokens=12, output_tokens=5)
    timing = timer.time_sample(spec, 8, repeats=3)
    sample = timing.to_sample("low", 8, 8)
    assert len(sample["T_decode_per_step"]) == 4  # the first token comes out of prefill
    assert all(len(step) == 3 for step in sample["T_decode_per_step"])
    assert sample["T_LLM_decode"] > 0
    assert sample["total_sequence_length"] == 2 * VISION_TOKENS_PER_CROP + 12
    one = timer.time_sample(SampleSpec(4, 1, 12, 1), 8, repeats=2).to_sample("low", 8, 8)
    assert one["T_LLM_decode"] == 0.0 and one["T_decode_per_step"] == []
    assert one["T_decode_per_token"] == 0.0


# --- drawn samples ---------------------------------------------------------------------------


def test_draws_are_seeded_and_within_ranges() -> None:
    a = draw_samples("coco_caption", "medium", 8, 12, 20, seed=1, first_sample_id=0)
    assert a == draw_samples("coco_caption", "medium", 8, 12, 20, seed=1, first_sample_id=0)
    assert a != draw_samples("coco_caption", "medium", 8, 12, 20, seed=2, first_sample_id=0)
    assert all(4 <= s.num_crops <= 8 for s in a)
    assert statistics.median(s.output_tokens for s in a) >= 10  # captions: tens of tokens
    vqa = draw_samples("coco_2014_vqa", "high", 4, 8, 50, seed=1, first_sample_id=0)
    assert all(s.output_tokens <= 10 and 9 <= s.num_crops <= 15 for s in vqa)
    assert len(DATASETS) == 9


def test_default_draws_are_unchanged() -> None:
    """The samples of a seed, as every sweep measured before --output-tokens existed."""

    def keys(specs: list[SampleSpec]) -> list[tuple[int, int, int, int]]:
        return [(s.sample_id, s.num_crops, s.text_tokens, s.output_tokens) for s in specs]

    assert keys(draw_samples("coco_caption", "medium", 8, 12, 4, seed=3, first_sample_id=100)) == [
        (100, 7, 11, 19),
        (101, 5, 12, 24),
        (102, 4, 10, 23),
        (103, 6, 13, 32),
    ]
    assert keys(draw_samples("mmmu", "high", 4, 16, 3, seed=0, first_sample_id=7)) == [
        (7, 11, 131, 2),
        (8, 9, 55, 7),
        (9, 9, 31, 10),
    ]


def test_output_tokens_override_draws_uniformly_in_range() -> None:
    default = draw_samples("tally_qa", "high", 8, 12, 200, seed=4, first_sample_id=0)
    long = draw_samples("tally_qa", "high", 8, 12, 200, 4, 0, output_tokens=(128, 448))
    lengths = [s.output_tokens for s in long]
    assert all(128 <= n <= 448 for n in lengths)
    # Uniform over [128, 448]: both ends reached, each half holds about half the draws.
    assert min(lengths) < 140 and max(lengths) > 436
    assert 70 <= sum(n <= 288 for n in lengths) <= 130
    # Only the answers change: the same images and prompts as the default draws.
    assert [(s.sample_id, s.num_crops, s.text_tokens) for s in long] == [
        (s.sample_id, s.num_crops, s.text_tokens) for s in default
    ]
    # A function of the seed and the sample's keys: a shorter draw is a prefix of a longer
    # one (partial sweeps, --resume), another configuration or seed draws other lengths.
    assert draw_samples("tally_qa", "high", 8, 12, 5, 4, 0, output_tokens=(128, 448)) == long[:5]
    other = draw_samples("tally_qa", "high", 8, 14, 200, 4, 0, output_tokens=(128, 448))
    assert [s.output_tokens for s in other] != lengths
    reseeded = draw_samples("tally_qa", "high", 8, 12, 200, 5, 0, output_tokens=(128, 448))
    assert [s.output_tokens for s in reseeded] != lengths
    fixed = draw_samples("coco_caption", "low", 4, 8, 20, 0, 0, output_tokens=(64, 64))
    assert {s.output_tokens for s in fixed} == {64}


def test_output_tokens_sweep_is_recorded(tmp_path: Path) -> None:
    report = run_profile(
        _small(tmp_path, datasets=["tally_qa"], blocks=[8], repeats=1, output_tokens=(6, 9))
    )
    assert report.files_written == 1
    (path,) = _result_files(tmp_path)
    doc = read_result_file(path)
    assert set(doc) == FILE_FIELDS
    for sample in doc["per_sample_results"]:
        assert set(sample) == SAMPLE_FIELDS and sample["metadata"] == {}
        assert 6 <= sample["output_tokens"] <= 9
        assert len(sample["T_decode_per_step"]) == sample["output_tokens"] - 1
    run_log = json.loads((tmp_path / "logs" / "run.json").read_text())
    assert run_log["settings"]["output_tokens"] == [6, 9]
    # The file has the name a default sweep gives it: the images are the same draws.
    default = tmp_path / "default"
    run_profile(_small(default, datasets=["tally_qa"], blocks=[8], repeats=1))
    assert [p.name for p in _result_files(default)] == [path.name]
    default_log = json.loads((default / "logs" / "run.json").read_text())
    assert default_log["settings"]["output_tokens"] is None


# --- files, loader, resume, max-minutes -----------------------------------------------------


def test_files_follow_the_format(profiled: Path) -> None:
    files = _result_files(profiled)
    names = {p.name for p in files}
    assert {p.parent.name for p in files} == {"tally-qa", "coco-caption"}
    assert any(n.startswith("tally-qa_imgsizetier-low_crops") for n in names)
    assert all(n.endswith(("_topk4_blocks8.json", "_topk4_blocks10.json")) for n in names)
    for path in files:
        doc = read_result_file(path)
        assert set(doc) == FILE_FIELDS
        assert f"_crops{round(doc['selected_crops_mean'])}_" in path.name
        assert doc["num_samples"] == len(doc["per_sample_results"]) == 2
        assert doc["active_block_indices"] == list(range(doc["num_active_blocks"]))
        assert doc["tier_range"] == {"min_crops": 1, "max_crops": 3}
        stats = doc["latency_stats"]
        for stage in STAGES:
            for suffix in ("mean", "std", "p50", "p95", "p99"):
                assert isinstance(stats[f"{stage}_{suffix}"], float)
        for sample in doc["per_sample_results"]:
            assert set(sample) == SAMPLE_FIELDS
            assert len(sample["T_decode_per_step"]) == sample["output_tokens"] - 1
            assert sample["accuracy"] == 0.0 and sample["pred"] == "" and sample["metadata"] == {}
    run_log = json.loads((profiled / "logs" / "run.json").read_text())
    assert run_log["status"] == "complete"
    assert run_log["noise_floor"]["prefill_total_spread"]["n"] == 8
    assert {"torch", "transformers", "latkit"} <= set(run_log["versions"])
    # Start-up (planning + model build) is logged as the Ray engine logs it.
    assert run_log["engine"]["name"] == "single-process"
    assert 0 < run_log["engine"]["startup_s"] < run_log["elapsed_s"]


def test_loader_reads_profile_output_without_skips(profiled: Path) -> None:
    from toolkit.data import load_results

    result = load_results(profiled, use_all_datasets=True, outlier_ms=1e9)
    assert not result.skipped and not result.files_failed
    assert result.samples.height == 8
    passes = sum(
        len(s["T_decode_per_step"])
        for p in _result_files(profiled)
        for s in read_result_file(p)["per_sample_results"]
    )
    assert result.steps.height == passes


def test_resume_skips_finished_files_and_gzip(tmp_path: Path) -> None:
    first = run_profile(_small(tmp_path, blocks=[8], gzip=True, repeats=1))
    assert first.files_written == 2
    files = _result_files(tmp_path)
    assert all(p.name.endswith(".json.gz") for p in files)
    stamps = {p: p.stat().st_mtime_ns for p in files}
    again = run_profile(_small(tmp_path, blocks=[8, 10], gzip=True, repeats=1, resume=True))
    assert (again.files_skipped, again.files_written) == (2, 2)
    assert all(p.stat().st_mtime_ns == stamps[p] for p in files)
    assert len(_result_files(tmp_path)) == 4


def test_schedule_measures_in_rounds_across_datasets(tmp_path: Path) -> None:
    """Round j measures sample j of every (dataset, configuration) file, in a fresh seeded
    order over all files: every dataset (and configuration) in every stretch of len(plan)
    measurements, instead of dataset after dataset."""
    from toolkit.profiler.sweep import interleaved_schedule, plan_jobs

    settings = _small(
        Path("unused"),
        datasets=["tally_qa", "coco_caption", "mmmu"],
        top_k=[4, 8],
        samples_per_config=3,
        seed=2,
    )
    plan, _ = plan_jobs(settings, Path("unused"))
    assert len(plan) == 12
    rounds = interleaved_schedule(plan, seed=2)
    assert len(rounds) == 3
    for round_index, units in enumerate(rounds):
        assert sorted(units) == [(job, round_index) for job in range(12)]
    orders = [[job for job, _ in units] for units in rounds]
    assert len({tuple(order) for order in orders}) == 3  # a fresh order every round
    # Datasets mixed within a round: the dataset changes along the round far more often than
    # dataset-after-dataset order (2 changes) would.
    datasets = [plan[job].dataset for job in orders[0]]
    assert sum(a != b for a, b in itertools.pairwise(datasets)) >= 5, datasets
    assert interleaved_schedule(plan, seed=2) == rounds
    assert interleaved_schedule(plan, seed=3) != rounds
    # The engines take the schedule as it is.
    from toolkit.profiler.sweep import Sweep

    sweep = Sweep(dataclasses.replace(settings, output_dir=tmp_path), lambda: 0.0)
    try:
        assert sweep.pending() == [unit for units in rounds for unit in units]
    finally:
        sweep.close()


def _journal(root: Path) -> Path:
    return root / "logs" / "samples.jsonl"


def _journaled(root: Path) -> list[JournaledSample]:
    """The samples of a journal (its complete lines after the header)."""
    lines = _journal(root).read_text().split("\n")[1:-1]
    return [parse_sample_line(line) for line in lines]


def test_max_minutes_stops_between_samples_and_resume_reuses_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fake clock jumps 10 s per measured sample: --max-minutes 1 stops after 6 of 8 samples
    (round 1 and half of round 2), with the two files whose samples are all in written and
    every sample journaled. --resume measures only the 2 missing samples, ignores a torn
    journal line, and ends with the files of an uninterrupted sweep (timings aside), each
    sample once, the journaled timings used as measured."""
    out = tmp_path / "res"
    stop = _small(out, max_minutes=1.0)
    with monkeypatch.context() as patch:
        report = run_profile(stop, clock=clock_advancing_per_sample(patch, 10.0))
    assert report.stopped_early and report.samples_measured == 6
    assert (report.files_written, report.files_remaining) == (2, 2)
    journaled = _journaled(out)
    assert len(journaled) == 6
    assert len({(s.key, s.index) for s in journaled}) == 6
    assert sorted(s.index for s in journaled) == [0, 0, 0, 0, 1, 1]  # round by round
    run_log = json.loads((out / "logs" / "run.json").read_text())
    assert run_log["status"].startswith("stopped: --max-minutes")
    assert run_log["samples"] == {"planned": 8, "reused_from_journal": 0, "measured": 6}
    assert run_log["schedule"]["rounds"] == 2 and "across all files" in run_log["schedule"]["order"]
    # A stopped results tree loads: the loader skips logs/ and its journal.
    from toolkit.inspect import inspect_results

    stopped = inspect_results(out, outlier_ms=1e9)
    assert (stopped.n_files, stopped.n_samples, stopped.files_failed) == (2, 4, [])

    with _journal(out).open("a") as journal:  # killed while writing a sample
        journal.write('{"file": "tally-qa/tally-qa_imgsizetier-low_crops2_topk4_blocks8", "ind')
    written_before = {p: p.stat().st_mtime_ns for p in _result_files(out)}
    with caplog.at_level(logging.INFO, logger="toolkit.profiler"):
        rest = run_profile(_small(out, resume=True))
    assert "1 unreadable line(s) ignored" in caplog.text
    assert (rest.files_skipped, rest.files_written, rest.stopped_early) == (2, 2, False)
    assert (rest.samples_reused, rest.samples_measured) == (2, 2)
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in written_before.items())
    assert not _journal(out).exists()  # a complete sweep's files hold every sample
    run_log = json.loads((out / "logs" / "run.json").read_text())
    assert run_log["status"] == "complete"
    assert run_log["samples"] == {"planned": 4, "reused_from_journal": 2, "measured": 2}

    whole = tmp_path / "whole"
    run_profile(_small(whole))
    resumed = {f"{p.parent.name}/{p.name}": read_result_file(p) for p in _result_files(out)}
    uninterrupted = {f"{p.parent.name}/{p.name}": read_result_file(p) for p in _result_files(whole)}
    assert sorted(resumed) == sorted(uninterrupted)
    for name, doc in resumed.items():
        assert without_times(doc) == without_times(uninterrupted[name]), name
    # The journaled samples went into the files as measured.
    for sample in journaled:
        doc = resumed[next(name for name in resumed if name.startswith(sample.key + "."))]
        written = doc["per_sample_results"][sample.index]
        assert written["sample_id"] == sample.timing.spec.sample_id
        assert written["T_vision_total"] == round(statistics.median(sample.timing.vision_runs), 4)
        assert written["T_decode_per_step"] == [
            [round(v, 4) for v in step] for step in sample.timing.decode_runs
        ]
    inspect = ["inspect", "--results-dir", str(out), "--outlier-ms", "1e9", "--json"]
    inspected = CliRunner().invoke(main, inspect)
    assert inspected.exit_code == 0, inspected.output
    summary = json.loads(inspected.stdout)
    assert (summary["n_files"], summary["n_samples"], summary["files_failed"]) == (4, 8, [])
    # The noise records of every file, as the uninterrupted sweep has them.
    noise = json.loads((out / "logs" / "run.json").read_text())["noise_records"]
    whole_noise = json.loads((whole / "logs" / "run.json").read_text())["noise_records"]
    assert sorted(noise) == sorted(whole_noise)
    for name, records in noise.items():
        assert {k: len(v) for k, v in records.items()} == {
            k: len(v) for k, v in whole_noise[name].items()
        }


def test_resume_refuses_a_journal_of_other_measurement_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with monkeypatch.context() as patch:
        run_profile(
            _small(tmp_path, repeats=1, max_minutes=0.5),
            clock=clock_advancing_per_sample(patch, 20.0),
        )
    assert len(_journaled(tmp_path)) == 2
    with pytest.raises(LatkitError, match=r"repeats 1 \(this run: 2\).*delete it") as refused:
        run_profile(_small(tmp_path, repeats=2, resume=True))
    assert "\n" not in str(refused.value)
    # Without --resume a sweep starts afresh: a new journal, nothing reused.
    with caplog.at_level(logging.WARNING, logger="toolkit.profiler"):
        report = run_profile(_small(tmp_path, repeats=1, blocks=[8]))
    assert "Starting afresh (no --resume)" in caplog.text
    assert (report.samples_reused, report.samples_measured, report.files_written) == (0, 4, 2)


def test_journal_lines_round_trip_and_unreadable_lines_are_ignored(tmp_path: Path) -> None:
    timing = SampleTiming(
        SampleSpec(sample_id=7, num_crops=2, text_tokens=11, output_tokens=3),
        vision_runs=[1.0 / 3, 0.5],
        prefill_runs=[2.25, 2.5],
        decode_runs=[[0.1, 0.2], [0.3, 0.30000000000000004]],
        total_runs=[4.0, 4.5],
    )
    sample = JournaledSample("doc-qa/doc-qa_x", 1, timing, {"speed_factor": 1.02})
    assert parse_sample_line(sample_line(sample)) == sample  # exact: full precision
    measurement = {"preset": "tiny", "repeats": 2}
    journal = SampleJournal(tmp_path / "samples.jsonl", measurement)
    journal.start([sample])
    journal.append(dataclasses.replace(sample, index=2))
    journal.close()
    with journal.path.open("a") as handle:
        handle.write(sample_line(dataclasses.replace(sample, key="doc-qa/y"))[:-9])
    samples, unreadable = journal.read()
    assert [s.index for s in samples] == [1, 2] and unreadable == 1
    bad = sample_line(sample).replace("[0.1,0.2]", "[0.1]")  # a pass with one run of two
    journal.path.write_text(journal.path.read_text().replace(sample_line(sample), bad))
    assert len(journal.read()[0]) == 1
    with pytest.raises(LatkitError, match="preset 'tiny' \\(this run: 'small'\\)"):
        SampleJournal(journal.path, {"preset": "small", "repeats": 2}).read()
    assert SampleJournal(tmp_path / "absent.jsonl", measurement).read() == ([], 0)


def test_engines_share_the_sweep_and_never_import_each_other() -> None:
    """Settings, planning and validation live in profiler/sweep.py; the single-process and
    Ray engines import it, and neither imports the other (toolkit.profiler.run_profile
    picks the engine)."""
    import ast

    import toolkit.profiler as package

    folder = Path(package.__file__).parent

    def imported(module: str) -> set[str]:
        names: set[str] = set()
        for node in ast.walk(ast.parse((folder / f"{module}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        return names

    runner, ray_runner = imported("runner"), imported("ray_runner")
    assert "toolkit.profiler.sweep" in runner and "toolkit.profiler.sweep" in ray_runner
    assert not any(name.startswith("toolkit.profiler.ray_runner") for name in runner)
    assert not any(name.startswith("toolkit.profiler.runner") for name in ray_runner)
    assert not {"toolkit.profiler.runner", "toolkit.profiler.ray_runner"} & imported("sweep")


# --- errors and the CLI -----------------------------------------------------------------


def test_bad_inputs_raise_latkit_errors(tmp_path: Path) -> None:
    with pytest.raises(LatkitError, match="preset"):
        get_preset("molmo-72b")
    with pytest.raises(LatkitError, match="tier"):
        parse_tiers("low,huge")
    with pytest.raises(LatkitError, match="top-k"):
        run_profile(_small(tmp_path, top_k=[65]))
    with pytest.raises(LatkitError, match="blocks"):
        run_profile(_small(tmp_path, blocks=[17]))


def test_cli_profile(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "res"
    args = ["profile", "--output-dir", str(out), "--datasets", "tally_qa", "--tiers", "low"]
    args += ["--top-k", "4", "--blocks", "8", "--samples-per-config", "1", "--repeats", "1"]
    result = runner.invoke(main, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "1 files written" in result.output
    assert len(_result_files(out)) == 1

    bad = runner.invoke(main, ["profile", "--output-dir", str(out), "--tiers", "huge"])
    assert bad.exit_code == 2
    assert "unknown tier" in bad.output and "Traceback" not in bad.output

    help_text = runner.invoke(main, ["profile", "--help"]).output
    for flag in ("--preset", "--repeats", "--resume", "--max-minutes", "--top-k", "--blocks"):
        assert flag in help_text
    assert "--output-tokens" in help_text
    words = " ".join(help_text.split())  # sample-level stops and resumes
    assert "Stop cleanly between samples" in words and "logs/samples.jsonl" in words


def test_cli_output_tokens(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "res"
    args = ["profile", "--output-dir", str(out), "--datasets", "doc_qa", "--tiers", "low"]
    args += ["--top-k", "4", "--blocks", "8", "--samples-per-config", "2", "--repeats", "1"]
    result = runner.invoke(main, [*args, "--output-tokens", "3-5", "--no-progress"])
    assert result.exit_code == 0, result.output
    (path,) = _result_files(out)
    samples = read_result_file(path)["per_sample_results"]
    assert all(3 <= s["output_tokens"] <= 5 for s in samples)
    assert json.loads((out / "logs" / "run.json").read_text())["settings"]["output_tokens"] == [
        3,
        5,
    ]
    for value, message in (
        ("0-5", "needs 1 <= LO <= HI"),
        ("9-5", "needs 1 <= LO <= HI"),
        ("8.5-10", "expected LO-HI, two integers"),
        ("128", "expected LO-HI, two integers"),
        ("-3-5", "expected LO-HI, two integers"),
        ("1-9000", "must fit the model's 8192 positions (HI at most 7546)"),
    ):
        bad = runner.invoke(main, [*args, "--output-tokens", value, "--no-progress"])
        assert bad.exit_code == 2, (value, bad.output)
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: --output-tokens"), lines
        assert message in lines[0], lines
    assert len(_result_files(out)) == 1


def test_cli_ray_flags_fail_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    base = ["profile", "--output-dir", str(tmp_path), "--datasets", "tally_qa", "--no-progress"]
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the [ray] extra were not installed
    missing = runner.invoke(main, [*base, "--ray", "local"])
    assert missing.exit_code == 2
    assert missing.stderr.strip().splitlines() == [
        "Error: --ray needs Ray, an optional extra: pip install 'latkit[ray]'"
    ]
    for flags, message in (
        (["--workers", "2"], "--workers needs --ray"),
        (["--allow-mixed-devices"], "--allow-mixed-devices needs --ray"),
        (["--ray", "http://head:6379"], "expected local, auto, host:port or ray://host:port"),
        (["--ray", "local", "--workers", "0"], "--workers must be at least 1"),
    ):
        bad = runner.invoke(main, [*base, *flags])
        assert bad.exit_code == 2 and message in bad.stderr, (flags, bad.output)
        assert "Traceback" not in bad.output
    assert not _result_files(tmp_path)
    help_text = runner.invoke(main, ["profile", "--help"]).output
    for flag in ("--ray", "--workers", "--allow-mixed-devices", "--canary-every"):
        assert flag in help_text


def test_failed_join_names_its_likely_cause() -> None:
    """The hint after "could not start or join Ray", from the exception chain Ray 2.60 raises
    (the real refusal is tested against a head in test_profile_ray.py)."""
    from toolkit.profiler.ray_runner import TOKEN_HOWTO, join_failure_hint

    def failed_join(cause: str) -> ConnectionError:
        try:
            try:
                raise RuntimeError(f"Failed to connect to GCS. Last connection error: {cause}")
            except RuntimeError as exc:
                raise ConnectionError("Failed to connect to Ray cluster at h:6379") from exc
        except ConnectionError as exc:
            return exc

    refused = failed_join("ray.exceptions.AuthenticationError: RPC error: InvalidAuthToken")
    assert join_failure_hint("h:6379", refused).endswith(f"not the head's: {TOKEN_HOWTO})")
    assert "token is missing" in join_failure_hint("auto", refused)
    silent = failed_join("ray.exceptions.RpcError: Timed out while waiting for GCS")
    assert join_failure_hint("h:6379", silent) == (
        " (no Ray head answered at h:6379: is it running, is the port reachable?)"
    )
    assert join_failure_hint("auto", silent) == " (start one with `ray start --head`)"
    other = failed_join("something else")
    assert "most likely uses token authentication" in join_failure_hint("h:6379", other)
    assert join_failure_hint("local", refused) == ""


def test_canary_speed_factor_on_every_sample(tmp_path: Path) -> None:
    report = run_profile(_small(tmp_path, repeats=1, canary_every=3))
    samples = [
        s for p in _result_files(tmp_path) for s in read_result_file(p)["per_sample_results"]
    ]
    assert report.samples_measured == len(samples) == 8
    factors = [s["metadata"]["speed_factor"] for s in samples]
    assert all(f > 0 for f in factors)
    assert all(set(s["metadata"]) == {"speed_factor"} for s in samples)
    assert 1.0 in factors  # samples measured before the second canary
    canary = json.loads((tmp_path / "logs" / "run.json").read_text())["canary"]
    assert canary["every"] == 3
    (worker,) = canary["workers"]
    assert worker["canaries"] == math.ceil(8 / 3) and worker["first_ms"] > 0
    assert worker["speed_factor_min"] <= 1.0 <= worker["speed_factor_max"]

    from toolkit.data import load_results

    result = load_results(tmp_path, outlier_ms=1e9, cache=False)
    assert result.samples.height == 8 and not result.skipped
    assert result.samples["device"].null_count() == 8  # a single-device sweep names none
