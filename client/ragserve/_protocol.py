"""Request building and response parsing, shared by `Client` and `AsyncClient`.

Only the transport differs between the two clients; everything a call means lives here.
"""

from __future__ import annotations

import json

from collections.abc import Mapping, Sequence

import numpy as np

from ragserve._errors import InvalidArgumentError
from ragserve._types import EmbedResult, GenerateResult, ModelInfo, RankedDocument, RerankResult, TextDelta, Usage
from ragserve.v1 import common_pb2, embed_pb2, generate_pb2, models_pb2, rerank_pb2

TRUNCATE = {
    None: common_pb2.TRUNCATE_UNSPECIFIED,
    "none": common_pb2.TRUNCATE_NONE,
    "end": common_pb2.TRUNCATE_END,
    "start": common_pb2.TRUNCATE_START,
}
INPUT_TYPE = {None: embed_pb2.INPUT_TYPE_UNSPECIFIED, "query": embed_pb2.INPUT_TYPE_QUERY, "passage": embed_pb2.INPUT_TYPE_PASSAGE}
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
) -> embed_pb2.EmbedRequest:
    request = embed_pb2.EmbedRequest(
        model=model or "",
        inputs=_texts(inputs, "input"),
        truncate=_choice(TRUNCATE, truncate, "truncate"),
        input_type=_choice(INPUT_TYPE, input_type, "input_type"),
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


def embed_result(response: embed_pb2.EmbedResponse) -> EmbedResult:
    rows = [e.values for e in response.embeddings]
    width = len(rows[0]) if rows else 0
    embeddings = np.array(rows, dtype=np.float32).reshape(len(rows), width)
    return EmbedResult(model=response.model, embeddings=embeddings, usage=usage(response.usage))


def rerank_request(
    query: str,
    documents: Sequence[str],
    *,
    model: str | None,
    top_n: int | None,
    return_documents: bool,
    truncate: str | None,
    raw_scores: bool,
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
    )
    if top_n is not None:
        if top_n < 0:
            raise InvalidArgumentError(f"top_n must be positive, got {top_n}")
        request.top_n = top_n
    return request


def rerank_result(response: rerank_pb2.RerankResponse) -> RerankResult:
    results = [
        RankedDocument(index=r.index, score=r.score, document=r.document if r.HasField("document") else None)
        for r in response.results
    ]
    return RerankResult(model=response.model, results=results, usage=usage(response.usage))


def model_infos(response: models_pb2.ListModelsResponse) -> list[ModelInfo]:
    return [
        ModelInfo(
            name=m.name,
            kind=MODEL_KIND.get(m.kind, "unspecified"),
            dimensions=m.dimensions,
            max_input_tokens=m.max_input_tokens,
            max_batch=m.max_batch,
            is_default=m.is_default,
        )
        for m in response.models
    ]


FINISH_REASON = {generate_pb2.FINISH_REASON_STOP: "stop", generate_pb2.FINISH_REASON_LENGTH: "length"}


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
    }
    for field, value in optional.items():
        if value is not None:
            try:
                setattr(request, field, value)
            except (ValueError, TypeError) as exc:
                raise InvalidArgumentError(f"{field}: {exc}") from None
    if stop is not None:
        request.stop.extend(_texts(stop, "stop sequence"))
    return request


def generate_result(response: generate_pb2.GenerateResponse) -> GenerateResult:
    return GenerateResult(
        model=response.model,
        text=response.text,
        finish_reason=FINISH_REASON.get(response.finish_reason, "unspecified"),
        usage=usage(response.usage),
    )


def stream_event(message: generate_pb2.GenerateStreamResponse) -> TextDelta | GenerateResult:
    if message.WhichOneof("event") == "final":
        return generate_result(message.final)
    return TextDelta(message.delta)


def channel_options(load_balancing: str | None, options: Sequence[tuple[str, object]]) -> list[tuple[str, object]]:
    """gRPC channel options; `load_balancing` ("round_robin", "pick_first") goes into the
    channel's service config, which is how gRPC selects a client-side balancing policy."""
    result = list(options)
    if load_balancing:
        if load_balancing not in ("round_robin", "pick_first"):
            raise ValueError(f"load_balancing must be 'round_robin' or 'pick_first', got {load_balancing!r}")
        result.append(("grpc.service_config", json.dumps({"loadBalancingConfig": [{load_balancing: {}}]})))
    return result
