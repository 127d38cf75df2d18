"""Predictors shared by threads (and forked workers) answer exactly what one thread answers.

A controller is a service: requests arrive on many threads and each asks about its candidate
configurations. These tests ask the same seeded questions once on one thread and again from
many threads at once, and require every answer to be identical, bit for bit (the TorchScript
module: equal to float32 rounding, see its test).
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import fit_small_model
from threads import on_threads, same

from exporters.export import ONNX_FILE, TORCHSCRIPT_FILE, export_model
from exporters.runtime import MAX_BOUND_BATCH_SIZES, LatencyPredictor
from toolkit.features import OUTPUT_NAMES, feature_matrix

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

THREADS = 8
BATCH_1_QUESTIONS = 100_000


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """The exported files of a small model and its training features (in-range rows)."""
    root = tmp_path_factory.mktemp("threads")
    model = fit_small_model(root / "results", seed=3)
    export_model(model, root / "out", training_data=model.training_data)
    return root / "out", feature_matrix(model.training_data)


Question = tuple[str, np.ndarray, np.ndarray]


def questions(rows: np.ndarray, n_batch_1: int, seed: int) -> list[Question]:
    """``n_batch_1`` batch-1 ``predict`` questions with, mixed in, batches of 8 and 75,
    ``feasible`` and ``max_output_tokens`` calls and batches of many other sizes (more sizes
    than the predictor keeps bound buffers for, so that sets are dropped while others run).
    Rows from the training data, output tokens 0-300 (some beyond the trained answers)."""
    rng = np.random.default_rng(seed)
    out: list[Question] = []
    odd_sizes = list(range(2, 2 + MAX_BOUND_BATCH_SIZES + 8))

    def draw(kind: str, batch: int) -> Question:
        x = np.ascontiguousarray(rows[rng.integers(0, len(rows), batch)], dtype=np.float32)
        second = rng.integers(0, 300, batch).astype(np.float32)
        if kind == "max_output_tokens":
            second = rng.uniform(50, 5000, batch).astype(np.float32)
        return kind, x, second

    for i in range(n_batch_1):
        out.append(draw("predict", 1))
        if i % 50 == 0:
            out.append(draw("predict", 8))
        if i % 400 == 0:
            out.append(draw("predict", 75))
        if i % 300 == 0:
            out.append(draw("predict", odd_sizes[(i // 300) % len(odd_sizes)]))
        if i % 500 == 0:
            out.append(draw("feasible", 8))
        if i % 1000 == 0:
            out.append(draw("max_output_tokens", 8))
    return out


def ask(predictor: LatencyPredictor, question: Question) -> dict[str, np.ndarray]:
    kind, x, second = question
    if kind == "predict":
        return predictor.predict(x, second)
    if kind == "feasible":
        return {"feasible": predictor.feasible(x, 600.0, second, bound="p95")}
    return predictor.max_output_tokens(x, second)


def test_one_predictor_shared_by_8_threads_answers_like_one_thread(exported) -> None:
    """8 threads, 100k batch-1 questions with batches of 8 and 75 (and other sizes,
    feasible and max_output_tokens) mixed in: 0 wrong answers, no exception."""
    out_dir, rows = exported
    asked = questions(rows, BATCH_1_QUESTIONS, seed=0)
    predictor = LatencyPredictor(out_dir / ONNX_FILE, on_out_of_range="flag")
    want = [ask(predictor, q) for q in asked]
    # A fresh predictor, so that the threads also race to bind its first buffers.
    shared = LatencyPredictor(out_dir / ONNX_FILE, on_out_of_range="flag")
    got, errors, _ = on_threads(THREADS, asked, lambda q: ask(shared, q))
    assert not errors, errors[:3]
    wrong = [i for i, (g, w) in enumerate(zip(got, want, strict=True)) if not same(g, w)]
    assert not wrong, f"{len(wrong)} of {len(asked)} answers differ, first {asked[wrong[0]][0]}"
    # The mix really covered what it claims (beyond the bound sizes the pool keeps).
    sizes = {len(q[1]) for q in asked}
    assert {1, 8, 75} <= sizes and len(sizes) > MAX_BOUND_BATCH_SIZES
    assert sum(len(q[1]) == 1 for q in asked) >= BATCH_1_QUESTIONS
    assert len(shared._idle) <= MAX_BOUND_BATCH_SIZES


def test_large_batches_from_threads(exported) -> None:
    """Batches that take the large-batch session, from threads that race to make it."""
    out_dir, rows = exported
    asked = [q for q in questions(rows, 400, seed=1) if q[0] == "predict"]
    single = LatencyPredictor(out_dir / ONNX_FILE, large_batch=8, on_out_of_range="flag")
    want = [single.predict(x, n) for _, x, n in asked]
    shared = LatencyPredictor(out_dir / ONNX_FILE, large_batch=8, on_out_of_range="flag")
    got, errors, _ = on_threads(THREADS, asked, lambda q: shared.predict(q[1], q[2]))
    assert not errors, errors[:3]
    assert all(same(g, w) for g, w in zip(got, want, strict=True))


def test_torchscript_module_shared_by_threads(exported) -> None:
    """The contract for ``latency_predictor.ts``: one loaded module may serve any number of
    threads (each enters ``torch.inference_mode`` itself: the mode is per thread), from its
    first call on.

    Equal to float32 rounding rather than bit for bit: unlike the ONNX Runtime predictor
    (one intra-op thread per session), torch's CPU kernels may split a call's work by the
    threads free at that moment, which can move the last bit (CI saw 2 of 3078 answers
    differ so). A race that mixed up rows or buffers would be off by far more."""
    out_dir, rows = exported
    asked = [q for q in questions(rows, 3000, seed=2) if q[0] == "predict"]
    tensors = [(torch.from_numpy(x), torch.from_numpy(n)) for _, x, n in asked]

    def call(module: torch.jit.ScriptModule, question: tuple[torch.Tensor, torch.Tensor]):
        with torch.inference_mode():
            return [t.numpy().copy() for t in module(*question)]

    reference = torch.jit.load(str(out_dir / TORCHSCRIPT_FILE))
    want = [call(reference, q) for q in tensors]
    shared = torch.jit.load(str(out_dir / TORCHSCRIPT_FILE))  # no warm-up: threads go first
    got, errors, _ = on_threads(THREADS, tensors, lambda q: call(shared, q))
    assert not errors, errors[:3]
    assert len(want[0]) == len(OUTPUT_NAMES)
    worst = 0.0
    for answer, expected in zip(got, want, strict=True):
        for a, b in zip(answer, expected, strict=True):
            assert a.shape == b.shape and np.array_equal(np.isfinite(a), np.isfinite(b))
            finite = np.isfinite(b)
            scale = np.maximum(np.abs(b[finite]), 1e-3)
            worst = max(worst, float(np.max(np.abs(a[finite] - b[finite]) / scale, initial=0)))
    assert worst <= 1e-5, f"answers differ by up to {worst:.2e} (relative)"


_forked: LatencyPredictor | None = None


def _answer_in_child(question: Question) -> dict[str, np.ndarray]:
    assert _forked is not None
    return ask(_forked, question)


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="no fork on this platform"
)
def test_forked_workers_use_a_predictor_made_before_the_fork(exported) -> None:
    """A pre-fork server: the parent makes (and uses) the predictor, large-batch session
    included; forked children answer as the parent does."""
    global _forked
    out_dir, rows = exported
    asked = questions(rows, 300, seed=3)
    _forked = LatencyPredictor(out_dir / ONNX_FILE, large_batch=64, on_out_of_range="flag")
    try:
        want = [ask(_forked, q) for q in asked]
        with multiprocessing.get_context("fork").Pool(4) as pool:
            got = pool.map_async(_answer_in_child, asked, chunksize=16).get(timeout=120)
    finally:
        _forked = None
    assert all(same(g, w) for g, w in zip(got, want, strict=True))
