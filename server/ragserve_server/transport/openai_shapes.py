"""OpenAI / Cohere JSON shapes <-> ragserve.v1 messages, for the HTTP front (transport/http/).

Only the shape is checked here (types, fields ragserve cannot honour): what the values mean
(empty inputs, too many, dimensions out of range, unknown model, over-long prompts) is the
services' validation, the same as over gRPC. Unknown fields are ignored, as OpenAI-compatible
servers do (clients send many optional ones).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping

import numpy as np

from ragserve.v1 import embed_pb2, generate_pb2, rerank_pb2
from ragserve_server.errors import InvalidInput
from ragserve_server.models.catalog import Catalog
from ragserve_server.services.embed import DenseEmbeddings

# OpenAI's "stop" covers the end of sequence and a stop sequence; it has no value for a
# generation the server cancelled (FINISH_REASON_CANCELLED): null.
_FINISH = {
    generate_pb2.FINISH_REASON_STOP: "stop",
    generate_pb2.FINISH_REASON_STOP_SEQUENCE: "stop",
    generate_pb2.FINISH_REASON_LENGTH: "length",
}
_UINT32 = 2**32 - 1
# RerankResult's score field ("score", renamed "relevance_score" with the API's next fields).
_SCORE = "relevance_score" if "relevance_score" in rerank_pb2.RerankResult.DESCRIPTOR.fields_by_name else "score"


def _field(body: Mapping, name: str, kinds: type | tuple[type, ...], what: str):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise InvalidInput(f"{name} must be {what}")
    if not isinstance(value, kinds):
        raise InvalidInput(f"{name} must be {what}, got {type(value).__name__}")
    return value


def _int(body: Mapping, name: str, low: int = 0, high: int = _UINT32) -> int | None:
    value = _field(body, name, int, "an integer")
    if value is not None and not low <= value <= high:
        raise InvalidInput(f"{name} must be between {low} and {high}, got {value}")
    return value


def _number(body: Mapping, name: str) -> float | None:
    value = _field(body, name, (int, float), "a number")
    return None if value is None else float(value)


def _model(body: Mapping) -> str:
    return _field(body, "model", str, "a string") or ""


def _strings(value, name: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    if isinstance(value, list) and value and all(isinstance(v, (int, list)) for v in value):
        raise InvalidInput(f"{name}: token arrays are not accepted; send text")
    raise InvalidInput(f"{name} must be a string or a list of strings")


# --- embeddings -------------------------------------------------------------------------


def embed_request(body: Mapping) -> tuple[embed_pb2.EmbedRequest, str]:
    """POST /v1/embeddings -> (EmbedRequest, encoding_format)."""
    if "input" not in body:
        raise InvalidInput("input is required: a string or a list of strings")
    encoding = _field(body, "encoding_format", str, "float or base64") or "float"
    if encoding not in ("float", "base64"):
        raise InvalidInput(f"encoding_format must be float or base64, got {encoding!r}")
    request = embed_pb2.EmbedRequest(model=_model(body), inputs=_strings(body["input"], "input"))
    dimensions = _int(body, "dimensions")
    if dimensions is not None:
        request.dimensions = dimensions
    return request, encoding


def embed_response(result: DenseEmbeddings, encoding: str) -> dict:
    """The OpenAI answer, straight from the vectors (no protobuf on the way)."""
    vectors = np.asarray(result.vectors, dtype="<f4")  # little-endian float32, as OpenAI sends base64
    data = []
    for index, row in enumerate(vectors):
        vector: object = base64.b64encode(row.tobytes()).decode("ascii") if encoding == "base64" else row.tolist()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    usage = {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens}
    return {"object": "list", "data": data, "model": result.model, "usage": usage}


# --- rerank (Cohere / Jina) -------------------------------------------------------------


def rerank_request(body: Mapping) -> rerank_pb2.RerankRequest:
    query = _field(body, "query", str, "a string")
    if query is None:
        raise InvalidInput("query is required")
    documents = body.get("documents")
    if not isinstance(documents, list):
        raise InvalidInput("documents is required: a list of strings or of {\"text\": ...} objects")
    texts = []
    for index, document in enumerate(documents):
        if isinstance(document, Mapping):
            document = document.get("text")
        if not isinstance(document, str):
            raise InvalidInput(f"documents[{index}] must be a string or an object with a text string")
        texts.append(document)
    request = rerank_pb2.RerankRequest(
        model=_model(body), query=query, documents=texts, return_documents=bool(_field(body, "return_documents", bool, "a boolean"))
    )
    top_n = _int(body, "top_n")
    if top_n is not None:
        request.top_n = top_n
    return request


def rerank_response(response: rerank_pb2.RerankResponse, request_id: str) -> dict:
    results = []
    for result in response.results:
        item: dict = {"index": result.index, "relevance_score": getattr(result, _SCORE)}
        if result.HasField("document"):
            item["document"] = {"text": result.document}
        results.append(item)
    usage = {"prompt_tokens": response.usage.prompt_tokens, "total_tokens": response.usage.total_tokens}
    return {"id": request_id, "model": response.model, "results": results, "usage": usage}


# --- chat completions and completions ---------------------------------------------------


def _content(value, index: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content parts: text only
        parts = []
        for part in value:
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise InvalidInput(f"messages[{index}].content: only text parts are accepted")
            parts.append(part["text"])
        return "".join(parts)
    raise InvalidInput(f"messages[{index}].content must be a string or a list of text parts")


def _sampling(body: Mapping, request: generate_pb2.GenerateRequest) -> None:
    n = _int(body, "n", 1, _UINT32)
    if n is not None and n != 1:
        raise InvalidInput("n must be 1: one choice per request")
    for name in ("logprobs", "top_logprobs"):  # refused, not silently dropped: the gRPC API has them
        if body.get(name) is not None and body.get(name) is not False:
            raise InvalidInput(f"{name} is not supported over HTTP; the gRPC Generate API returns logprobs and top_logprobs")
    max_tokens = _int(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens")
    if max_tokens is not None:
        request.max_tokens = max_tokens
    for name in ("temperature", "top_p"):
        value = _number(body, name)
        if value is not None:
            setattr(request, name, value)
    seed = _int(body, "seed", 0, 2**64 - 1)
    if seed is not None:
        request.seed = seed
    stop = body.get("stop")
    if stop is not None:
        request.stop.extend(_strings(stop, "stop"))


def include_usage(body: Mapping) -> bool:
    options = body.get("stream_options")
    return isinstance(options, Mapping) and bool(options.get("include_usage"))


def wants_stream(body: Mapping) -> bool:
    return bool(_field(body, "stream", bool, "a boolean"))


def chat_request(body: Mapping) -> generate_pb2.GenerateRequest:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidInput("messages is required: a list of {role, content} objects")
    request = generate_pb2.GenerateRequest(model=_model(body))
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise InvalidInput(f"messages[{index}] must be an object with a role string")
        role = "system" if message["role"] == "developer" else message["role"]  # OpenAI's newer name for system
        request.messages.add(role=role, content=_content(message.get("content"), index))
    _sampling(body, request)
    return request


def completion_request(body: Mapping) -> generate_pb2.GenerateRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidInput("prompt must be a string (one prompt per request)")
    if body.get("echo"):
        raise InvalidInput("echo is not supported")
    request = generate_pb2.GenerateRequest(model=_model(body), prompt=prompt)
    _sampling(body, request)
    return request


def usage(response: generate_pb2.GenerateResponse) -> dict:
    u = response.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens}


class Completion:
    """Builds the JSON of one chat completion or text completion, whole or as chunks."""

    def __init__(self, chat: bool, request_id: str, model: str) -> None:
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.created = int(time.time())
        self.model = model

    def _envelope(self, chunk: bool, choices: list, **extra) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices, **extra}

    def whole(self, response: generate_pb2.GenerateResponse) -> dict:
        finish = _FINISH.get(response.finish_reason)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": response.text}, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": response.text, "finish_reason": finish, "logprobs": None}
        return self._envelope(False, [choice], usage=usage(response))

    def first_chunk(self) -> dict | None:
        if not self.chat:
            return None
        return self._envelope(True, [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None, "logprobs": None}])

    def delta_chunk(self, text: str) -> dict:
        if self.chat:
            return self._envelope(True, [{"index": 0, "delta": {"content": text}, "finish_reason": None, "logprobs": None}])
        return self._envelope(True, [{"index": 0, "text": text, "finish_reason": None, "logprobs": None}])

    def final_chunk(self, response: generate_pb2.GenerateResponse) -> dict:
        finish = _FINISH.get(response.finish_reason)
        if self.chat:
            return self._envelope(True, [{"index": 0, "delta": {}, "finish_reason": finish, "logprobs": None}])
        return self._envelope(True, [{"index": 0, "text": "", "finish_reason": finish, "logprobs": None}])

    def usage_chunk(self, response: generate_pb2.GenerateResponse) -> dict:
        return self._envelope(True, [], usage=usage(response))


# --- models -----------------------------------------------------------------------------


def models_response(catalog: Catalog) -> dict:
    """GET /v1/models, read from the catalog as ListModels is (kinds by the registry's names)."""
    defaults = set(catalog.defaults.values())
    data = [
        {
            "id": m.name,
            "object": "model",
            "created": 0,
            "owned_by": "ragserve",
            "kind": m.kind,
            "dimensions": m.dimensions or None,
            "max_input_tokens": m.max_input_tokens,
            "is_default": m.name in defaults,
        }
        for m in catalog.models
    ]
    return {"object": "list", "data": data}
