"""Multi-vector (late interaction) outputs: per-token vectors and MaxSim scores.

The graph (scripts/export_multivector.py, or MiniLM's built-in twin) gives one L2-normalised
vector per token position, padding included. `token_vectors` runs the sequences bucketed as
every encoder call is (EncoderRunner), then keeps each sequence's own tokens minus its special
tokens ([CLS], [SEP] and the like: the tokenizer's special-tokens mask), so a text gives one
vector per token of its content. `maxsim` scores a query against documents ColBERT's way.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import numpy as np

from ragserve_server.encoding.encoder import EncoderRunner
from ragserve_server.encoding.tokenization import EncoderTokenizer
from ragserve_server.models.buckets import bucket_length
from ragserve_server.models.catalog import ServedModel
from ragserve_server.models.registry import EMBEDDING_OUTPUTS, MULTI_VECTOR


def content_tokens(tokenizer: EncoderTokenizer, texts: list[str], truncate: str, *, what: str = "input") -> tuple[list[list[int]], list[np.ndarray]]:
    """(token ids per text, a boolean mask per text of the tokens that are not special)."""
    encodings = tokenizer.encodings(texts, truncate, what=what)
    return [e.ids for e in encodings], [np.asarray(e.special_tokens_mask, dtype=bool) == 0 for e in encodings]


async def token_vectors(
    runner: EncoderRunner,
    model: ServedModel,
    tokenizer: EncoderTokenizer,
    sequences: list[list[int]],
    keep: list[np.ndarray],
    *,
    timeout: float | None,
) -> list[np.ndarray]:
    """Per sequence, its kept tokens' vectors (tokens, dim) float32, in the order of `sequences`."""
    output = EMBEDDING_OUTPUTS[MULTI_VECTOR]
    # One EncoderRunner call per length bucket: its rows share a width, so they stack.
    groups: dict[int, list[int]] = defaultdict(list)
    for index, seq in enumerate(sequences):
        groups[bucket_length(len(seq), model.max_input_tokens)].append(index)

    async def run(indices: list[int]) -> tuple[list[int], np.ndarray]:
        values = await runner.rows(model, tokenizer, [sequences[i] for i in indices], output=output, timeout=timeout)
        return indices, values

    parts = await asyncio.gather(*(run(indices) for indices in groups.values()))
    left = getattr(model.spec, "padding_side", "right") == "left"
    vectors: list[np.ndarray] = [np.empty((0, 0), dtype=np.float32)] * len(sequences)
    for indices, values in parts:
        for row, index in enumerate(indices):
            length = len(sequences[index])
            own = values[row, values.shape[1] - length :] if left else values[row, :length]
            vectors[index] = np.ascontiguousarray(own[keep[index]], dtype=np.float32)
    return vectors


def maxsim(query: np.ndarray, documents: list[np.ndarray]) -> np.ndarray:
    """Per document: the sum over query tokens of the best cosine with any document token (the
    vectors are unit length, so a dot product). A document with no content token scores
    -len(query), the lowest a score can be."""
    scores = np.empty(len(documents), dtype=np.float64)
    for index, document in enumerate(documents):
        if document.shape[0] == 0:
            scores[index] = -float(query.shape[0])
            continue
        similarity = query.astype(np.float64) @ document.astype(np.float64).T  # (query tokens, document tokens)
        scores[index] = float(similarity.max(axis=1).sum())
    return scores
