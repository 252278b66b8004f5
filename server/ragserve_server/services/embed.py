"""ragserve.v1.Embed: texts in, vectors out (unary and bidirectional bulk stream)."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass

import grpc
import numpy as np

from ragserve.v1 import common_pb2, embed_pb2, embed_pb2_grpc
from ragserve_server.encoding import quantize
from ragserve_server.observability import request_record
from ragserve_server.calls.admission import BULK, Admission
from ragserve_server.models.calibration import Calibration
from ragserve_server.models.catalog import EMBEDDING, Catalog, ServedModel
from ragserve_server.encoding.encoder import EncoderRunner, finish_embeddings
from ragserve_server.errors import InvalidInput, RagserveError, status_of
from ragserve_server.services.common import check_texts, input_type_name, off_loop, requested_model, time_left, truncate_mode
from ragserve_server.encoding.tokenization import EncoderTokenizer
from ragserve_server.models.registry import DENSE, SPARSE
from ragserve_server.services import embed_outputs

ENCODINGS = {
    embed_pb2.EMBEDDING_ENCODING_UNSPECIFIED: quantize.FLOAT,  # the default: repeated float
    embed_pb2.EMBEDDING_ENCODING_FLOAT: quantize.FLOAT,
    embed_pb2.EMBEDDING_ENCODING_FLOAT32_BYTES: quantize.FLOAT32_BYTES,
    embed_pb2.EMBEDDING_ENCODING_INT8: quantize.INT8,
    embed_pb2.EMBEDDING_ENCODING_UINT8: quantize.UINT8,
    embed_pb2.EMBEDDING_ENCODING_BINARY: quantize.BINARY,
    embed_pb2.EMBEDDING_ENCODING_UBINARY: quantize.UBINARY,
}
ENCODING_VALUES = {name: value for value, name in ENCODINGS.items() if value}
_ELEMENT_TYPES = {"<f4": embed_pb2.ELEMENT_TYPE_FLOAT32, "i1": embed_pb2.ELEMENT_TYPE_INT8, "u1": embed_pb2.ELEMENT_TYPE_UINT8}


def encoding_of(value: int) -> str:
    try:
        return ENCODINGS[value]
    except KeyError:
        allowed = ", ".join(f"{embed_pb2.EmbeddingEncoding.Name(v)} ({v})" for v in ENCODING_VALUES.values())
        raise InvalidInput(f"encoding {value} is not a known encoding; allowed: {allowed}") from None

# An Embedding message as wire bytes: `values` (packed repeated float) is the row's float32
# bytes behind the field's tag and length, which protobuf parses in one step. By hand because
# Embedding(values=list) makes a Python float per value first: 32 rows x 384 dimensions took
# 0.75 ms that way, 0.06-0.10 ms this way (1 row: 30 -> 10 us; response built and serialized).
_VALUES_FIELD = embed_pb2.Embedding.DESCRIPTOR.fields_by_name["values"].number
assert _VALUES_FIELD < 16, "one-byte tag below"
_VALUES_TAG = bytes([_VALUES_FIELD << 3 | 2])  # wire type 2: length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def embedding_messages(vectors: np.ndarray) -> list[embed_pb2.Embedding]:
    rows = vectors.astype("<f4", copy=False)
    head = _VALUES_TAG + _varint(rows.shape[1] * 4)
    return [embed_pb2.Embedding.FromString(head + row.tobytes()) for row in rows]


# Messages of one EmbedStream in the gateway at once (working or waiting for a bulk permit);
# beyond that the stream stops reading and HTTP/2 flow control pushes back on the sender.
STREAM_WINDOW = 64


class EmbedService(embed_pb2_grpc.EmbedServicer):
    def __init__(
        self,
        catalog: Catalog,
        tokenizers: dict[str, EncoderTokenizer],
        encoder: EncoderRunner,
        executor: Executor,
        max_inputs_per_call: int,
        admission: Admission,
        *,
        inline_tokenize_chars: int = 0,
    ) -> None:
        self.inline_tokenize_chars = inline_tokenize_chars
        self.admission = admission
        self.catalog = catalog
        self.tokenizers = tokenizers
        self.encoder = encoder
        self.executor = executor
        self.max_inputs = max_inputs_per_call
        self.calibrations = {
            m.name: quantize.Calibration.from_entry(m.int8_calibration, m.dimensions, m.name)
            for m in catalog.by_kind(EMBEDDING)
            if m.int8_calibration is not None
        }

    async def Embed(self, request: embed_pb2.EmbedRequest, context: grpc.aio.ServicerContext) -> embed_pb2.EmbedResponse:
        return await self.embed(request, timeout=time_left(context))

    async def EmbedStream(self, request_iterator, context: grpc.aio.ServicerContext):
        answers: asyncio.Queue[embed_pb2.EmbedStreamResponse | None] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)

        async def answer(message: embed_pb2.EmbedStreamRequest) -> None:
            try:
                # Each message takes a bulk permit, like a unary call (the stream itself takes
                # none): a bulk stream cannot exceed the bulk lane's budget.
                async with self.admission.permit(self.admission.lane_for(BULK), time_left(context)):
                    response = await self.embed(message.request, timeout=time_left(context))
                await answers.put(embed_pb2.EmbedStreamResponse(id=message.id, response=response))
            except RagserveError as exc:  # per message: the stream goes on
                code, text = status_of(exc)
                error = common_pb2.StreamError(code=code.value[0], message=text)
                await answers.put(embed_pb2.EmbedStreamResponse(id=message.id, error=error))
            finally:
                window.release()

        async def read_all() -> None:
            tasks = set()
            try:
                async for message in request_iterator:
                    await window.acquire()
                    task = asyncio.create_task(answer(message))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*tasks)
            except BaseException:
                # The caller went away (or the stream failed): work still queued or running for
                # its messages is cancelled, in Triton too, not computed for nobody.
                for task in tasks:
                    task.cancel()
                raise
            finally:
                await answers.put(None)

        reader = asyncio.create_task(read_all())
        try:
            while (item := await answers.get()) is not None:
                yield item
            await reader  # re-raises a read failure (e.g. an undecodable message)
        finally:
            reader.cancel()

    async def embed(self, request: embed_pb2.EmbedRequest, *, timeout: float | None) -> embed_pb2.EmbedResponse:
        """The gRPC answer: dense vectors packed as wire bytes (embedding_messages), or the
        sparse / multi-vector outputs (services/embed_outputs.py)."""
        model = self.catalog.get(requested_model(request.model), (EMBEDDING,))
        texts = list(request.inputs)
        check_texts(texts, self.max_inputs, stream_hint=True)
        if model.embedding_output != DENSE:  # sparse or multi-vector: services/embed_outputs.py
            prefix = model.prefixes.get(input_type_name(request.input_type), "")
            return await embed_outputs.embed(
                model, self.tokenizers[model.name], self.encoder, self.executor, request, [prefix + t for t in texts],
                truncate_mode(request.truncate), timeout=timeout,
            )
        result = await self._dense(model, texts, request, timeout)
        with request_record.stage("respond"):
            return embed_response(result)

    async def dense(self, request: embed_pb2.EmbedRequest, *, timeout: float | None) -> DenseEmbeddings:
        """Dense vectors as numpy, for a front that renders its own format (the HTTP front)."""
        model = self.catalog.get(requested_model(request.model), (EMBEDDING,))
        texts = list(request.inputs)
        check_texts(texts, self.max_inputs, stream_hint=True)
        if model.embedding_output != DENSE:
            what = "sparse" if model.embedding_output == SPARSE else "multi-vector (per-token)"
            raise InvalidInput(f"model {model.name!r} gives {what} vectors, which /v1/embeddings cannot carry; use the gRPC Embed call")
        return await self._dense(model, texts, request, timeout)

    async def _dense(self, model: ServedModel, texts: list[str], request: embed_pb2.EmbedRequest, timeout: float | None) -> DenseEmbeddings:
        embed_outputs.check_dense(model, request)
        dimensions = request.dimensions if request.HasField("dimensions") else model.dimensions
        if not 1 <= dimensions <= model.dimensions:
            raise InvalidInput(f"dimensions must be between 1 and {model.dimensions} for {model.name}, got {dimensions}")
        input_type = input_type_name(request.input_type)
        truncate = truncate_mode(request.truncate)
        normalize = request.normalize if request.HasField("normalize") else True  # default: normalised
        encoding = encoding_of(request.encoding)
        calibration = self.calibrations.get(model.name)
        quantize.check_encoding(
            encoding, model=model.name, calibration=calibration, normalize=normalize, dimensions=dimensions,
            full_dimensions=model.dimensions,
        )

        prefix = model.prefixes.get(input_type, "")
        if prefix:
            texts = [prefix + t for t in texts]
        tokenizer = self.tokenizers[model.name]
        inline = sum(map(len, texts)) <= self.inline_tokenize_chars
        sequences = await off_loop(self.executor, tokenizer.encode, texts, truncate, inline=inline)
        prompt_tokens = sum(len(s) for s in sequences)
        request_record.add_tokens(prompt=prompt_tokens)

        pooled = await self.encoder.pooled(model, tokenizer, sequences, timeout=timeout)
        vectors = finish_embeddings(pooled, dimensions=dimensions, normalize=normalize)
        return DenseEmbeddings(model.name, vectors, prompt_tokens, encoding, dimensions, calibration)


@dataclass(frozen=True)
class DenseEmbeddings:
    """What Embed computes for a dense model, before a front renders it."""

    model: str
    vectors: np.ndarray  # float32 (texts, dimensions), normalised when asked
    prompt_tokens: int
    encoding: str  # quantize.ENCODINGS: how the gRPC answer packs them
    dimensions: int
    calibration: Calibration | None  # int8 / uint8 ranges, where the model has them


def embed_response(result: DenseEmbeddings) -> embed_pb2.EmbedResponse:
    """The gRPC EmbedResponse of `result`, in its encoding."""
    response = embed_pb2.EmbedResponse(
        model=result.model,
        usage=common_pb2.Usage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens),
        encoding=ENCODING_VALUES[result.encoding],
    )
    if result.encoding == quantize.FLOAT:
        response.embeddings.extend(embedding_messages(result.vectors))
    else:
        packed = quantize.encode(result.vectors, result.encoding, result.calibration)
        response.packed.CopyFrom(
            embed_pb2.PackedEmbeddings(
                data=packed.tobytes(),
                rows=packed.shape[0],
                columns=packed.shape[1],
                element_type=_ELEMENT_TYPES[quantize.ELEMENT_TYPES[result.encoding]],
                dimensions=result.dimensions,
            )
        )
    return response
