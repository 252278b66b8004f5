"""Request building and response parsing, shared by `Client` and `AsyncClient`.

Only the transport differs between the two clients; everything a call means lives here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
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
    model: str | None,
    normalize: bool | None,
    truncate: str | None,
    dimensions: int | None,
    input_type: str | None,
    encoding: str = DEFAULT_ENCODING,
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
    )


def tokenize_request(
    inputs: str | Sequence[str], *, model: str | None, truncate: str | None, input_type: str | None, return_tokens: bool
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
    model: str | None,
    top_n: int | None,
    return_documents: bool,
    truncate: str | None,
    raw_scores: bool,
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
        )
        for m in response.models
    ]


INPUT_TYPE_NAMES = {value: name for name, value in INPUT_TYPE.items() if name}


FINISH_REASON = {
    generate_pb2.FINISH_REASON_STOP: "stop",
    generate_pb2.FINISH_REASON_STOP_SEQUENCE: "stop_sequence",
    generate_pb2.FINISH_REASON_LENGTH: "length",
    generate_pb2.FINISH_REASON_CANCELLED: "cancelled",
}


def generate_request(
    prompt: str | None,
    *,
    messages: Sequence[Mapping[str, str]] | None,
    model: str | None,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    repetition_penalty: float | None,
    seed: int | None,
    stop: str | Sequence[str] | None,
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


# Calls the SDK retries (idempotent: the same request gives the same answer and changes
# nothing); Generate and the streams are never retried.
RETRIED_METHODS = (
    (embed_pb2.DESCRIPTOR.services_by_name["Embed"].full_name, "Embed"),
    (rerank_pb2.DESCRIPTOR.services_by_name["Rerank"].full_name, "Rerank"),
    (models_pb2.DESCRIPTOR.services_by_name["Models"].full_name, "ListModels"),
    (tokenize_pb2.DESCRIPTOR.services_by_name["Tokenize"].full_name, "Tokenize"),
    (tokenize_pb2.DESCRIPTOR.services_by_name["Tokenize"].full_name, "Detokenize"),
)
DEFAULT_RETRIES = 3
MAX_RETRIES = 4  # gRPC caps maxAttempts at 5
# gRPC replays a call from a buffer; a request larger than the buffer is not retried (default 256 KiB).
RETRY_BUFFER_BYTES = 16 * 1024 * 1024


def service_config(load_balancing: str | None, retries: int) -> dict | None:
    """The channel's service config: the balancing policy and the retry policy, one JSON.

    Retries use gRPC's own policy (gRFC A6): UNAVAILABLE and RESOURCE_EXHAUSTED are retried
    up to `retries` times after a random wait in [0, 0.1 s x 2^n] (at most 5 s), all within
    the call's deadline; a server's `grpc-retry-pushback-ms` trailer replaces that wait
    (a negative value stops the retries)."""
    if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"retries must be an int from 0 (off) to {MAX_RETRIES}, got {retries!r}")
    config: dict = {}
    if load_balancing:
        if load_balancing not in ("round_robin", "pick_first"):
            raise ValueError(f"load_balancing must be 'round_robin' or 'pick_first', got {load_balancing!r}")
        config["loadBalancingConfig"] = [{load_balancing: {}}]
    if retries:
        config["methodConfig"] = [
            {
                "name": [{"service": service, "method": method} for service, method in RETRIED_METHODS],
                "retryPolicy": {
                    "maxAttempts": retries + 1,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
                },
            }
        ]
    return config or None


def channel_options(
    load_balancing: str | None, options: Sequence[tuple[str, object]], retries: int = DEFAULT_RETRIES
) -> list[tuple[str, object]]:
    """gRPC channel options: the caller's, then the service config (`load_balancing` and
    `retries`) unless the caller gave its own `grpc.service_config` (theirs wins, whole)."""
    result = list(options)
    given = {name for name, _ in result}
    config = service_config(load_balancing, retries)
    if config is not None and "grpc.service_config" not in given:
        result.append(("grpc.service_config", json.dumps(config)))
    if retries and "grpc.per_rpc_retry_buffer_size" not in given:
        result.append(("grpc.per_rpc_retry_buffer_size", RETRY_BUFFER_BYTES))
    return result


def _pem(value: bytes | str | os.PathLike | None, name: str) -> bytes | None:
    """PEM bytes as given, or read from a file path (str or Path)."""
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as exc:
        raise ValueError(f"{name}: cannot read {value}: {exc.strerror or exc}") from None


def channel_credentials(
    tls: bool,
    root_certificates: bytes | str | os.PathLike | None,
    private_key: bytes | str | os.PathLike | None,
    certificate_chain: bytes | str | os.PathLike | None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for a plaintext channel. TLS is on with `tls=True` or any
    certificate argument; without `root_certificates` gRPC's default roots verify the server."""
    if (private_key is None) != (certificate_chain is None):
        raise ValueError("private_key and certificate_chain go together (a client certificate for mTLS)")
    if not (tls or root_certificates is not None or private_key is not None):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_pem(root_certificates, "root_certificates"),
        private_key=_pem(private_key, "private_key"),
        certificate_chain=_pem(certificate_chain, "certificate_chain"),
    )


def call_metadata(metadata: Sequence[tuple[str, str]], api_key: str | None) -> tuple[tuple[str, str], ...]:
    """Metadata sent with every call: the caller's, and the API key as a bearer token."""
    if api_key is None:
        return tuple(metadata)
    if not isinstance(api_key, str) or not api_key.strip() or any(c in api_key for c in "\r\n"):
        raise ValueError("api_key must be a non-empty one-line string")
    return (*metadata, ("authorization", f"Bearer {api_key.strip()}"))
