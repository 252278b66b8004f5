"""Typed results of the SDK's calls."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    # "float32" (the SDK's default, packed), "float", "int8", "uint8", "binary" or "ubinary";
    # `dimensions`: the vectors' size (bits per row for the bit encodings: for "ubinary",
    # np.unpackbits(embeddings, axis=-1, count=dimensions) gives the (x > 0) bits back;
    # "binary" is ubinary - 128, so unpack (embeddings.astype(np.int16) + 128).astype(np.uint8)).
    encoding: str = "float32"
    dimensions: int = 0
    # Sparse (SPLADE) models: one SparseEmbedding per input (`embeddings` is then empty).
    sparse: list["SparseEmbedding"] | None = None
    # Multi-vector models: per input, float32 (tokens, dimensions) unit vectors of its content
    # tokens (special tokens left out) and their token ids (`embeddings` is then empty).
    token_embeddings: list[np.ndarray] | None = None
    token_ids: list[np.ndarray] | None = None


@dataclass(frozen=True)
class SparseEmbedding:
    """One input's sparse vector: vocabulary `indices` (uint32) and their `values` (float32),
    largest value first."""

    indices: np.ndarray
    values: np.ndarray


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
    """What a served model takes and gives (ListModels). Limits: `max_inputs_per_call` texts
    per Embed / Tokenize call or documents per Rerank call; `max_batch_rows` rows per Triton
    request (longer calls are split); `max_tokens_per_batch` = rows x `max_input_tokens`.
    Embedding models: `input_types` ({"query": prefix, "passage": prefix}, "" = none),
    `dimensions_may_be_cut` (Embed's `dimensions`), `matryoshka_dimensions` (sizes it was
    trained to be cut to; empty: cutting allowed but not trained for), `encodings`, `pooling`
    ("mean", "cls", "last_token", "max", "mean_sqrt_len"), `normalized_by_model` (its vectors
    are unit length even with normalize=False).
    Rerankers: `score_range` of `relevance_score`, `raw_score_range` of `raw_score`."""

    name: str
    kind: str  # "embedding", "cross_encoder", "bi_encoder", "maxsim" or "generation"
    dimensions: int
    max_input_tokens: int
    max_inputs_per_call: int
    is_default: bool
    max_batch_rows: int = 0
    max_tokens_per_batch: int = 0
    input_types: dict[str, str] = field(default_factory=dict)
    dimensions_may_be_cut: bool = False
    matryoshka_dimensions: tuple[int, ...] = ()
    score_range: tuple[float, float] | None = None
    raw_score_range: tuple[float, float] | None = None
    revision: str = ""
    encodings: tuple[str, ...] = ()
    pooling: str = ""  # "" for models that do not pool (or a gateway older than the field)
    normalized_by_model: bool = False
    # "dense" (`EmbedResult.embeddings`), "sparse" (`.sparse`) or "multi_vector" (`.token_embeddings`).
    embedding_output: str = ""

    @property
    def max_batch(self) -> int:
        """Deprecated: `max_inputs_per_call`."""
        return self.max_inputs_per_call


@dataclass(frozen=True)
class TokenizedText:
    """One text's tokens as the model gets them: `ids`, per token its `offsets` (start, end)
    in the text in characters ((0, 0) for special and prefix tokens), `tokens` (strings, when
    asked for), `untruncated_count` (> len(ids) when truncated)."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    tokens: list[str]
    untruncated_count: int

    @property
    def count(self) -> int:
        return len(self.ids)

    @property
    def truncated(self) -> bool:
        return self.untruncated_count > len(self.ids)


@dataclass(frozen=True)
class TokenizeResult:
    model: str
    results: list[TokenizedText]
    usage: Usage


@dataclass(frozen=True)
class EmbedBatch:
    """One batch of `embed_stream_batches`: rows `start` .. `start + len(embeddings)` of the
    input, in input order."""

    start: int
    embeddings: np.ndarray
    usage: Usage


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
