"""Embed for the models whose output is not one pooled vector: sparse (SPLADE) and multi-vector.

A sparse model answers with `EmbedResponse.sparse_embeddings` (index/weight pairs, largest
first, cut by `sparse_top_k` / `sparse_threshold`); a multi-vector model with
`EmbedResponse.multi_vector_embeddings` (one unit vector per content token, with its token
id). Options that only mean something for another output are refused by name, never ignored.
"""

from __future__ import annotations

from concurrent.futures import Executor

import numpy as np

from ragserve.v1 import common_pb2, embed_pb2
from ragserve_server.encoding import multivector, sparse
from ragserve_server.encoding.encoder import EncoderRunner
from ragserve_server.encoding.tokenization import EncoderTokenizer
from ragserve_server.errors import InvalidInput
from ragserve_server.models.catalog import ServedModel
from ragserve_server.models.registry import DENSE, EMBEDDING_OUTPUTS, MULTI_VECTOR, SPARSE
from ragserve_server.observability import request_record
from ragserve_server.services.common import off_loop

# Encodings a sparse or multi-vector model answers (the SDK's default is FLOAT32_BYTES): the
# values are float32 either way; the quantised encodings are for pooled vectors only.
_FLOAT_ENCODINGS = (
    embed_pb2.EMBEDDING_ENCODING_UNSPECIFIED,
    embed_pb2.EMBEDDING_ENCODING_FLOAT,
    embed_pb2.EMBEDDING_ENCODING_FLOAT32_BYTES,
)


def check_dense(model: ServedModel, request: embed_pb2.EmbedRequest) -> None:
    """A dense model refuses the sparse options."""
    for option in ("sparse_top_k", "sparse_threshold"):
        if request.HasField(option):
            raise InvalidInput(f"{option} is for sparse models; {model.name!r} gives dense vectors: leave it unset")


def sparse_options(model: ServedModel, request: embed_pb2.EmbedRequest) -> sparse.SparseOptions | None:
    """The request's options for `model`'s output (None for a multi-vector model); InvalidInput
    for an option that does not apply to it."""
    output = model.embedding_output
    what = "a sparse model (vocabulary weights)" if output == SPARSE else "a multi-vector model (per-token vectors)"
    if request.HasField("dimensions"):
        raise InvalidInput(f"dimensions cannot cut {model.name!r}: it is {what}; leave dimensions unset")
    if request.HasField("normalize") and not request.normalize and output == MULTI_VECTOR:
        raise InvalidInput(f"{model.name!r} gives unit-length token vectors (the model normalises them); leave normalize unset")
    if request.HasField("normalize") and request.normalize and output == SPARSE:
        raise InvalidInput(f"{model.name!r} gives SPLADE weights, which are not normalised; leave normalize unset")
    if request.encoding not in _FLOAT_ENCODINGS:
        name = embed_pb2.EmbeddingEncoding.Name(request.encoding) if request.encoding in embed_pb2.EmbeddingEncoding.values() else request.encoding
        raise InvalidInput(f"encoding {name} is for dense vectors; {model.name!r} is {what}: use EMBEDDING_ENCODING_FLOAT")
    if output == MULTI_VECTOR:
        check_dense(model, request)
        return None
    return sparse.options(
        top_k=request.sparse_top_k if request.HasField("sparse_top_k") else None,
        threshold=request.sparse_threshold if request.HasField("sparse_threshold") else None,
    )


async def embed(
    model: ServedModel,
    tokenizer: EncoderTokenizer,
    encoder: EncoderRunner,
    executor: Executor,
    request: embed_pb2.EmbedRequest,
    texts: list[str],
    truncate: str,
    *,
    timeout: float | None,
) -> embed_pb2.EmbedResponse:
    """Embed of prefixed `texts` for a sparse or multi-vector `model`."""
    assert model.embedding_output != DENSE
    chosen = sparse_options(model, request)
    if model.embedding_output == SPARSE:
        sequences = await off_loop(executor, tokenizer.encode, texts, truncate)
    else:
        sequences, keep = await off_loop(executor, multivector.content_tokens, tokenizer, texts, truncate)
    prompt_tokens = sum(len(s) for s in sequences)
    request_record.add_tokens(prompt=prompt_tokens)
    response = embed_pb2.EmbedResponse(
        model=model.name,
        usage=common_pb2.Usage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
        encoding=embed_pb2.EMBEDDING_ENCODING_FLOAT,
    )
    if model.embedding_output == SPARSE:
        weights = await encoder.rows(model, tokenizer, sequences, output=EMBEDDING_OUTPUTS[SPARSE], timeout=timeout)
        with request_record.stage("respond"):
            for indices, values in sparse.select(weights, chosen):
                response.sparse_embeddings.add(indices=indices.tolist(), values=values.tolist())
        return response
    vectors = await multivector.token_vectors(encoder, model, tokenizer, sequences, keep, timeout=timeout)
    with request_record.stage("respond"):
        for ids, mask, rows in zip(sequences, keep, vectors):
            token_ids = np.asarray(ids, dtype=np.int64)[mask]
            item = response.multi_vector_embeddings.add(token_ids=token_ids.tolist())
            item.vectors.extend(embed_pb2.Embedding(values=row) for row in rows.tolist())
    return response
