"""The prefill model's monotone table and its capacity search (toolkit.models.prefill_table,
toolkit.models.prefill): monotone without constraining the trees, equal to latkit 0.3 for
monotone trees, residual interpolated between profiled knob values, capacity chosen on
held-out samples and configurations. Small seeded data, a few seconds."""

from __future__ import annotations

import numpy as np
import pytest

from toolkit.features import FEATURE_NAMES
from toolkit.models.physics import PhysicsBaseline
from toolkit.models.prefill import CAPACITY_CANDIDATES, PrefillModel, capacity_summary
from toolkit.models.prefill_table import TableGrid, _knob_residual, tree_grid

FAST = {"n_estimators": 300, "early_stopping_rounds": 20}


def stair_data(n: int, seed: int, noise: float = 0.003) -> tuple[np.ndarray, np.ndarray]:
    """Prefill times with the stairs of tile quantisation: flat within 128-token steps of the
    prompt, and flat in top_k where the (memory-bound) experts' weights dominate."""
    rng = np.random.default_rng(seed)
    crops = rng.integers(1, 16, n)
    vision = (crops + 1) * 144.0
    text = rng.integers(10, 300, n).astype(np.float64)
    tier = np.digitize(crops, [4, 9]).astype(np.float64)
    top_k = rng.choice([4.0, 6.0, 8.0, 10.0, 12.0], n)
    blocks = rng.choice([8.0, 10.0, 12.0, 14.0, 16.0], n)
    tiles = np.ceil((vision + text) / 128.0)
    experts = np.maximum(1.0, tiles * top_k / 40.0)  # memory-bound (flat) below 40 tiles x k
    y = 3.0 + 0.004 * vision + blocks * (0.05 * tiles + 0.08 * experts)
    y = y * np.exp(noise * rng.standard_normal(n))
    x = np.stack([vision, text, tier, top_k, blocks], axis=1).astype(np.float32)
    return x, y


@pytest.fixture(scope="module")
def stairs() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = stair_data(2000, 0)
    vx, vy = stair_data(500, 1)
    return x, y, vx, vy


def dense_grid(x: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """Rows sweeping each monotone feature over real values, to 50 % beyond the data."""
    rng = np.random.default_rng(2)
    base = x[rng.choice(len(x), 25, replace=False)]
    sweeps = {
        0: np.linspace(0.0, 3500.0, 301),
        1: np.linspace(0.0, 450.0, 361),
        3: np.linspace(1.0, 16.0, 241),
        4: np.linspace(1.0, 20.0, 153),
    }
    grids = []
    for j, values in sweeps.items():
        grid = np.repeat(base, len(values), axis=0)
        grid[:, j] = np.tile(values, len(base))
        grids.append((j, grid.astype(np.float32)))
    return grids


def test_free_trees_are_monotone_through_the_table(stairs) -> None:
    """Unconstrained trees make baseline x exp(trees) decrease on stairs; the table never
    decreases along any monotone feature, on integer and real values alike."""
    x, y, vx, vy = stairs
    model = PrefillModel(capacity_search=False, monotone_constraints=False, **FAST)
    model.fit(x, y, vx, vy)
    free_decreases = 0
    for j, grid in dense_grid(x):
        curve = model.predict(grid).reshape(25, -1)
        assert (np.diff(curve, axis=1) >= 0).all(), FEATURE_NAMES[j]
        margin = model.booster.inplace_predict(grid)
        free = (model.baseline.predict(grid) * np.exp(margin)).reshape(25, -1)
        free_decreases += int((np.diff(free, axis=1) < 0).sum())
    assert free_decreases > 0  # the free product does decrease: the table is what repairs it
    # ... at little cost: on held-out rows within 10 % of the free product's error.
    free_mape = np.mean(
        np.abs(model.baseline.predict(vx) * np.exp(model.booster.inplace_predict(vx)) - vy) / vy
    )
    assert np.mean(np.abs(model.predict(vx) - vy) / vy) <= 1.1 * free_mape


def test_monotone_trees_predict_exactly_latkit_0_3(stairs) -> None:
    """Monotone trees on their own grid, no interpolation: the table is baseline x exp(trees)."""
    x, y, vx, vy = stairs
    model = PrefillModel(capacity_search=False, knob_interpolation=False, **FAST).fit(x, y, vx, vy)
    assert model.grid is not None and not model.grid.interpolate
    probes = np.concatenate([vx, dense_grid(x)[1][1]])
    want = model.baseline.predict(probes) * np.exp(
        np.asarray(model.booster.inplace_predict(probes), dtype=np.float64)
    )
    np.testing.assert_allclose(model.predict(probes), want, rtol=2e-7)


def test_residual_interpolated_between_profiled_knob_values() -> None:
    """top_k 4 and 8 profiled: 5-7 get the linear interpolation of their residuals; beyond 8
    the last interval's slope for one interval, then held; never below flat; each mode on
    its own."""
    corners = [np.array([0.0]), np.array([0.0]), np.array([0.0]), np.arange(1.0, 15.0)]
    corners.append(np.array([1.0]))
    k = corners[3]
    residual = np.zeros((1, 1, 1, len(k), 1))
    residual[0, 0, 0, k == 4.0] = 0.10
    residual[0, 0, 0, k == 8.0] = 0.02
    log_baseline = np.zeros_like(residual)
    grid = TableGrid((), {"top_k": (4.0, 8.0)}, interpolate=True, extrapolate=True)
    out = _knob_residual(residual, log_baseline, corners, grid)[0, 0, 0, :, 0]
    np.testing.assert_allclose(out[k == 6.0], 0.06)
    np.testing.assert_allclose(out[k == 5.0], 0.08)
    # Beyond 8: slope -0.02 per top_k for one interval (to 12), never below flat (= 0.02 when
    # the baseline does not grow), then held.
    np.testing.assert_allclose(out[k >= 9.0], 0.02)
    growing = np.log(k).reshape(1, 1, 1, -1, 1)
    out = _knob_residual(residual, growing, corners, grid)[0, 0, 0, :, 0]
    flat = 0.02 - (np.log(k) - np.log(8.0))
    np.testing.assert_allclose(out[k == 10.0], max(0.02 - 0.04, flat[k == 10.0][0]))
    np.testing.assert_allclose(out[k == 14.0], max(0.02 - 0.08, flat[k == 14.0][0]))
    # Below the smallest profiled value: the trees' own residual.
    assert out[k == 2.0] == 0.0
    only_between = _knob_residual(residual, growing, corners, grid.with_modes(interpolate=True))
    np.testing.assert_allclose(only_between[0, 0, 0, k == 6.0, 0], 0.06)
    assert (only_between[0, 0, 0, k > 8.0, 0] == 0.0).all()
    only_beyond = _knob_residual(residual, growing, corners, grid.with_modes(extrapolate=True))
    assert only_beyond[0, 0, 0, k == 6.0, 0] == 0.0
    np.testing.assert_allclose(only_beyond[0, 0, 0, k == 10.0, 0], out[k == 10.0])


def test_capacity_search_chooses_free_trees_on_precise_stairs(stairs) -> None:
    x, y, vx, vy = stairs
    model = PrefillModel(**FAST).fit(x, y, vx, vy)
    capacity = model.capacity
    assert capacity["searched"] and capacity["chosen"]["monotone_constraints"] is False
    assert len(capacity["candidates"]) == len(CAPACITY_CANDIDATES)
    for candidate in capacity["candidates"]:
        assert set(candidate["validation_mape_pct"]) == {"sample", "config"}
    assert set(capacity["chosen_scores"]) == {"sample", "config", "extrap"}
    validation = capacity["validation"]
    assert validation["config"]["held_out"] == {"top_k": 10.0, "num_active_blocks": 14.0}
    assert validation["extrap"]["held_out"] == {"top_k": 12.0, "num_active_blocks": 16.0}
    best = min(c["score"] for c in capacity["candidates"])
    chosen = next(c for c in capacity["candidates"] if c["score"] == best)
    assert chosen["settings"].items() <= capacity["chosen"].items()
    assert chosen["validation_mape_pct"].items() <= capacity["chosen_scores"].items()
    assert {type(capacity["chosen"][m]) for m in ("interpolate", "extrapolate")} == {bool}
    text = capacity_summary(capacity)
    assert text.startswith("prefill trees: free, depth") and "held-out configurations" in text
    # Constrained trees cap the error on stairs; the choice is measurably better.
    capped = PrefillModel(capacity_search=False, **FAST).fit(x, y, vx, vy)
    chosen_mape = np.mean(np.abs(model.predict(vx) - vy) / vy)
    assert chosen_mape < 0.8 * np.mean(np.abs(capped.predict(vx) - vy) / vy)


def test_loading_without_a_table_spec_uses_the_trees_grid(stairs, tmp_path) -> None:
    """latkit 0.3 artifacts have no table block: their (monotone) trees' own grid."""
    x, y, vx, vy = stairs
    model = PrefillModel(capacity_search=False, knob_interpolation=False, **FAST).fit(x, y, vx, vy)
    model.save(tmp_path)
    loaded = PrefillModel.load(tmp_path, model.get_params(), model.baseline.to_dict())
    assert loaded.grid is not None
    sizes = [len(t) for t in tree_grid(model.booster).thresholds]
    assert [len(t) for t in loaded.grid.thresholds] == sizes
    # The same monotone trees on a coarser grid: equal up to the float32 of the table.
    np.testing.assert_allclose(loaded.predict(vx), model.predict(vx), rtol=2e-7)
    again = PrefillModel.load(
        tmp_path, model.get_params(), model.baseline.to_dict(), fitted=model.fitted_state()
    )
    np.testing.assert_array_equal(again.predict(vx), model.predict(vx))


def test_baseline_on_a_grid_equals_pointwise() -> None:
    baseline = PhysicsBaseline(weights=(3.5, 20.9, 0.002, 0.01, 0.24, 0.069, 0.0058))
    values = [
        np.array([0.0, 288.0, 2304.0]),
        np.array([0.0, 17.0, 400.0]),
        np.array([0.0, 2.0]),
        np.array([1.0, 8.0]),
        np.array([1.0, 16.0]),
    ]
    mesh = np.stack([m.ravel() for m in np.meshgrid(*values, indexing="ij")], axis=1)
    grid = baseline.predict_grid(values)
    assert grid.shape == (3, 3, 2, 2, 2)
    np.testing.assert_allclose(grid.ravel(), baseline.predict(mesh), rtol=1e-12)
