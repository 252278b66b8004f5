"""Typed results of the SDK's calls."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


@dataclass(frozen=True)
class EmbedResult:
    """`embeddings` is float32 (n_inputs, dimensions), rows in input order."""

    model: str
    embeddings: np.ndarray
    usage: Usage


@dataclass(frozen=True)
class RankedDocument:
    """One reranked document: `index` is its position in the request; `document` its text
    when `return_documents` was asked for, else None."""

    index: int
    score: float
    document: str | None = None


@dataclass(frozen=True)
class RerankResult:
    """`results` sorted by score, best first (ties in request order), at most `top_n`."""

    model: str
    results: list[RankedDocument]
    usage: Usage


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: str  # "embedding", "cross_encoder", "bi_encoder" or "generation"
    dimensions: int
    max_input_tokens: int
    max_batch: int
    is_default: bool


@dataclass(frozen=True)
class GenerateResult:
    """The whole completion. `finish_reason` is "stop" (end of sequence or a stop sequence)
    or "length" (max_tokens or the context reached)."""

    model: str
    text: str
    finish_reason: str
    usage: Usage


@dataclass(frozen=True)
class TextDelta:
    """New text of a streamed generation (never a broken character)."""

    text: str
