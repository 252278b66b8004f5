"""Rerank by MaxSim (late interaction, ColBERT's scoring) over a multi-vector model's tokens.

The query and the documents are embedded in one pass (one set of Triton requests, bucketed
together) by the multi-vector embedding model behind the reranker; each document's raw score
is the sum over the query's content tokens of the best cosine with any of its content tokens
(encoding/multivector.py), and its relevance (raw / query tokens + 1) / 2: the mean best
cosine mapped to [0, 1], comparable across queries of different lengths.
"""

from __future__ import annotations

from concurrent.futures import Executor

import numpy as np

from ragserve_server.encoding import multivector
from ragserve_server.encoding.encoder import EncoderRunner
from ragserve_server.encoding.tokenization import EncoderTokenizer
from ragserve_server.errors import InvalidInput
from ragserve_server.models.catalog import EMBEDDING, Catalog, ServedModel
from ragserve_server.services.common import off_loop


async def scores(
    catalog: Catalog,
    tokenizers: dict[str, EncoderTokenizer],
    encoder: EncoderRunner,
    executor: Executor,
    model: ServedModel,
    query: str,
    documents: list[str],
    truncate: str,
    timeout: float | None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(relevance, raw MaxSim, prompt tokens) per document, in the order of `documents`."""
    embedding = catalog.get(model.embedding_model, (EMBEDDING,))
    tokenizer = tokenizers[embedding.name]
    query = embedding.prefixes.get("query", "") + query
    passage = embedding.prefixes.get("passage", "")
    documents = [passage + d for d in documents] if passage else documents

    def tokenize() -> tuple[list[list[int]], list[np.ndarray]]:
        tokenizer.check_query(query, paired=False)
        query_ids, query_keep = multivector.content_tokens(tokenizer, [query], truncate)
        document_ids, document_keep = multivector.content_tokens(tokenizer, documents, truncate, what="document")
        return query_ids + document_ids, query_keep + document_keep

    sequences, keep = await off_loop(executor, tokenize)
    if not keep[0].any():
        raise InvalidInput("query has no tokens to score with besides the model's special tokens: send words")
    vectors = await multivector.token_vectors(encoder, embedding, tokenizer, sequences, keep, timeout=timeout)
    raw = multivector.maxsim(vectors[0], vectors[1:])
    relevance = (raw / vectors[0].shape[0] + 1.0) / 2.0
    return relevance, raw, sum(len(s) for s in sequences)
