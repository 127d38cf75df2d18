"""Shared fixtures: seeded core-exp results written by ``tests/synthetic.py``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic import fit_small_model, make_samples, write_results_dir


@pytest.fixture(autouse=True)
def _private_results_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep the loader's results cache out of the user's home during tests."""
    monkeypatch.setenv("LATKIT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "latkit-cache"))


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    """A clean results directory: 3 datasets x 27 configurations x 2 samples."""
    root = tmp_path / "results"
    write_results_dir(root, make_samples(n_per_config=2, seed=0))
    return root


@pytest.fixture(scope="session")
def small_trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path]:
    """(model, checkpoint dir, results dir): a real HybridLatencyModel fitted with tiny
    budgets on synthetic results and saved; shared by the export, budget and
    recalibration tests."""

    root = tmp_path_factory.mktemp("small-trained")
    model = fit_small_model(
        root / "results",
        seed=1,
        n_per_config=3,
        num_epochs=3,
        n_estimators=60,
        cache=False,
    )
    model.save(root / "ckpt")
    return model, root / "ckpt", root / "results"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
