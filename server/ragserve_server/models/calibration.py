"""int8 / uint8 calibration ranges of an embedding model (a registry fact; encoding/quantize.py applies them)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Calibration:
    """Per-dimension ranges for int8 / uint8 (float32, shape (dimensions,))."""

    lo: np.ndarray
    hi: np.ndarray

    @classmethod
    def from_entry(cls, entry: Mapping, dimensions: int, model: str) -> "Calibration":
        """Reads a registry entry's `int8_calibration` ({"min": [...], "max": [...], ...})."""
        lo = np.asarray(entry.get("min", ()), dtype=np.float32)
        hi = np.asarray(entry.get("max", ()), dtype=np.float32)
        if lo.shape != (dimensions,) or hi.shape != (dimensions,) or not np.all(hi >= lo):
            raise ValueError(
                f"model {model!r}: int8_calibration needs 'min' and 'max' lists of {dimensions} values with min <= max; "
                f"re-run scripts/calibrate_embeddings.py"
            )
        return cls(lo, hi)

    def to_uint8(self, vectors: np.ndarray) -> np.ndarray:
        steps = (self.hi - self.lo) / np.float32(255)
        steps = np.where(steps == 0, np.float32(1), steps)
        return np.clip(np.floor((vectors.astype(np.float32) - self.lo) / steps), 0, 255).astype(np.uint8)


def calibration_ranges(embeddings: np.ndarray) -> dict[str, list[float]]:
    """The ranges of a calibration set of embeddings (n, dimensions): min and max per dimension."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    return {"min": embeddings.min(axis=0).tolist(), "max": embeddings.max(axis=0).tolist()}
