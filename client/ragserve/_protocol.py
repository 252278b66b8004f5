"""Request building and response parsing, shared by `Client` and `AsyncClient`.

Only the transport differs between the two clients; everything a call means lives here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ragserve._errors import InvalidArgumentError, ServerError
from ragserve._types import (
    EmbedResult,
    GenerateResult,
    ModelInfo,
    RankedDocument,
    TokenizedText,
    TokenizeResult,
    RerankResult,
    SparseEmbedding,
    TextDelta,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from ragserve.v1 import common_pb2, embed_pb2, generate_pb2, models_pb2, rerank_pb2, tokenize_pb2

TRUNCATE = {
    None: common_pb2.TRUNCATE_UNSPECIFIED,
    "none": common_pb2.TRUNCATE_NONE,
    "end": common_pb2.TRUNCATE_END,
    "start": common_pb2.TRUNCATE_START,
}
INPUT_TYPE = {None: embed_pb2.INPUT_TYPE_UNSPECIFIED, "query": embed_pb2.INPUT_TYPE_QUERY, "passage": embed_pb2.INPUT_TYPE_PASSAGE}
# The SDK's encodings; the default "float32" is the packed float32 blob, read with np.frombuffer.
ENCODING = {
    "float32": embed_pb2.EMBEDDING_ENCODING_FLOAT32_BYTES,
    "float": embed_pb2.EMBEDDING_ENCODING_FLOAT,
    "int8": embed_pb2.EMBEDDING_ENCODING_INT8,
    "uint8": embed_pb2.EMBEDDING_ENCODING_UINT8,
    "binary": embed_pb2.EMBEDDING_ENCODING_BINARY,
    "ubinary": embed_pb2.EMBEDDING_ENCODING_UBINARY,
}
DEFAULT_ENCODING = "float32"
ENCODING_NAMES = {value: name for name, value in ENCODING.items()}
ELEMENT_DTYPES = {
    embed_pb2.ELEMENT_TYPE_FLOAT32: np.dtype("<f4"),
    embed_pb2.ELEMENT_TYPE_INT8: np.dtype("i1"),
    embed_pb2.ELEMENT_TYPE_UINT8: np.dtype("u1"),
}
MODEL_KIND = {
    models_pb2.MODEL_KIND_EMBEDDING: "embedding",
    models_pb2.MODEL_KIND_CROSS_ENCODER: "cross_encoder",
    models_pb2.MODEL_KIND_BI_ENCODER: "bi_encoder",
    models_pb2.MODEL_KIND_GENERATION: "generation",
    models_pb2.MODEL_KIND_MAXSIM: "maxsim",
}


def _choice(table: dict, value, name: str):
    try:
        return table[value]
    except KeyError:
        options = ", ".join(repr(k) for k in table if k is not None)
        raise InvalidArgumentError(f"{name} must be one of {options} or None, got {value!r}") from None


def _texts(values: str | Sequence[str], name: str) -> list[str]:
    texts = [values] if isinstance(values, str) else list(values)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidArgumentError(f"{name} {index} must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidArgumentError(f"{name} {index} is not valid UTF-8 text: {exc.reason}") from None
    return texts


def embed_request(
    inputs: str | Sequence[str],
    *,
    model: str | None = None,
    normalize: bool | None = None,
    truncate: str | None = None,
    dimensions: int | None = None,
    input_type: str | None = None,
    encoding: str = DEFAULT_ENCODING,
    sparse_top_k: int | None = None,
    sparse_threshold: float | None = None,
) -> embed_pb2.EmbedRequest:
    request = embed_pb2.EmbedRequest(
        model=model or "",
        inputs=_texts(inputs, "input"),
        truncate=_choice(TRUNCATE, truncate, "truncate"),
        input_type=_choice(INPUT_TYPE, input_type, "input_type"),
        encoding=_encoding(encoding),
    )
    if normalize is not None:
        request.normalize = normalize
    if dimensions is not None:
        if dimensions < 0:
            raise InvalidArgumentError(f"dimensions must be positive, got {dimensions}")
        request.dimensions = dimensions
    if sparse_top_k is not None:
        if sparse_top_k < 1:
            raise InvalidArgumentError(f"sparse_top_k must be at least 1, got {sparse_top_k}")
        request.sparse_top_k = sparse_top_k
    if sparse_threshold is not None:
        request.sparse_threshold = sparse_threshold
    return request


def usage(message: common_pb2.Usage) -> Usage:
    return Usage(message.prompt_tokens, message.completion_tokens, message.total_tokens)


def _encoding(name: str) -> int:
    try:
        return ENCODING[name]
    except (KeyError, TypeError):
        raise InvalidArgumentError(f"encoding must be one of {', '.join(map(repr, ENCODING))}, got {name!r}") from None


def embeddings_of(response: embed_pb2.EmbedResponse) -> np.ndarray:
    """The response's vectors: (n, dimensions) float32 / int8 / uint8, or (n, ceil(dimensions / 8))
    for the bit encodings. A packed blob is read without copying (a read-only array)."""
    if response.encoding in (embed_pb2.EMBEDDING_ENCODING_FLOAT, embed_pb2.EMBEDDING_ENCODING_UNSPECIFIED):
        rows = [e.values for e in response.embeddings]
        width = len(rows[0]) if rows else 0
        return np.array(rows, dtype=np.float32).reshape(len(rows), width)
    packed = response.packed
    dtype = ELEMENT_DTYPES.get(packed.element_type)
    if dtype is None or len(packed.data) != packed.rows * packed.columns * dtype.itemsize:
        raise ServerError(
            f"malformed packed embeddings: {len(packed.data)} bytes for {packed.rows} x {packed.columns} of element type {packed.element_type}"
        )
    return np.frombuffer(packed.data, dtype=dtype).reshape(packed.rows, packed.columns)


def embed_result(response: embed_pb2.EmbedResponse, request_id: str | None = None) -> EmbedResult:
    embeddings = embeddings_of(response)
    packed = response.encoding not in (embed_pb2.EMBEDDING_ENCODING_FLOAT, embed_pb2.EMBEDDING_ENCODING_UNSPECIFIED)
    return EmbedResult(
        model=response.model,
        embeddings=embeddings,
        usage=usage(response.usage),
        request_id=request_id,
        encoding=ENCODING_NAMES.get(response.encoding, "float"),
        dimensions=response.packed.dimensions if packed else embeddings.shape[1],
        sparse=[
            SparseEmbedding(np.array(s.indices, dtype=np.uint32), np.array(s.values, dtype=np.float32))
            for s in response.sparse_embeddings
        ] if response.sparse_embeddings else None,
        token_embeddings=[
            np.array([v.values for v in m.vectors], dtype=np.float32).reshape(len(m.vectors), -1 if m.vectors else 0)
            for m in response.multi_vector_embeddings
        ] if response.multi_vector_embeddings else None,
        token_ids=[np.array(m.token_ids, dtype=np.uint32) for m in response.multi_vector_embeddings]
        if response.multi_vector_embeddings else None,
    )


def tokenize_request(
    inputs: str | Sequence[str], *, model: str | None = None, truncate: str | None = None, input_type: str | None = None,
    return_tokens: bool = False,
) -> tokenize_pb2.TokenizeRequest:
    return tokenize_pb2.TokenizeRequest(
        model=model or "",
        inputs=_texts(inputs, "input"),
        truncate=_choice(TRUNCATE, truncate, "truncate"),
        input_type=_choice(INPUT_TYPE, input_type, "input_type"),
        return_tokens=return_tokens,
    )


def tokenize_result(response: tokenize_pb2.TokenizeResponse) -> TokenizeResult:
    results = [
        TokenizedText(
            ids=list(r.ids),
            offsets=list(zip(r.offset_starts, r.offset_ends)),
            tokens=list(r.tokens),
            untruncated_count=r.untruncated_count,
        )
        for r in response.results
    ]
    return TokenizeResult(model=response.model, results=results, usage=usage(response.usage))


def detokenize_request(ids: Sequence[int], *, model: str | None, skip_special_tokens: bool) -> tokenize_pb2.DetokenizeRequest:
    ids = list(ids)
    for index, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not 0 <= token < 2**32:
            raise InvalidArgumentError(f"ids[{index}] must be an int from 0 to 2**32 - 1, got {token!r}")
    return tokenize_pb2.DetokenizeRequest(model=model or "", ids=ids, skip_special_tokens=skip_special_tokens)


def rerank_request(
    query: str,
    documents: Sequence[str],
    *,
    model: str | None = None,
    top_n: int | None = None,
    return_documents: bool = False,
    truncate: str | None = None,
    raw_scores: bool = False,
    chunk_long_documents: bool = False,
) -> rerank_pb2.RerankRequest:
    if isinstance(documents, str):
        raise InvalidArgumentError("documents must be a sequence of str, not one str")
    (query,) = _texts(query, "query")
    request = rerank_pb2.RerankRequest(
        model=model or "",
        query=query,
        documents=_texts(documents, "document"),
        return_documents=return_documents,
        truncate=_choice(TRUNCATE, truncate, "truncate"),
        raw_scores=raw_scores,
        chunk_long_documents=chunk_long_documents,
    )
    if top_n is not None:
        if top_n < 0:
            raise InvalidArgumentError(f"top_n must be positive, got {top_n}")
        request.top_n = top_n
    return request


def rerank_result(response: rerank_pb2.RerankResponse, request_id: str | None = None) -> RerankResult:
    results = [
        RankedDocument(
            index=r.index,
            relevance_score=r.relevance_score,
            document=r.document if r.HasField("document") else None,
            raw_score=r.raw_score if r.HasField("raw_score") else None,
            chunk_index=r.chunk_index if r.HasField("chunk_index") else None,
        )
        for r in response.results
    ]
    return RerankResult(model=response.model, results=results, usage=usage(response.usage), request_id=request_id)


def model_infos(response: models_pb2.ListModelsResponse) -> list[ModelInfo]:
    return [
        ModelInfo(
            name=m.name,
            kind=MODEL_KIND.get(m.kind, "unspecified"),
            dimensions=m.dimensions,
            max_input_tokens=m.max_input_tokens,
            # A gateway older than max_inputs_per_call sends only the deprecated max_batch.
            max_inputs_per_call=m.max_inputs_per_call or m.max_batch,
            is_default=m.is_default,
            max_batch_rows=m.max_batch_rows,
            max_tokens_per_batch=m.max_tokens_per_batch,
            input_types={INPUT_TYPE_NAMES.get(t.input_type, "unspecified"): t.prefix for t in m.input_types},
            dimensions_may_be_cut=m.dimensions_may_be_cut,
            matryoshka_dimensions=tuple(m.matryoshka_dimensions),
            score_range=(m.score_range.min, m.score_range.max) if m.HasField("score_range") else None,
            raw_score_range=(m.raw_score_range.min, m.raw_score_range.max) if m.HasField("raw_score_range") else None,
            revision=m.revision,
            encodings=tuple(ENCODING_NAMES[e] for e in m.encodings if e in ENCODING_NAMES),
            pooling=POOLING_NAMES.get(m.pooling, ""),
            normalized_by_model=m.normalized_by_model,
            embedding_output=EMBEDDING_OUTPUT_NAMES.get(m.embedding_output, ""),
        )
        for m in response.models
    ]


INPUT_TYPE_NAMES = {value: name for name, value in INPUT_TYPE.items() if name}
# EmbeddingOutput enum values -> "dense", "sparse", "multi_vector".
EMBEDDING_OUTPUT_NAMES = {
    value.number: value.name.removeprefix("EMBEDDING_OUTPUT_").lower()
    for value in models_pb2.EmbeddingOutput.DESCRIPTOR.values
    if value.number
}
# Pooling enum values -> "mean", "cls", "last_token", "max", "mean_sqrt_len".
POOLING_NAMES = {
    value.number: value.name.removeprefix("POOLING_").lower()
    for value in models_pb2.Pooling.DESCRIPTOR.values
    if value.number
}


FINISH_REASON = {
    generate_pb2.FINISH_REASON_STOP: "stop",
    generate_pb2.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
    generate_pb2.FINISH_REASON_LENGTH: "length",
    generate_pb2.FINISH_REASON_CANCELLED: "cancelled",
}


def generate_request(
    prompt: str | None = None,
    *,
    messages: Sequence[Mapping[str, str]] | None = None,
    model: str | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    logprobs: bool = False,
    top_logprobs: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    min_p: float | None = None,
) -> generate_pb2.GenerateRequest:
    request = generate_pb2.GenerateRequest(model=model or "")
    if prompt is not None:
        request.prompt = _texts([prompt], "prompt")[0]
    for index, message in enumerate(messages or ()):
        try:
            role, content = message["role"], message["content"]
        except (KeyError, TypeError):
            raise InvalidArgumentError(f"message {index} must be a mapping with 'role' and 'content'") from None
        request.messages.add(role=role, content=_texts([content], "message")[0])
    optional = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "repetition_penalty": repetition_penalty,
        "seed": seed,
        "top_logprobs": top_logprobs,
        "presence_penalty": presence_penalty,
        "frequency_penalty": frequency_penalty,
        "min_p": min_p,
    }
    request.logprobs = bool(logprobs or top_logprobs)
    for field, value in optional.items():
        if value is not None:
            try:
                setattr(request, field, value)
            except (ValueError, TypeError) as exc:
                raise InvalidArgumentError(f"{field}: {exc}") from None
    if stop is not None:
        request.stop.extend(_texts(stop, "stop sequence"))
    if stop_token_ids is not None:
        try:
            request.stop_token_ids.extend(stop_token_ids)
        except (ValueError, TypeError) as exc:
            raise InvalidArgumentError(f"stop_token_ids: {exc}") from None
    return request


def _logprobs(items) -> tuple[TokenLogprob, ...]:
    return tuple(
        TokenLogprob(i.token_id, i.token, i.logprob, tuple(TopLogprob(t.token_id, t.token, t.logprob) for t in i.top_logprobs))
        for i in items
    )


def generate_result(response: generate_pb2.GenerateResponse, request_id: str | None = None) -> GenerateResult:
    stop = response.WhichOneof("stop")
    return GenerateResult(
        model=response.model,
        text=response.text,
        finish_reason=FINISH_REASON.get(response.finish_reason, "unspecified"),
        usage=usage(response.usage),
        logprobs=_logprobs(response.logprobs),
        stop_sequence=response.stop_sequence if stop == "stop_sequence" else None,
        stop_token_id=response.stop_token_id if stop == "stop_token_id" else None,
        request_id=request_id,
    )


def stream_event(message: generate_pb2.GenerateStreamResponse, request_id: str | None = None) -> TextDelta | GenerateResult:
    if message.WhichOneof("event") == "final":
        return generate_result(message.final, request_id)
    return TextDelta(message.delta, _logprobs(message.logprobs))


def request_id(metadata) -> str | None:
    """The server's `x-request-id` from a call's initial or trailing metadata."""
    for key, value in metadata or ():
        if key == "x-request-id":
            return value
    return None
