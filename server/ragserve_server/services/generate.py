"""ragserve.v1.Generate: text generation, unary and streamed.

The gateway tokenizes (chat template or raw prompt), streams token ids from the Triton
engine model (decoupled, in-flight batching), detokenizes incrementally, and applies stop
sequences; a stop sequence ends the Triton request early, and so does a caller that
cancels, disconnects or runs out of deadline (leaving the stream cancels the Triton call).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass

import grpc
import numpy as np
from tokenizers import Tokenizer

from ragserve.v1 import common_pb2, generate_pb2, generate_pb2_grpc
from ragserve_server import request_record
from ragserve_server.catalog import GENERATION, Catalog, ServedModel
from ragserve_server.detokenizer import IncrementalDetokenizer, StopMatcher
from ragserve_server.errors import InvalidInput
from ragserve_server.services.common import off_loop, time_left
from ragserve_server.triton import InferenceBackend

DEFAULT_MAX_TOKENS = 256
MAX_STOP_SEQUENCES = 4
ROLES = ("system", "user", "assistant")
_FINISH = {"stop": generate_pb2.FINISH_REASON_STOP, "length": generate_pb2.FINISH_REASON_LENGTH}


class ChatTokenizer:
    """The model's tokenizer and chat template (from its Hugging Face folder)."""

    def __init__(self, model: ServedModel) -> None:
        from transformers import AutoTokenizer  # the chat template needs transformers' renderer

        self._hf = AutoTokenizer.from_pretrained(model.model_dir)
        self.fast: Tokenizer = self._hf.backend_tokenizer

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self._hf(prompt)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self._hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    seed: int  # -1 = none
    stops: list[str]


class GenerateService(generate_pb2_grpc.GenerateServicer):
    def __init__(self, catalog: Catalog, backend: InferenceBackend, executor: Executor) -> None:
        self.catalog = catalog
        self.backend = backend
        self.executor = executor
        self.tokenizers = {m.name: ChatTokenizer(m) for m in catalog.by_kind(GENERATION)}

    async def Generate(self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> generate_pb2.GenerateResponse:
        final = None
        async for event in self.generate(request, timeout=time_left(context)):
            if isinstance(event, generate_pb2.GenerateResponse):
                final = event
        return final

    async def GenerateStream(self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        async for event in self.generate(request, timeout=time_left(context)):
            if isinstance(event, generate_pb2.GenerateResponse):
                yield generate_pb2.GenerateStreamResponse(final=event)
            else:
                yield generate_pb2.GenerateStreamResponse(delta=event)

    async def generate(self, request: generate_pb2.GenerateRequest, *, timeout: float | None) -> AsyncIterator[str | generate_pb2.GenerateResponse]:
        """Yields text deltas, then the final GenerateResponse."""
        model = self.catalog.get(request.model, (GENERATION,))
        tokenizer = self.tokenizers[model.name]
        sampling = _sampling(request, model)
        messages = _messages(request)
        if messages is not None:
            prompt_ids = await off_loop(self.executor, tokenizer.encode_chat, messages)
        else:
            prompt_ids = await off_loop(self.executor, tokenizer.encode_prompt, request.prompt)
        if len(prompt_ids) + sampling.max_tokens > model.max_input_tokens:
            raise InvalidInput(
                f"the prompt has {len(prompt_ids)} tokens; with max_tokens {sampling.max_tokens} that exceeds the "
                f"context of {model.max_input_tokens} tokens: shorten the prompt or lower max_tokens"
            )
        request_record.add_tokens(prompt=len(prompt_ids))

        detokenizer = IncrementalDetokenizer(tokenizer.fast)
        stops = StopMatcher(sampling.stops)
        text, completion_tokens, finish = [], 0, "length"
        stream = self.backend.stream(model.triton_model, _engine_inputs(prompt_ids, sampling), ["token_id", "finish_reason"], timeout=timeout)
        with request_record.stage("triton"):  # queue + decode in the engine, as the tokens arrive
            try:
                async for outputs, final in stream:
                    tokens = outputs.get("token_id")
                    for token in ([] if tokens is None else tokens.reshape(-1).tolist()):
                        completion_tokens += 1
                        request_record.token_emitted()
                        delta = stops.feed(detokenizer.add(int(token)))
                        if delta:
                            text.append(delta)
                            yield delta
                        if stops.stopped:
                            finish = "stop"
                            break
                    if stops.stopped:
                        break  # leaving the stream cancels the Triton request: the engine stops at once
                    reason = outputs.get("finish_reason")
                    if reason is not None and reason.size:  # sent with the last token: the end of the sequence
                        value = reason.reshape(-1)[0]
                        finish = value.decode() if isinstance(value, bytes) else str(value)
                        break
                    if final:
                        break
            finally:
                await stream.aclose()
        if not stops.stopped:
            tail = stops.feed(detokenizer.flush()) + stops.flush()
            if tail:
                text.append(tail)
                yield tail
        request_record.add_tokens(completion=completion_tokens)
        prompt_tokens = len(prompt_ids)
        yield generate_pb2.GenerateResponse(
            model=model.name,
            text="".join(text),
            finish_reason=_FINISH.get(finish, generate_pb2.FINISH_REASON_STOP),
            usage=common_pb2.Usage(
                prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
            ),
        )


def _messages(request: generate_pb2.GenerateRequest) -> list[dict[str, str]] | None:
    has_prompt, has_messages = request.HasField("prompt"), len(request.messages) > 0
    if has_prompt == has_messages:
        raise InvalidInput("set exactly one of prompt (raw text) and messages (chat), not " + ("both" if has_prompt else "neither"))
    if has_prompt:
        if not request.prompt:
            raise InvalidInput("prompt is an empty string")
        return None
    for index, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise InvalidInput(f"message {index} has unknown role {message.role!r}; use one of {', '.join(ROLES)}")
    return [{"role": m.role, "content": m.content} for m in request.messages]


def _sampling(request: generate_pb2.GenerateRequest, model: ServedModel) -> Sampling:
    # Defaults for optional fields are applied here, in one visible place.
    max_tokens = request.max_tokens if request.HasField("max_tokens") else min(DEFAULT_MAX_TOKENS, model.max_input_tokens - 1)
    temperature = request.temperature if request.HasField("temperature") else 1.0
    top_p = request.top_p if request.HasField("top_p") else 1.0
    top_k = request.top_k if request.HasField("top_k") else 0
    repetition_penalty = request.repetition_penalty if request.HasField("repetition_penalty") else 1.0
    if not 1 <= max_tokens < model.max_input_tokens:
        raise InvalidInput(f"max_tokens must be between 1 and {model.max_input_tokens - 1} (the context), got {max_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InvalidInput(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise InvalidInput(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise InvalidInput(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not (math.isfinite(repetition_penalty) and repetition_penalty > 0):
        raise InvalidInput(f"repetition_penalty must be > 0 (1 = none), got {repetition_penalty}")
    stops = list(request.stop)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidInput(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
    for index, stop in enumerate(stops):
        if not stop:
            raise InvalidInput(f"stop sequence {index} is an empty string")
    seed = request.seed if request.HasField("seed") else -1
    if seed > 2**63 - 1:
        raise InvalidInput(f"seed must be below 2**63, got {seed}")
    return Sampling(max_tokens, temperature, top_p, top_k, repetition_penalty, seed, stops)


def _engine_inputs(prompt_ids: list[int], sampling: Sampling) -> dict[str, np.ndarray]:
    return {
        "input_ids": np.asarray(prompt_ids, dtype=np.int64),
        "max_tokens": np.asarray([sampling.max_tokens], dtype=np.int32),
        "temperature": np.asarray([sampling.temperature], dtype=np.float32),
        "top_p": np.asarray([sampling.top_p], dtype=np.float32),
        "top_k": np.asarray([sampling.top_k], dtype=np.int32),
        "repetition_penalty": np.asarray([sampling.repetition_penalty], dtype=np.float32),
        "seed": np.asarray([sampling.seed], dtype=np.int64),
    }
