"""ragserve.v1.Rerank: scores documents against a query and orders them, best first.

Two kinds of model, both run by Triton through the shared `EncoderRunner` (length buckets,
chunks of at most the model's Triton `max_batch_size` rows, sent concurrently so that Triton's dynamic batcher
mixes them with other callers' work):

- bi-encoder (the embedded default): the query and the documents are embedded by the
  embedding model's Triton model; the score is their cosine similarity. It has no logit,
  so `raw_scores` returns the same cosine.
- cross-encoder: each (query, document) pair is tokenized together, truncated on the
  document side only; the score is sigmoid(logit), or the logit with `raw_scores`.

Identical documents are scored once, so duplicates tie exactly and keep request order.
"""

from __future__ import annotations

from concurrent.futures import Executor

import grpc
import numpy as np

from ragserve.v1 import common_pb2, rerank_pb2, rerank_pb2_grpc
from ragserve_server import request_record
from ragserve_server.catalog import BI_ENCODER, CROSS_ENCODER, EMBEDDING, Catalog, ServedModel
from ragserve_server.encoder import EncoderRunner, finish_embeddings
from ragserve_server.errors import InvalidInput
from ragserve_server.services.common import off_loop, requested_model, time_left, truncate_mode
from ragserve_server.tokenization import EncoderTokenizer


class RerankService(rerank_pb2_grpc.RerankServicer):
    def __init__(
        self,
        catalog: Catalog,
        tokenizers: dict[str, EncoderTokenizer],
        encoder: EncoderRunner,
        executor: Executor,
        max_documents_per_call: int,
    ) -> None:
        self.catalog = catalog
        self.tokenizers = tokenizers
        self.encoder = encoder
        self.executor = executor
        self.max_documents = max_documents_per_call

    async def Rerank(self, request: rerank_pb2.RerankRequest, context: grpc.aio.ServicerContext) -> rerank_pb2.RerankResponse:
        return await self.rerank(request, timeout=time_left(context))

    async def rerank(self, request: rerank_pb2.RerankRequest, *, timeout: float | None) -> rerank_pb2.RerankResponse:
        model = self.catalog.get(requested_model(request.model), (BI_ENCODER, CROSS_ENCODER))
        if not request.query.strip():
            raise InvalidInput("query is empty: send the text to rank the documents against")
        documents = list(request.documents)
        if not documents:
            raise InvalidInput("documents is empty: send at least one document")
        if len(documents) > self.max_documents:
            raise InvalidInput(
                f"too many documents: {len(documents)} > {self.max_documents} per call; split them over calls"
            )
        top_n = request.top_n if request.HasField("top_n") else len(documents)  # default: all
        if top_n == 0:
            raise InvalidInput("top_n must be at least 1 (leave it unset for all documents)")
        truncate = truncate_mode(request.truncate)

        # Score each distinct text once; `slots` maps each document to its distinct text.
        distinct: dict[str, int] = {}
        slots = np.array([distinct.setdefault(d, len(distinct)) for d in documents], dtype=np.int64)
        unique = list(distinct)
        if model.kind == BI_ENCODER:
            scores, prompt_tokens = await self._bi_encoder(model, request.query, unique, truncate, timeout)
        else:
            scores, prompt_tokens = await self._cross_encoder(model, request.query, unique, truncate, request.raw_scores, timeout)
        request_record.add_tokens(prompt=prompt_tokens)

        with request_record.stage("respond"):
            # Sorted on the float32 values the caller receives; a stable sort keeps ties in request order.
            per_document = scores.astype(np.float32)[slots]
            order = np.argsort(-per_document, kind="stable")[:top_n]
            results = [
                rerank_pb2.RerankResult(
                    index=int(i),
                    score=float(per_document[i]),
                    document=documents[i] if request.return_documents else None,
                )
                for i in order
            ]
            return rerank_pb2.RerankResponse(
                model=model.name,
                results=results,
                usage=common_pb2.Usage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
            )

    async def _bi_encoder(
        self, model: ServedModel, query: str, documents: list[str], truncate: str, timeout: float | None
    ) -> tuple[np.ndarray, int]:
        embedding = self.catalog.get(model.embedding_model, (EMBEDDING,))
        tokenizer = self.tokenizers[embedding.name]
        query = embedding.prefixes.get("query", "") + query
        passage = embedding.prefixes.get("passage", "")
        documents = [passage + d for d in documents] if passage else documents

        def tokenize() -> tuple[list[int], list[list[int]]]:
            tokenizer.check_query(query, paired=False)
            (query_ids,) = tokenizer.encode([query], truncate)
            return query_ids, tokenizer.encode(documents, truncate, what="document")

        query_ids, document_ids = await off_loop(self.executor, tokenize)
        # Query and documents in one pass: one set of Triton requests, bucketed together.
        pooled = await self.encoder.pooled(embedding, tokenizer, [query_ids, *document_ids], timeout=timeout)
        vectors = finish_embeddings(pooled, dimensions=embedding.dimensions, normalize=True)
        scores = vectors[1:] @ vectors[0]  # cosine: both sides are unit vectors
        return scores, len(query_ids) + sum(len(s) for s in document_ids)

    async def _cross_encoder(
        self, model: ServedModel, query: str, documents: list[str], truncate: str, raw: bool, timeout: float | None
    ) -> tuple[np.ndarray, int]:
        tokenizer = self.tokenizers[model.name]

        def tokenize() -> tuple[list[list[int]], list[list[int]]]:
            tokenizer.check_query(query, paired=True)
            encodings = tokenizer.encode_pairs(query, documents, truncate)
            return [e.ids for e in encodings], [e.type_ids for e in encodings]

        ids, type_ids = await off_loop(self.executor, tokenize)
        logits = await self.encoder.rows(model, tokenizer, ids, output="logits", type_ids=type_ids, timeout=timeout)
        logits = logits.reshape(len(documents)).astype(np.float64)
        scores = logits if raw else 1.0 / (1.0 + np.exp(-logits))
        return scores, sum(len(s) for s in ids)
