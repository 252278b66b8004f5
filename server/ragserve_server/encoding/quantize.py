"""Embedding encodings: packed float32, calibrated int8 / uint8, packed bits.

The definitions are sentence-transformers' `quantize_embeddings` (6.x), so vectors from
ragserve and from sentence-transformers with the same ranges are interchangeable:

- uint8: per dimension d, with the calibration range [lo_d, hi_d] and
  step_d = (hi_d - lo_d) / 255 (1 where that is 0): u = clip(floor((x_d - lo_d) / step_d), 0, 255),
  in float32. int8 = u - 128.
- ubinary: numpy.packbits(x > 0, axis=-1) (first dimension in the most significant bit, the
  last byte zero-padded). binary = ubinary - 128, as int8.

Calibration: the per-dimension ranges are the min and max of the model's normalised,
full-dimension embeddings of a calibration corpus (ST's `calibration_embeddings`), computed
once by `scripts/calibrate_embeddings.py` at `make models` time and kept in the model's
registry entry (`ModelSpec.int8_calibration`). They hold for normalised full-size vectors
only, so int8 / uint8 with `normalize=false` or fewer `dimensions` are refused.
"""

from __future__ import annotations

import numpy as np

from ragserve_server.errors import InvalidInput
from ragserve_server.models.calibration import Calibration

FLOAT, FLOAT32_BYTES, INT8, UINT8, BINARY, UBINARY = "float", "float32_bytes", "int8", "uint8", "binary", "ubinary"
ENCODINGS = (FLOAT, FLOAT32_BYTES, INT8, UINT8, BINARY, UBINARY)
CALIBRATED = (INT8, UINT8)
# numpy element type of each packed encoding (FLOAT is not packed).
ELEMENT_TYPES = {FLOAT32_BYTES: "<f4", INT8: "i1", UINT8: "u1", BINARY: "i1", UBINARY: "u1"}


def encode(vectors: np.ndarray, encoding: str, calibration: Calibration | None = None) -> np.ndarray:
    """`vectors` float32 (rows, dimensions) in a packed encoding: a C-contiguous array whose
    bytes are the response's blob (rows, columns)."""
    if encoding == FLOAT32_BYTES:
        return np.ascontiguousarray(vectors, dtype="<f4")
    if encoding in CALIBRATED:
        if calibration is None:
            raise ValueError(f"{encoding} needs a calibration")
        unsigned = calibration.to_uint8(vectors)
        return unsigned if encoding == UINT8 else (unsigned.astype(np.int16) - 128).astype(np.int8)
    if encoding in (BINARY, UBINARY):
        bits = np.packbits(vectors > 0, axis=-1)
        return bits if encoding == UBINARY else (bits.astype(np.int16) - 128).astype(np.int8)
    raise ValueError(f"not a packed encoding: {encoding!r}")


def check_encoding(
    encoding: str, *, model: str, calibration: Calibration | None, normalize: bool, dimensions: int, full_dimensions: int
) -> None:
    """InvalidInput when `model` cannot give `encoding` with these settings."""
    if encoding not in CALIBRATED:
        return
    name = f"EMBEDDING_ENCODING_{encoding.upper()}"
    if calibration is None:
        raise InvalidInput(
            f"encoding {name}: {encoding} needs calibration for model {model}, which has none "
            f"(calibrate it with scripts/calibrate_embeddings.py); use FLOAT32_BYTES, BINARY or UBINARY"
        )
    if not normalize or dimensions != full_dimensions:
        raise InvalidInput(
            f"encoding {name}: model {model}'s {encoding} calibration holds for normalize=true and dimensions="
            f"{full_dimensions} only, got normalize={str(normalize).lower()}, dimensions={dimensions}"
        )


def encodings_of(has_calibration: bool) -> tuple[str, ...]:
    """The encodings an embedding model gives."""
    return tuple(e for e in ENCODINGS if has_calibration or e not in CALIBRATED)
