"""What monotonicity costs: the options for a prefill that never decreases, measured.

The prefill is ``baseline(x) x exp(residual(x))`` with a smooth, non-decreasing baseline and a
piecewise-constant residual (trees). For real-valued inputs that product never decreases in
vision tokens, text tokens, top_k and blocks only if the residual never steps down, and stair-
shaped timings need it to. This prints, on a SIMULATED precise sweep (``precise_sweep.py``,
written into a temporary directory unless ``--results-dir``) or any sweep, prefill MAPE on
the DESIGN.md splits for:

- ``free``: unconstrained trees, the product as it is (not monotone);
- ``xgboost constrained``: XGBoost's monotone constraints on the residual (latkit 0.3);
- ``constrained where it does not bind``: constraints on text tokens and blocks only (the
  product is then still free to decrease in vision tokens and top_k);
- ``free + repaired residual``: the free trees' residual table made monotone afterwards (the
  mean of its smallest monotone majorant and largest monotone minorant), times the baseline;
- ``free + floor table``: the free trees through latkit's table, ``max(floor, baseline x
  factor)`` (``toolkit.models.prefill_table``; knob interpolation off: the mechanism alone);
- ``latkit``: the default model (capacity chosen by the data).

and, for the options that are not monotone, how often and by how much they decrease along
the dense grid of ``tests/test_models.py`` (40 rows, each monotone feature swept to 50 %
beyond the training range; every real value, and every integer).

    python benchmarks/monotone_options.py [--results-dir DIR] [--device h100|a100]
        [--seeds 0,1,2] [--splits sample,config,sparse,extrap]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import split_parts
from precise_sweep import write_precise_sweep
from synthetic import dense_monotone_grid

from reports.knob_splits import SPLITS
from toolkit.data import load_results
from toolkit.features import FEATURE_NAMES, PREFILL_MONOTONE, feature_matrix
from toolkit.models.prefill import PrefillModel
from toolkit.models.prefill_table import (
    PrefillTable,
    _majorant,
    _minorant,
    _residual_on_grid,
    row_strides,
    tree_grid,
)
from toolkit.training import split_samples

Predict = Callable[[np.ndarray], np.ndarray]
#: Monotone constraints that do not bind on stair-shaped data: text tokens and blocks only.
WHERE_THEY_DO_NOT_BIND = (0, 1, 0, 0, 1)


class PartlyConstrained(PrefillModel):
    """Trees with monotone constraints on text tokens and blocks only."""

    def _params(self, settings: dict[str, Any], base_score: float) -> dict[str, Any]:
        params = super()._params(settings, base_score)
        params["monotone_constraints"] = "(" + ",".join(map(str, WHERE_THEY_DO_NOT_BIND)) + ")"
        return params


def product(model: PrefillModel) -> Predict:
    """``baseline x exp(trees)``: the trees as they are, no table."""

    def predict(x: np.ndarray) -> np.ndarray:
        margin = np.asarray(model.booster.inplace_predict(x), dtype=np.float64)
        return model.baseline.predict(x) * np.exp(margin)

    return predict


def repaired_residual(model: PrefillModel) -> Predict:
    """``baseline x exp(r)`` with ``r`` the trees' residual on their own grid made monotone."""
    grid = tree_grid(model.booster)
    assert grid.tree is not None
    residual = _residual_on_grid(model.booster, grid.tree, grid.thresholds)
    mono = np.exp(0.5 * (_majorant(residual) + _minorant(residual))).ravel()
    table = PrefillTable(grid.thresholds, row_strides(residual.shape), mono, np.zeros_like(mono))

    def predict(x: np.ndarray) -> np.ndarray:
        return model.baseline.predict(x) * table.lookup(x)

    return predict


def options(seed: int) -> dict[str, Callable[..., Predict]]:
    """Option name -> (x, y, vx, vy) -> fitted predictor."""
    free = {"capacity_search": False, "monotone_constraints": False, "knob_interpolation": False}
    as_03 = {"capacity_search": False, "knob_interpolation": False}

    def fit(cls: type[PrefillModel], params: dict[str, Any], *data: np.ndarray) -> PrefillModel:
        return cls(seed=seed, **params).fit(*data)

    return {
        "free (not monotone)": lambda *d: product(fit(PrefillModel, free, *d)),
        "xgboost constrained (0.3)": lambda *d: fit(PrefillModel, as_03, *d).predict,
        "constrained where it does not bind": lambda *d: product(fit(PartlyConstrained, as_03, *d)),
        "free + repaired residual": lambda *d: repaired_residual(fit(PrefillModel, free, *d)),
        "free + floor table": lambda *d: fit(PrefillModel, free, *d).predict,
        "latkit (chosen by the data)": lambda *d: fit(PrefillModel, {}, *d).predict,
    }


def dense_grid_drops(
    predict: Predict, x: np.ndarray, integers: bool
) -> dict[str, tuple[float, float]]:
    """Per monotone feature: (share of steps that decrease, largest relative drop) along the
    dense grid of tests/test_models.py (every integer instead, with ``integers``)."""
    base, sweeps = dense_monotone_grid(float(x[:, 0].min()), float(x[:, 0].max()), integers)
    out = {}
    for j, values in sweeps.items():
        assert PREFILL_MONOTONE[j] == 1
        grid = np.repeat(base, len(values), axis=0)
        grid[:, j] = np.tile(values, len(base))
        curve = predict(grid.astype(np.float32)).reshape(len(base), -1)
        steps = np.diff(curve, axis=1) / curve[:, :-1]
        out[FEATURE_NAMES[j]] = (float((steps < 0).mean()), float(max(0.0, -steps.min())))
    return out


def run(results_dir: Path, seeds: list[int], splits: list[str]) -> None:
    samples = load_results(results_dir).samples
    scores: dict[str, dict[str, list[float]]] = {}
    drops: dict[str, dict[bool, dict[str, tuple[float, float]]]] = {}
    for seed in seeds:
        for split in splits:
            train, held = split_parts(samples, split, seed)
            fit, val = split_samples(train, "sample", 0.2, seed)
            x, y = feature_matrix(fit), fit["T_prefill_total"].to_numpy()
            vx, vy = feature_matrix(val), val["T_prefill_total"].to_numpy()
            hx, hy = feature_matrix(held), held["T_prefill_total"].to_numpy()
            for name, make in options(seed).items():
                predict = make(x, y, vx, vy)
                mape = float(np.mean(np.abs(predict(hx) - hy) / hy) * 100)
                scores.setdefault(name, {}).setdefault(split, []).append(mape)
                if split == "sample" and seed == seeds[0]:
                    drops[name] = {i: dense_grid_drops(predict, x, i) for i in (False, True)}
    print(f"\nprefill MAPE % on held-out rows ({results_dir}, mean over seeds {seeds}):")
    print(f"  {'option':<38}" + "".join(f"{s:>9}" for s in splits))
    for name, per_split in scores.items():
        print(f"  {name:<38}" + "".join(f"{np.mean(per_split[s]):>9.3f}" for s in splits))
    print(
        "\ndecreasing steps on the dense grid (share of steps, largest drop %), seed "
        f"{seeds[0]}, sample split; real values | integers:"
    )
    for name, by_kind in drops.items():
        cells = []
        for feature in by_kind[False]:
            real, integer = by_kind[False][feature], by_kind[True][feature]
            cells.append(
                f"{feature} {100 * real[0]:.1f} % / {100 * real[1]:.2f} % | "
                f"{100 * integer[0]:.1f} % / {100 * integer[1]:.2f} %"
            )
        print(f"  {name:<38}" + "; ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, help="default: a simulated precise sweep")
    parser.add_argument("--device", default="h100", help="simulated GPU of the precise sweep")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--splits", default=",".join(SPLITS))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    splits = [s for s in args.splits.split(",") if s.strip()]
    if args.results_dir is not None:
        run(args.results_dir, seeds, splits)
        return
    with tempfile.TemporaryDirectory(prefix="latkit-precise-") as tmp:
        log = write_precise_sweep(tmp, device=args.device)
        print(f"SIMULATED precise sweep ({args.device}): {log['samples']} samples")
        run(Path(tmp), seeds, splits)


if __name__ == "__main__":
    main()
