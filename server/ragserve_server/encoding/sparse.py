"""Sparse (SPLADE) vectors: the graph's vocabulary-sized weights -> index/weight pairs.

The graph (scripts/export_sparse.py) gives, per input, max over its tokens of
log(1 + ReLU(MLM logit)) for every vocabulary entry: non-negative, mostly zero. Embed keeps the
weights above a threshold (default 0: every non-zero one), the largest `top_k` of them when
asked, largest first (ties: lower index first).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ragserve_server.errors import InvalidInput


@dataclass(frozen=True)
class SparseOptions:
    top_k: int | None = None  # None: every weight above the threshold
    threshold: float = 0.0  # weights strictly above it are kept


def options(*, top_k: int | None, threshold: float | None) -> SparseOptions:
    """Checked request options (None = not set); InvalidInput names the bad one."""
    if top_k is not None and top_k < 1:
        raise InvalidInput(f"sparse_top_k must be at least 1, got {top_k} (leave it unset for every non-zero weight)")
    if threshold is not None and (not math.isfinite(threshold) or threshold < 0):
        raise InvalidInput(f"sparse_threshold must be a finite number >= 0 (weights are >= 0), got {threshold}")
    return SparseOptions(top_k=top_k, threshold=0.0 if threshold is None else float(threshold))


def select(weights: np.ndarray, chosen: SparseOptions) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row of `weights` (rows, vocabulary): (indices uint32, values float32), largest first."""
    rows = []
    for row in np.asarray(weights, dtype=np.float32):
        indices = np.flatnonzero(row > chosen.threshold)
        values = row[indices]
        order = np.lexsort((indices, -values))  # by weight descending, then index ascending
        if chosen.top_k is not None:
            order = order[: chosen.top_k]
        rows.append((indices[order].astype(np.uint32), values[order]))
    return rows
