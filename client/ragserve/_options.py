"""Each call's options, defined once: the keyword arguments of `Client` and `AsyncClient`
methods (`**options: Unpack[...]`), of the bulk helpers, and of the request builders in
`_protocol`. Defaults live in `_protocol`'s builders, the one place a request is made."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypedDict


class EmbedOptions(TypedDict, total=False):
    """model: a served embedding model (default: the gateway's default).
    normalize: L2-normalise (default: the model's own setting, true for every built-in).
    truncate: "none" (default: an over-long text is an error), "end" or "start".
    dimensions: keep the first N dimensions (Matryoshka), re-normalised.
    input_type: "query" or "passage" (the model's prefixes, where it has them).
    encoding: the result's `embeddings` dtype and shape: "float32" (default: float32 (n, d), sent as
        one packed blob and read without a copy: a read-only array, `.copy()` to write), "float"
        (the same numbers as repeated floats), "int8" / "uint8" (calibrated scalar quantisation,
        (n, d); needs the model's calibration, see ModelInfo.encodings), "binary" (int8) /
        "ubinary" (uint8): sign bits packed 8 to a byte, (n, ceil(d / 8)).
    sparse_top_k, sparse_threshold: sparse (SPLADE) models only: keep each input's K largest
        weights / the weights above the threshold (default: every non-zero weight)."""

    model: str | None
    normalize: bool | None
    truncate: str | None
    dimensions: int | None
    input_type: str | None
    encoding: str
    sparse_top_k: int | None
    sparse_threshold: float | None


class RerankOptions(TypedDict, total=False):
    """model: a served reranker. top_n: keep the best N. return_documents: echo each text.
    truncate: "none" (default), "end", "start", for documents only. raw_scores: add each
    reranker's raw score (a bi-encoder's cosine, a cross-encoder's logit) beside the [0, 1]
    `relevance_score`. chunk_long_documents: score an over-long document by its best chunk."""

    model: str | None
    top_n: int | None
    return_documents: bool
    truncate: str | None
    raw_scores: bool
    chunk_long_documents: bool


class GenerateOptions(TypedDict, total=False):
    """messages: chat turns (dicts with "role" and "content"), instead of a raw `prompt`.
    model: a served generation model. max_tokens: default the room the prompt leaves.
    temperature (0 = greedy), top_p, top_k, min_p: sampling. repetition_penalty,
    presence_penalty, frequency_penalty: penalties. seed: same seed and input = same text.
    stop: strings that end the text (not returned); stop_token_ids: token ids that end it.
    logprobs: each token's log probability; top_logprobs=k (0..20): the k likeliest alternatives."""

    messages: Sequence[Mapping[str, str]] | None
    model: str | None
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    min_p: float | None
    repetition_penalty: float | None
    presence_penalty: float | None
    frequency_penalty: float | None
    seed: int | None
    stop: str | Sequence[str] | None
    stop_token_ids: Sequence[int] | None
    logprobs: bool
    top_logprobs: int | None


class TokenizeOptions(TypedDict, total=False):
    """model: any served model (default: the default embedding model). truncate, input_type: as
    in Embed. return_tokens: also each token's string."""

    model: str | None
    truncate: str | None
    input_type: str | None
    return_tokens: bool
