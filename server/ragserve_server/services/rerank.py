"""ragserve.v1.Rerank: scores documents against a query and orders them, best first.

Two kinds of model, both run by Triton through the shared `EncoderRunner` (length buckets,
chunks of at most the model's Triton `max_batch_size` rows, sent concurrently so that Triton's dynamic batcher
mixes them with other callers' work). One score scale for both, `relevance_score` in [0, 1]:

- bi-encoder (the embedded default): the query and the documents are embedded by the
  embedding model's Triton model; relevance (cosine + 1) / 2, raw score the cosine.
- cross-encoder: each (query, document) pair is tokenized together, truncated on the
  document side only; relevance sigmoid(logit), raw score the logit.

`chunk_long_documents`: a document over the model's limit is cut on token boundaries into
pieces that fit (beside the query, for a cross-encoder); each piece is scored and the
document takes its best piece's scores. Identical texts are scored once, so duplicates tie
exactly and keep request order.

An embedding model's name is INVALID_ARGUMENT, not NOT_FOUND: the model exists (ListModels
shows it; the SDK would raise ModelNotFoundError for NOT_FOUND), the request asks it for what
it does not do, and the message names the rerankers to use instead.
"""

from __future__ import annotations

from concurrent.futures import Executor

import grpc
import numpy as np

from ragserve.v1 import common_pb2, rerank_pb2, rerank_pb2_grpc
from ragserve_server.observability import request_record
from ragserve_server.models.catalog import BI_ENCODER, CROSS_ENCODER, EMBEDDING, LLM_RERANKER, MAXSIM, Catalog, ServedModel
from ragserve_server.encoding.encoder import EncoderRunner, finish_embeddings
from ragserve_server.errors import InvalidInput
from ragserve_server.services.common import off_loop, requested_model, time_left, truncate_mode
from ragserve_server.encoding.tokenization import TRUNCATE_END
from ragserve_server.encoding.tokenization import EncoderTokenizer
from ragserve_server.services import rerank_maxsim
from ragserve_server.services.rerank_llm import LlmRerankers

# The kinds Rerank serves (LLM_RERANKER: services/rerank_llm.py).
RERANKERS = (BI_ENCODER, CROSS_ENCODER, LLM_RERANKER, MAXSIM)


class RerankService(rerank_pb2_grpc.RerankServicer):
    def __init__(
        self,
        catalog: Catalog,
        tokenizers: dict[str, EncoderTokenizer],
        encoder: EncoderRunner,
        executor: Executor,
        max_documents_per_call: int,
        llm: LlmRerankers | None = None,
    ) -> None:
        self.catalog = catalog
        self.tokenizers = tokenizers
        self.encoder = encoder
        self.executor = executor
        self.max_documents = max_documents_per_call
        self.llm = llm

    async def Rerank(self, request: rerank_pb2.RerankRequest, context: grpc.aio.ServicerContext) -> rerank_pb2.RerankResponse:
        return await self.rerank(request, timeout=time_left(context))

    async def rerank(self, request: rerank_pb2.RerankRequest, *, timeout: float | None) -> rerank_pb2.RerankResponse:
        name = requested_model(request.model)
        if name and any(m.name == name and m.kind not in RERANKERS for m in self.catalog.models):
            kind = next(m.kind for m in self.catalog.models if m.name == name).replace("_", " ")
            rerankers = ", ".join(m.name for m in self.catalog.models if m.kind in RERANKERS) or "none"
            article = "an" if kind[0] in "aeiou" else "a"
            raise InvalidInput(f"model {name!r} is {article} {kind} model, not a reranker; rerankers: {rerankers}")
        model = self.catalog.get(name, RERANKERS)
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
        if model.kind == LLM_RERANKER:
            self.llm.check(model, len(documents), request.chunk_long_documents)

        pieces = [[d] for d in documents]
        if request.chunk_long_documents:
            pieces = await off_loop(self.executor, self._chunks, model, request.query, documents)
            truncate = TRUNCATE_END  # a piece a token over at a boundary is cut, not refused
        # Score each distinct text once; `slots` maps each piece to its distinct text.
        distinct: dict[str, int] = {}
        slots = [np.array([distinct.setdefault(p, len(distinct)) for p in doc], dtype=np.int64) for doc in pieces]
        unique = list(distinct)
        if model.kind == BI_ENCODER:
            raw, prompt_tokens = await self._bi_encoder(model, request.query, unique, truncate, timeout)
            relevance = (raw + 1.0) / 2.0
        elif model.kind == MAXSIM:
            relevance, raw, prompt_tokens = await rerank_maxsim.scores(
                self.catalog, self.tokenizers, self.encoder, self.executor, model, request.query, unique, truncate, timeout
            )
        elif model.kind == LLM_RERANKER:
            relevance, raw, prompt_tokens = await self.llm.scores(model, request.query, unique, truncate, timeout)
        else:
            raw, prompt_tokens = await self._cross_encoder(model, request.query, unique, truncate, timeout)
            relevance = 1.0 / (1.0 + np.exp(-raw))
        request_record.add_tokens(prompt=prompt_tokens)

        with request_record.stage("respond"):
            # Sorted on the float32 values the caller receives; a stable sort keeps ties in request order.
            relevance, raw = np.clip(relevance, 0.0, 1.0).astype(np.float32), raw.astype(np.float32)
            best = [int(s[np.argmax(relevance[s])]) for s in slots]  # first best piece of each document
            chunk = [int(np.argmax(relevance[s])) for s in slots]
            per_document = relevance[best]
            order = np.argsort(-per_document, kind="stable")[:top_n]
            results = [
                rerank_pb2.RerankResult(
                    index=int(i),
                    relevance_score=float(per_document[i]),
                    document=documents[i] if request.return_documents else None,
                    raw_score=float(raw[best[i]]) if request.raw_scores else None,
                    chunk_index=chunk[i] if request.chunk_long_documents else None,
                )
                for i in order
            ]
            return rerank_pb2.RerankResponse(
                model=model.name,
                results=results,
                usage=common_pb2.Usage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
            )

    def _chunks(self, model: ServedModel, query: str, documents: list[str]) -> list[list[str]]:
        if model.kind in (BI_ENCODER, MAXSIM):
            embedding = self.catalog.get(model.embedding_model, (EMBEDDING,))
            tokenizer = self.tokenizers[embedding.name]
            return [tokenizer.chunks(d) for d in documents]
        tokenizer = self.tokenizers[model.name]
        tokenizer.check_query(query, paired=True)
        return [tokenizer.chunks(d, query=query) for d in documents]

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
        cosine = (vectors[1:] @ vectors[0]).astype(np.float64)  # both sides are unit vectors
        return cosine, len(query_ids) + sum(len(s) for s in document_ids)

    async def _cross_encoder(
        self, model: ServedModel, query: str, documents: list[str], truncate: str, timeout: float | None
    ) -> tuple[np.ndarray, int]:
        tokenizer = self.tokenizers[model.name]

        def tokenize() -> tuple[list[list[int]], list[list[int]]]:
            tokenizer.check_query(query, paired=True)
            encodings = tokenizer.encode_pairs(query, documents, truncate)
            return [e.ids for e in encodings], [e.type_ids for e in encodings]

        ids, type_ids = await off_loop(self.executor, tokenize)
        logits = await self.encoder.rows(model, tokenizer, ids, output="logits", type_ids=type_ids, timeout=timeout)
        return logits.reshape(len(documents)).astype(np.float64), sum(len(s) for s in ids)
