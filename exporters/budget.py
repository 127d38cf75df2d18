"""The second exported entry point: the largest output length that fits a latency budget.

``latency_budget.onnx`` / ``latency_budget.ts`` take ``features`` float32 [B, 5] and
``budget_ms`` float32 [B] and return, per row, the largest N <= 4096 output tokens whose
total fits the budget (0 where the prefill alone does not fit), once per bound:

- ``max_output_tokens``: ``total_ms(N) = prefill_ms + decode_total_ms(N) <= budget``;
- ``max_output_tokens_p90`` / ``_p95``: the calibrated total bound
  ``total_pXX_ms(N) = max(prefill_ms x f_p + decode_total_ms(N) x f_d + decode_per_token_ms(N)
  x f_g, prefill_pXX_ms) <= budget``
  (``toolkit.models.bounds``; an unbounded level, factor +inf, fits nothing: 0),

as float32 [B]. The rule is ``toolkit.controller.max_output_tokens`` with ``bound`` mean /
p90 / p95 (which reads ``total_ms`` / ``total_p90_ms`` / ``total_p95_ms``), and so is the
search, unrolled: the interval [1, 4097) halves 12 times, each step one O(1) decode total, so
a C++ controller gets the answer in one call with no loop over positions.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from exporters.fused import FusedPredictor

BUDGET_ONNX_FILE = "latency_budget.onnx"
BUDGET_TORCHSCRIPT_FILE = "latency_budget.ts"
BUDGET_INPUT_NAMES: tuple[str, ...] = ("features", "budget_ms")
BUDGET_OUTPUT_NAMES: tuple[str, ...] = (
    "max_output_tokens",
    "max_output_tokens_p90",
    "max_output_tokens_p95",
)
#: Largest output length searched: 2 ** SEARCH_STEPS.
SEARCH_STEPS = 12
MAX_TOKENS = 2**SEARCH_STEPS
assert (SEARCH_STEPS, MAX_TOKENS) == (12, 4096), "update the literals in BudgetPredictor.forward"


class BudgetPredictor(torch.nn.Module):
    """``forward(features [B,5], budget_ms [B])`` -> max output tokens per total bound."""

    def __init__(self, predictor: FusedPredictor) -> None:
        super().__init__()
        self.predictor = predictor

    def forward(self, features: Tensor, budget_ms: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # Prefill and the decode coefficients do not depend on the output length: the first
        # layer runs once, with output_tokens 0 (the decode factors then read 0, unused).
        inputs = torch.cat([features, torch.zeros_like(budget_ms).unsqueeze(1)], 1)
        first, weighted = self.predictor.front(inputs)[:2]
        rows = features.shape[0]
        # The three bounds searched together as one batch of 3B rows: the same prefill and
        # decode coefficients (each bisection step costs one closed-form total). Bound:
        # max(P f_p + D(N) f_d + pass(N) f_g, P f) with (f_p, f_d, f_g, f) = (1, 1, 0, 0) for
        # the mean, the calibrated factors for p90 and p95 (non-decreasing in N: D and the
        # mean pass both grow with N).
        prefill = self.predictor.prefill(weighted).repeat(3)
        coef = self.predictor.decode.coefficients(first, inputs).repeat(3, 1)
        prompt = (features[:, 0] + features[:, 1]).repeat(3)
        budget = budget_ms.repeat(3)
        ones = torch.ones_like(budget_ms).unsqueeze(0)
        prefill_factor = (self.predictor.total_prefill_factors.unsqueeze(1) * ones).reshape(-1)
        decode_factor = (self.predictor.total_decode_factors.unsqueeze(1) * ones).reshape(-1)
        pass_factor = (self.predictor.total_pass_factors.unsqueeze(1) * ones).reshape(-1)
        # The floor P f does not depend on N: it fits or not for the whole search.
        floor_fits = prefill * (self.predictor.floor_factors.unsqueeze(1) * ones).reshape(-1)
        floor_fits = floor_fits <= budget
        low = torch.ones_like(budget)  # N = 1 (prefill alone): feasible where it fits
        # TorchScript cannot read module globals: 4097 = MAX_TOKENS + 1, 12 = SEARCH_STEPS.
        high = torch.full_like(budget, 4097.0)  # never feasible
        for _ in range(12):
            middle = torch.floor((low + high) * 0.5)
            decode_total, mean_pass = self.predictor.decode.totals(coef, middle, prompt)
            bound = prefill * prefill_factor + decode_total * decode_factor
            fits = bound + mean_pass * pass_factor <= budget
            low = torch.where(fits, middle, low)
            high = torch.where(fits, high, middle)
        # At N = 1 there is no decode pass: the total is the prefill.
        fits_at_one = (prefill * prefill_factor <= budget) & floor_fits
        answer = torch.where(fits_at_one, low, torch.zeros_like(low))
        return answer[:rows], answer[rows : 2 * rows], answer[2 * rows :]


def budget_metadata(predictor_metadata: dict[str, Any]) -> dict[str, Any]:
    """The predictor's metadata with this graph's names and a description."""
    return {
        **predictor_metadata,
        "description": "latkit budget query: largest output length within budget_ms",
        "input_names": list(BUDGET_INPUT_NAMES),
        "output_names": list(BUDGET_OUTPUT_NAMES),
        "max_tokens": MAX_TOKENS,
    }


def reference_answers(model: Any, features: np.ndarray, budget_ms: np.ndarray) -> dict[str, Any]:
    """What ``toolkit.controller.max_output_tokens`` says for the same rows (the reference)."""
    from toolkit.controller import max_output_tokens

    return {
        name: max_output_tokens(model.predict, features, budget_ms, bound, MAX_TOKENS)
        for name, bound in zip(BUDGET_OUTPUT_NAMES, ("mean", "p90", "p95"), strict=True)
    }


def probe_budgets(model: Any, features: np.ndarray, seed: int = 0) -> np.ndarray:
    """Budgets around each row's own scale: from below its prefill to room for long answers
    (past the p95 total of 64 tokens where that is finite)."""
    out = model.predict(features, np.full(len(features), 64, dtype=np.float32))
    rng = np.random.default_rng(seed)
    low = 0.5 * np.asarray(out["prefill_ms"])
    bound = np.asarray(out["total_p95_ms"], dtype=np.float64)
    top = np.where(np.isfinite(bound), bound, np.asarray(out["total_ms"]))
    high = top + 4.0 * np.asarray(out["decode_total_ms"]) + 1.0
    return (low + rng.random(len(features)) * (high - low)).astype(np.float32)


def run_budget_file(path: Path, features: np.ndarray, budget_ms: np.ndarray) -> dict[str, Any]:
    """Answers of an exported budget file (.onnx through ONNX Runtime, .ts through torch)."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    b = np.ascontiguousarray(budget_ms, dtype=np.float32)
    if path.suffix == ".onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        values = session.run(None, {"features": x, "budget_ms": b})
    else:
        with warnings.catch_warnings():
            # TorchScript is deprecated in torch 2.x, yet it is what libtorch loads.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")
        with torch.inference_mode():
            values = [v.numpy() for v in module(torch.from_numpy(x), torch.from_numpy(b))]
    return dict(zip(BUDGET_OUTPUT_NAMES, values, strict=True))


def budget_agreement(got: dict[str, Any], want: dict[str, Any]) -> tuple[float, int]:
    """(fraction of rows equal in every output, largest difference in tokens)."""
    equal = np.ones(len(next(iter(want.values()))), dtype=bool)
    worst = 0
    for name in BUDGET_OUTPUT_NAMES:
        diff = np.abs(np.asarray(got[name], dtype=np.float64) - np.asarray(want[name]))
        equal &= diff == 0
        worst = max(worst, int(diff.max()) if diff.size else 0)
    return float(equal.mean()) if equal.size else 1.0, worst
