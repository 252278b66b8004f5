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
    request_id: str | None = None


@dataclass(frozen=True)
class RankedDocument:
    """One reranked document: `index` is its position in the request; `relevance_score` in
    [0, 1] for every reranker ((cosine + 1) / 2 for a bi-encoder, sigmoid(logit) for a
    cross-encoder); `raw_score` the cosine or logit when `raw_scores` was asked for;
    `document` its text when `return_documents` was asked for; `chunk_index` the chunk that
    scored best with `chunk_long_documents`."""

    index: int
    relevance_score: float
    document: str | None = None
    raw_score: float | None = None
    chunk_index: int | None = None

    @property
    def score(self) -> float:
        """The same as `relevance_score` (the name before the scale was one for every reranker)."""
        return self.relevance_score


@dataclass(frozen=True)
class RerankResult:
    """`results` sorted by relevance, best first (ties in request order), at most `top_n`;
    `request_id` the server's id for the call."""

    model: str
    results: list[RankedDocument]
    usage: Usage
    request_id: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    name: str
    kind: str  # "embedding", "cross_encoder", "bi_encoder" or "generation"
    dimensions: int
    max_input_tokens: int
    max_batch: int
    is_default: bool


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str  # the token decoded alone (U+FFFD where it holds part of a character)
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A completion token's log probability (of the model's raw distribution) and, with
    `top_logprobs=k`, the k most likely tokens at its position, best first."""

    token_id: int
    token: str
    logprob: float
    top_logprobs: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class GenerateResult:
    """The whole completion. `finish_reason`: "stop" (end of sequence), "stop_sequence" (a
    `stop` string, named by `stop_sequence`, or a `stop_token_ids` token, `stop_token_id`),
    "length" (max_tokens or the context reached) or "cancelled" (the server ended it early;
    the text so far). `logprobs`: one per completion token when asked for, else ()."""

    model: str
    text: str
    finish_reason: str
    usage: Usage
    logprobs: tuple[TokenLogprob, ...] = ()
    stop_sequence: str | None = None
    stop_token_id: int | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class TextDelta:
    """New text of a streamed generation (never a broken character); `logprobs` of the
    tokens it releases when asked for."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
