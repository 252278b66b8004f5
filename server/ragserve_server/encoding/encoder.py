"""Runs token sequences through a Triton encoder model: bucketed, chunked, in order.

Shared by Embed, the bi-encoder reranker (one model in Triton, weights loaded once) and the
cross-encoder rerankers.
Sequences are grouped by length bucket and sent as Triton requests of at most the model's
Triton max_batch_size rows, concurrently, so that Triton's dynamic batcher can mix them with other
callers' requests of the same shape.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import numpy as np

from ragserve_server.observability import request_record
from ragserve_server.models.catalog import ServedModel
from ragserve_server.encoding.coalescer import Coalescer
from ragserve_server.encoding.tokenization import EncoderTokenizer
from ragserve_server.models.buckets import bucket_length
from ragserve_server.backend.protocol import InferenceBackend
from ragserve_server.calls.admission import current_priority


class EncoderRunner:
    def __init__(self, backend: InferenceBackend, *, coalesce_in_flight: int = 0, bulk_rows: int = 0, bulk_in_flight: int = 0) -> None:
        """`coalesce_in_flight` > 0: small concurrent requests of one shape are joined in the
        gateway once that many are with Triton (coalescer.py); 0: each is its own request.
        `bulk_rows`, `bulk_in_flight`: the coalescer's gate for bulk work (0 = no limit)."""
        self.backend = backend
        self.coalescer = (
            Coalescer(backend, coalesce_in_flight, bulk_rows=bulk_rows, bulk_in_flight=bulk_in_flight) if coalesce_in_flight > 0 else None
        )

    async def pooled(
        self,
        model: ServedModel,
        tokenizer: EncoderTokenizer,
        sequences: list[list[int]],
        *,
        timeout: float | None,
    ) -> np.ndarray:
        """Pooled embeddings (n, dim) in the order of `sequences`, as the model's graph gives them
        (its registry entry says how it pools and whether it normalises)."""
        return await self.rows(model, tokenizer, sequences, output="embedding", timeout=timeout)

    async def rows(
        self,
        model: ServedModel,
        tokenizer: EncoderTokenizer,
        sequences: list[list[int]],
        *,
        output: str,
        type_ids: list[list[int]] | None = None,
        timeout: float | None,
    ) -> np.ndarray:
        """The model's `output`, one row per sequence, in the order of `sequences`.

        With `type_ids` (pairs for a cross-encoder) the model also gets `token_type_ids`.
        """
        by_width: dict[int, list[int]] = defaultdict(list)
        for index, seq in enumerate(sequences):
            by_width[bucket_length(len(seq), model.max_input_tokens)].append(index)
        chunks = [
            (width, rows[start : start + model.rows_per_request])
            for width, rows in by_width.items()
            for start in range(0, len(rows), model.rows_per_request)
        ]
        real = sum(len(s) for s in sequences)
        request_record.add_padding(real=real, padded=sum(w * len(r) for w, r in chunks))

        priority = current_priority()
        side = model.spec.padding_side if model.spec is not None else "right"

        async def run(width: int, rows: list[int]) -> tuple[list[int], np.ndarray]:
            batch = tokenizer.pad(
                [sequences[i] for i in rows], width, None if type_ids is None else [type_ids[i] for i in rows], side=side
            )
            inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
            if type_ids is not None:
                inputs["token_type_ids"] = batch.token_type_ids
            if self.coalescer is not None:
                out = await self.coalescer.infer(
                    model.triton_model, inputs, [output], max_rows=model.rows_per_request, timeout=timeout, priority=priority
                )
            else:
                out = await self.backend.infer(model.triton_model, inputs, [output], timeout=timeout, priority=priority)
            return rows, out[output]

        with request_record.stage("triton"):
            if len(chunks) == 1:
                results = [await run(*chunks[0])]
            else:
                results = await asyncio.gather(*(run(w, r) for w, r in chunks))
        values = np.empty((len(sequences), *results[0][1].shape[1:]), dtype=np.float32)
        for rows, part in results:
            values[rows] = part
        return values


def finish_embeddings(pooled: np.ndarray, *, dimensions: int, normalize: bool) -> np.ndarray:
    """Matryoshka truncation to the first `dimensions`, then L2 normalisation if asked."""
    vectors = pooled[:, :dimensions]
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(vectors, dtype=np.float32)
