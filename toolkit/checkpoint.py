"""Loading a trained model's artifact directory for the commands that use one (evaluate, plot,
report, export, predict): one-line errors, and the training split the model carries."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from toolkit.errors import LatkitError

if TYPE_CHECKING:
    from toolkit.models.hybrid import HybridLatencyModel


def load_model(checkpoint: str | Path) -> HybridLatencyModel:
    """The ``HybridLatencyModel`` of an artifact directory (``latkit train --output-dir``),
    its training split included; a missing or wrong path is a one-line ``LatkitError``."""
    path = Path(checkpoint)
    if not path.exists():
        raise LatkitError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise LatkitError(
            f"checkpoint {path} is a file: latkit expects the artifact directory written by "
            "`latkit train --output-dir`"
        )
    from toolkit.models.hybrid import HybridLatencyModel

    return HybridLatencyModel.load(path)


def training_split(model: Any) -> pl.DataFrame | None:
    """The training split a loaded model carries (``training_data.parquet``), None when it
    has none (an empty split, or a stand-in model without one)."""
    frame = getattr(model, "training_data", None)
    return frame if isinstance(frame, pl.DataFrame) and frame.height > 0 else None
