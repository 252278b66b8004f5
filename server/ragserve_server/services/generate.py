"""ragserve.v1.Generate: text generation, unary and streamed.

The gateway tokenizes (chat template or raw prompt), streams token ids from the Triton
generation model (decoupled, in-flight batching; the tensors are TensorRT-LLM's, see
generation_contract.py), detokenizes incrementally, and applies stop sequences; a stop
sequence ends the Triton request early, and so does a caller that cancels, disconnects or
runs out of deadline (leaving the stream cancels the Triton call).

Finish reasons: STOP at the model's end of sequence; STOP_SEQUENCE at a `stop` string or a
`stop_token_ids` token (neither is in the text; a stop token is not counted either, like the
end of sequence); LENGTH at max_tokens; CANCELLED when the model server closes the request
without finishing it (a final response with no tensors) while the caller is still there. A
caller's own cancel or spent deadline ends the call with that status instead: no final
message can reach it any more.

`generate` yields `Delta`s (a `str`, so callers that only want text, like the HTTP front, use
it as one; `.logprobs` holds the log probs of the tokens it releases) and then the final
GenerateResponse.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from pathlib import Path

import grpc
from tokenizers import Tokenizer

from ragserve.v1 import common_pb2, generate_pb2, generate_pb2_grpc
from ragserve_server.models import generation_contract as contract
from ragserve_server.observability import request_record
from ragserve_server.models.catalog import GENERATION, Catalog, ServedModel
from ragserve_server.generation import chat_text
from ragserve_server.generation.detokenizer import IncrementalDetokenizer, StopMatcher
from ragserve_server.errors import InvalidInput
from ragserve_server.services.common import off_loop, requested_model, time_left
from ragserve_server.backend.protocol import InferenceBackend

MAX_STOP_SEQUENCES = 4
# A stop sequence is a few words; the bounds keep one call's matching work and held-back text small.
MAX_STOP_CHARS = 512
MAX_STOP_TOTAL_CHARS = 1024
ROLES = ("system", "user", "assistant")
_FINISH = {
    contract.STOP: generate_pb2.FINISH_REASON_STOP,
    contract.LENGTH: generate_pb2.FINISH_REASON_LENGTH,
    contract.STOP_SEQUENCE: generate_pb2.FINISH_REASON_STOP_SEQUENCE,
    contract.CANCELLED: generate_pb2.FINISH_REASON_CANCELLED,
}


class Delta(str):
    """New text of the completion; `logprobs` (TokenLogprob messages) of the tokens it releases."""

    logprobs: tuple[generate_pb2.TokenLogprob, ...] = ()


def _delta(text: str, logprobs: list[generate_pb2.TokenLogprob]) -> Delta:
    delta = Delta(text)
    delta.logprobs = tuple(logprobs)
    return delta


class ChatTokenizer:
    """The model's tokenizer and chat template (from its Hugging Face folder)."""

    def __init__(self, model: ServedModel) -> None:
        from transformers import AutoTokenizer  # the chat template needs transformers' renderer

        self._hf = AutoTokenizer.from_pretrained(model.model_dir)
        self.fast: Tokenizer = self._hf.backend_tokenizer
        self.eos_ids = _eos_ids(model.model_dir, self._hf.eos_token_id)
        if not self.eos_ids:
            raise ValueError(f"{model.name}: no eos_token_id in {model.model_dir} (generation_config.json, config.json or the tokenizer)")
        self.end_id = self.eos_ids[0]  # TensorRT-LLM takes one end id; the others still end a sequence here
        self.vocab_size = self.fast.get_vocab_size(with_added_tokens=True)
        self._pieces: dict[int, str] = {}
        self._specials = chat_text.special_texts(self._hf)

    def piece(self, token: int) -> str:
        """One token decoded alone (U+FFFD where it holds part of a character), cached."""
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = self.fast.decode([token], skip_special_tokens=False)
        return text

    def logprob_message(self, item: contract.TokenLogprobs) -> generate_pb2.TokenLogprob:
        return generate_pb2.TokenLogprob(
            token_id=item.token,
            token=self.piece(item.token),
            logprob=item.logprob,
            top_logprobs=[generate_pb2.TopLogprob(token_id=t, token=self.piece(t), logprob=v) for t, v in item.top],
        )

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self._hf(prompt)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Special-token text in a message stays text (generation/chat_text.py)."""
        return chat_text.encode_chat(self._hf, messages, self._specials)


def _eos_ids(model_dir: Path, tokenizer_eos: int | None) -> list[int]:
    """The model's end-of-sequence ids, primary first: generation_config.json, else config.json, else the tokenizer's."""
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            ids = [eos] if isinstance(eos, int) else list(eos or [])
            if ids:
                return [int(i) for i in ids]
    return [] if tokenizer_eos is None else [int(tokenizer_eos)]


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
                yield generate_pb2.GenerateStreamResponse(delta=event, logprobs=event.logprobs)

    async def generate(self, request: generate_pb2.GenerateRequest, *, timeout: float | None) -> AsyncIterator[Delta | generate_pb2.GenerateResponse]:
        """Yields text deltas, then the final GenerateResponse."""
        model = self.catalog.get(requested_model(request.model), (GENERATION,))
        tokenizer = self.tokenizers[model.name]
        sampling, stop_strings = _sampling(request, model)
        sampling.check_vocabulary(tokenizer.vocab_size)
        messages = _messages(request)
        if messages is not None:
            prompt_ids = await off_loop(self.executor, tokenizer.encode_chat, messages)
        else:
            prompt_ids = await off_loop(self.executor, tokenizer.encode_prompt, request.prompt)
        sampling = _with_max_tokens(sampling, len(prompt_ids), model.max_input_tokens)
        request_record.add_tokens(prompt=len(prompt_ids))

        detokenizer = IncrementalDetokenizer(tokenizer.fast)
        stops = StopMatcher(stop_strings)
        stop_ids = set(sampling.stop_token_ids)
        text, completion_tokens, finish = [], 0, None
        stop_token: int | None = None
        all_logprobs: list[generate_pb2.TokenLogprob] = []
        pending: list[generate_pb2.TokenLogprob] = []  # logprobs of tokens whose text is not out yet
        inputs = contract.request_tensors(prompt_ids, sampling, tokenizer.end_id)
        stream = self.backend.stream(model.triton_model, inputs, contract.output_names(sampling), timeout=timeout)
        with request_record.stage("triton"):  # queue + decode in the engine, as the tokens arrive
            try:
                async for outputs, final in stream:
                    if contract.cancelled_by_server(outputs, final):
                        finish = contract.CANCELLED
                        break
                    tokens = contract.response_tokens(outputs)
                    logprobs = contract.response_logprobs(outputs, tokens) if sampling.logprobs else []
                    for index, token in enumerate(tokens):
                        if token in tokenizer.eos_ids:  # an engine that returns its end id, or a second EOS id
                            finish = contract.STOP
                            break
                        if token in stop_ids:  # the engine returns a stop word's token (as TensorRT-LLM)
                            finish, stop_token = contract.STOP_SEQUENCE, token
                            break
                        completion_tokens += 1
                        request_record.token_emitted()
                        if index < len(logprobs):
                            item = tokenizer.logprob_message(logprobs[index])
                            all_logprobs.append(item)
                            pending.append(item)
                        delta = stops.feed(detokenizer.add(token))
                        if delta:
                            text.append(delta)
                            yield _delta(delta, pending)
                            pending = []
                        if stops.stopped:
                            finish = contract.STOP_SEQUENCE
                            break
                    # Leaving the stream early cancels the Triton request: the engine stops at once.
                    if final or finish is not None:
                        break
            finally:
                await stream.aclose()
        if not stops.stopped:
            tail = stops.feed(detokenizer.flush()) + stops.flush()
            if stops.stopped:  # the flushed tail completed a stop string
                finish = contract.STOP_SEQUENCE
            if tail or pending:
                text.append(tail)
                yield _delta(tail, pending)
        elif pending:
            yield _delta("", pending)
        if finish is None:
            finish = contract.finish_reason(completion_tokens=completion_tokens, max_tokens=sampling.max_tokens, ended_by_end_id=False)
        request_record.add_tokens(completion=completion_tokens)
        prompt_tokens = len(prompt_ids)
        response = generate_pb2.GenerateResponse(
            model=model.name,
            text="".join(text),
            finish_reason=_FINISH[finish],
            usage=common_pb2.Usage(
                prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
            ),
            logprobs=all_logprobs,
        )
        if stops.stopped:
            response.stop_sequence = stops.matched
        elif stop_token is not None:
            response.stop_token_id = stop_token
        yield response


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
            role = message.role if len(message.role) <= 32 else message.role[:32] + "..."  # echoed: keep it short
            raise InvalidInput(f"message {index} has unknown role {role!r}; use one of {', '.join(ROLES)}")
    return [{"role": m.role, "content": m.content} for m in request.messages]


def _sampling(request: generate_pb2.GenerateRequest, model: ServedModel) -> tuple[contract.Sampling, list[str]]:
    """The request's settings; `max_tokens` 0 stands for unset until the prompt is counted
    (`_with_max_tokens`). Defaults of the optional fields: contract.Sampling's own (one visible place)."""
    max_tokens = 0
    if request.HasField("max_tokens"):
        max_tokens = request.max_tokens
        if not 1 <= max_tokens < model.max_input_tokens:
            raise InvalidInput(f"max_tokens must be between 1 and {model.max_input_tokens - 1} (the context), got {max_tokens}")
    sampling = contract.Sampling(
        max_tokens,
        logprobs=request.logprobs,
        stop_token_ids=tuple(request.stop_token_ids),
        **{f: getattr(request, f) for f in contract.Sampling.OPTIONAL if request.HasField(f)},
    )
    sampling.validate()
    stops = list(request.stop)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidInput(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}")
    for index, stop in enumerate(stops):
        if not stop:
            raise InvalidInput(f"stop sequence {index} is an empty string")
        if len(stop) > MAX_STOP_CHARS:
            raise InvalidInput(f"stop sequence {index} has {len(stop)} characters, at most {MAX_STOP_CHARS}")
    if sum(map(len, stops)) > MAX_STOP_TOTAL_CHARS:
        raise InvalidInput(f"the stop sequences have {sum(map(len, stops))} characters together, at most {MAX_STOP_TOTAL_CHARS}")
    return sampling, stops


def _with_max_tokens(sampling: contract.Sampling, prompt_tokens: int, context: int) -> contract.Sampling:
    """max_tokens checked against the prompt, or by default the room the prompt leaves in the context."""
    if sampling.max_tokens:
        if prompt_tokens + sampling.max_tokens > context:
            raise InvalidInput(
                f"the prompt has {prompt_tokens} tokens; with max_tokens {sampling.max_tokens} that exceeds the "
                f"context of {context} tokens: shorten the prompt or lower max_tokens"
            )
        return sampling
    if prompt_tokens >= context:
        raise InvalidInput(
            f"the prompt has {prompt_tokens} tokens and leaves no room in the context of {context} tokens: shorten the prompt"
        )
    return dataclasses.replace(sampling, max_tokens=context - prompt_tokens)
