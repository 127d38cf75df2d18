"""Per-stage affine recalibration of a trained model to another machine.

The original study planned to move a latency model to a new GPU by fitting, per stage,
``target = a x source + b`` on a handful of calibration samples. We keep the source model
untouched and store the two pairs of numbers beside it:

- prefill: ``prefill' = a_p x prefill + b_p`` before the bounds' factors apply (a_p > 0
  keeps the bounds' order and every monotone constraint);
- decode pass: ``pass'(k) = a_d x pass(k) + b_d``. Because the first basis function of the
  decode network is the constant 1, this is the coefficient map
  ``coef' = a_d x coef + b_d x e0``, so the decode total stays exact in O(1) and the exported
  graph keeps its shape.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Calibration:
    """Affine maps of prefill and of one decode pass; the identity by default."""

    prefill_scale: float = 1.0
    prefill_offset_ms: float = 0.0
    decode_pass_scale: float = 1.0
    decode_pass_offset_ms: float = 0.0
    method: str = "none"
    n_samples: int = 0

    @property
    def is_identity(self) -> bool:
        return (
            self.prefill_scale == 1.0
            and self.prefill_offset_ms == 0.0
            and self.decode_pass_scale == 1.0
            and self.decode_pass_offset_ms == 0.0
        )

    def prefill(self, values: np.ndarray) -> np.ndarray:
        return self.prefill_scale * np.asarray(values) + self.prefill_offset_ms

    def decode_total(self, total_ms: np.ndarray, passes: np.ndarray) -> np.ndarray:
        """Calibrated total over ``passes`` decode passes (each pass shifts by the offset)."""
        return self.decode_pass_scale * np.asarray(total_ms) + self.decode_pass_offset_ms * passes

    def decode_pass(self, pass_ms: np.ndarray) -> np.ndarray:
        return self.decode_pass_scale * np.asarray(pass_ms) + self.decode_pass_offset_ms

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Calibration:
        if not data:
            return cls()
        calibration = cls(
            prefill_scale=float(data["prefill_scale"]),
            prefill_offset_ms=float(data["prefill_offset_ms"]),
            decode_pass_scale=float(data["decode_pass_scale"]),
            decode_pass_offset_ms=float(data["decode_pass_offset_ms"]),
            method=str(data.get("method", "affine")),
            n_samples=int(data.get("n_samples", 0)),
        )
        if not (calibration.prefill_scale > 0 and calibration.decode_pass_scale > 0):
            raise ValueError("calibration scales must be positive")
        return calibration
