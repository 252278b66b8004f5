"""Generate in-process against a fake streaming backend: validation, detokenization, stops."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

import ragserve
from ragserve_server.app import create_gateway
from ragserve_server.models import generation_contract as contract
from ragserve_server.models.catalog import GENERATION, Catalog, served
from ragserve_server.generation.detokenizer import IncrementalDetokenizer, StopMatcher
from ragserve_server.models.builtin import smollm2_spec
from ragserve_server.settings import Settings
from support import unavailable

HF = Path(__file__).resolve().parents[1] / "model_repository" / "smollm2" / "1" / "hf"
if not (HF / "tokenizer.json").exists():
    unavailable("SmolLM2 folder not built: run `make models`", allow_module_level=True)

TEXT = "Héllo wörld! 東京 is 🚀 great.\n  Spaces   kept. The END."


def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(HF / "tokenizer.json"))


def test_incremental_detokenization_never_breaks_characters():
    tok = tokenizer()
    ids = tok.encode(TEXT).ids
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == TEXT
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("stop,expected", [("wörld", "Héllo "), ("END", TEXT[: TEXT.index("END")]), ("absent", TEXT), ("🚀", "Héllo wörld! 東京 is ")])
def test_stop_sequences_never_leak(stop, expected):
    tok = tokenizer()
    detok, matcher, released = IncrementalDetokenizer(tok), StopMatcher([stop, "zzz"]), []
    for token in tok.encode(TEXT).ids:
        released.append(matcher.feed(detok.add(token)))
        if matcher.stopped:
            break
    if not matcher.stopped:
        released.append(matcher.feed(detok.flush()) + matcher.flush())
    assert "".join(released) == expected
    assert all(stop not in part for part in released)


EOS = 2  # <|im_end|>, SmolLM2's end id


def response(tokens: list[int], inputs=None) -> dict[str, np.ndarray]:
    """One streamed TensorRT-LLM response: the new tokens of the first beam (and, when the
    request asks for them, made-up log probs: -token/1000, alternatives token+1.. below)."""
    n = len(tokens)
    out = {
        "output_ids": np.array(tokens, dtype=np.int32).reshape(1, 1, n),
        "sequence_length": np.array([[n]], dtype=np.int32),
    }
    if inputs is not None and "return_log_probs" in inputs:
        out["output_log_probs"] = np.array([-t / 1000 for t in tokens], dtype=np.float32).reshape(1, 1, n)
        out["cum_log_probs"] = np.zeros((1, 1), dtype=np.float32)
        if "num_top_logprobs" in inputs:
            k = int(inputs["num_top_logprobs"][0, 0])
            out["top_logprobs_ids"] = np.array([[t + j for j in range(k)] for t in tokens], dtype=np.int32).reshape(1, 1, n, k)
            out["top_logprobs"] = np.array([[-(t + j) / 1000 for j in range(k)] for t in tokens], dtype=np.float32).reshape(1, 1, n, k)
    return out


class FakeEngine:
    """Streams the tokens of TEXT, then its end id, like TensorRT-LLM's decoupled model: one
    response per token, the end id left out (an empty final response), or the last allowed
    token's response final. `returns_end_id` imitates an engine that sends the end id."""

    def __init__(self) -> None:
        self.tokens = tokenizer().encode(TEXT).ids
        self.closed_early = asyncio.Event()
        self.inputs = None
        self.outputs = None
        self.returns_end_id = False
        self.cancel_after: int | None = None  # close the request with a tensor-less final after this many tokens

    async def stream(self, model, inputs, outputs, *, timeout, priority=0):
        self.inputs, self.outputs = inputs, outputs
        limit = int(inputs["request_output_len"][0, 0])
        end_id = int(inputs["end_id"][0, 0])
        stop_ids = set(inputs["stop_words_list"][0, 0].tolist()) if "stop_words_list" in inputs else set()
        sequence = self.tokens + [end_id]
        done = False
        try:
            for i, token in enumerate(sequence[:limit]):
                if i == self.cancel_after:
                    done = True
                    yield {}, True
                    return
                last = i == limit - 1
                if token == end_id and not self.returns_end_id:
                    done = True
                    yield response([], inputs), True
                    return
                done = last or token == end_id or token in stop_ids  # a stop word's token is returned
                yield response([token], inputs), done
                if done:
                    return
                await asyncio.sleep(0)
        finally:
            if not done:
                self.closed_early.set()

    async def is_ready(self, models):
        return True

    async def close(self):
        pass


@pytest.fixture
async def fake_generation():
    engine = FakeEngine()
    spec = dataclasses.replace(smollm2_spec(), max_input_tokens=64, llm_rerankers=())  # the generation model alone
    (model,) = served(spec)
    gateway = await create_gateway(Settings(port=0, health_poll_interval=0.05), engine, Catalog([model], {GENERATION: model.name}))
    client = ragserve.AsyncClient(f"127.0.0.1:{gateway.port}", timeout=10)
    yield engine, client
    await client.close()
    await gateway.stop(0)


async def test_stream_concatenates_to_unary_text(fake_generation):
    engine, client = fake_generation
    events = [e async for e in client.stream("hi", max_tokens=40, temperature=0)]
    final = events[-1]
    assert isinstance(final, ragserve.GenerateResult) and final.finish_reason == "stop"
    assert "".join(e.text for e in events[:-1]) == final.text == TEXT
    unary = await client.generate("hi", max_tokens=40, temperature=0)
    assert unary.text == TEXT and unary.usage.completion_tokens == len(engine.tokens)  # the end id is not a completion token
    assert unary.usage.prompt_tokens == len(tokenizer().encode("hi").ids)
    assert engine.outputs == contract.OUTPUT_NAMES


async def test_stop_sequence_cancels_the_engine_request(fake_generation):
    engine, client = fake_generation
    result = await client.generate("hi", max_tokens=40, stop=["東京", "zzz"])
    assert result.text == "Héllo wörld! " and result.finish_reason == "stop_sequence"
    assert result.stop_sequence == "東京" and result.stop_token_id is None
    await asyncio.wait_for(engine.closed_early.wait(), 2)


async def test_finish_reason_from_the_final_flag_the_end_id_and_the_count(fake_generation):
    engine, client = fake_generation
    n = len(engine.tokens)
    short = await client.generate("hi", max_tokens=3)
    assert short.finish_reason == "length" and short.usage.completion_tokens == 3
    exact = await client.generate("hi", max_tokens=n)  # every token of TEXT, no room for the end id
    assert exact.finish_reason == "length" and exact.text == TEXT
    end_last = await client.generate("hi", max_tokens=n + 1)  # the end id is the last allowed token
    assert end_last.finish_reason == "stop" and end_last.usage.completion_tokens == n
    engine.returns_end_id = True  # an engine that sends the end id: the gateway stops on it, unseen
    sent = await client.generate("hi", max_tokens=n + 1)
    assert sent.finish_reason == "stop" and sent.text == TEXT and sent.usage.completion_tokens == n


async def test_sampling_maps_onto_tensorrt_llm_tensors(fake_generation):
    engine, client = fake_generation
    await client.generate("hi", max_tokens=3, temperature=0.5, top_p=0.9, top_k=5, repetition_penalty=1.1, seed=2**64 - 1)
    sent = {k: v.tolist() for k, v in engine.inputs.items() if k != "input_ids"}
    assert sent["runtime_top_k"] == [[5]] and sent["seed"] == [[2**64 - 1]] and sent["request_output_len"] == [[3]]
    assert sent["end_id"] == [[EOS]] and sent["streaming"] == [[True]]
    assert sent["input_lengths"] == [[engine.inputs["input_ids"].shape[1]]]
    np.testing.assert_allclose([sent["temperature"][0][0], sent["runtime_top_p"][0][0], sent["repetition_penalty"][0][0]], [0.5, 0.9, 1.1], rtol=1e-6)
    # Greedy is TensorRT-LLM's runtime_top_k = 1 at a neutral temperature.
    await client.generate("hi", max_tokens=3, temperature=0, top_k=7)
    assert engine.inputs["runtime_top_k"].tolist() == [[1]] and engine.inputs["temperature"].tolist() == [[1.0]]
    # Unseeded requests get a random seed each (TensorRT-LLM's default seed would be 0 for all).
    seeds = set()
    for _ in range(3):
        await client.generate("hi", max_tokens=2)
        seeds.add(int(engine.inputs["seed"][0, 0]))
    assert len(seeds) == 3
    # The API's defaults: full-distribution sampling (top-p 1 keeps TensorRT-LLM from greedy).
    assert engine.inputs["runtime_top_k"].tolist() == [[0]] and engine.inputs["runtime_top_p"].tolist() == [[1.0]]
    assert engine.inputs["temperature"].tolist() == [[1.0]] and engine.inputs["repetition_penalty"].tolist() == [[1.0]]


BAD = [
    (dict(), "exactly one of prompt"),
    (dict(prompt="x", messages=[{"role": "user", "content": "y"}]), "not both"),
    (dict(prompt=""), "prompt is an empty string"),
    (dict(prompt="word " * 80), "exceeds the context of 64"),
    (dict(prompt="x", max_tokens=0), "max_tokens must be between 1 and 63"),
    (dict(prompt="x", max_tokens=64), "got 64"),
    (dict(prompt="x", temperature=-0.1), "temperature must be >= 0"),
    (dict(prompt="x", top_p=0.0), "top_p must be in (0, 1]"),
    (dict(prompt="x", top_p=1.5), "top_p must be in (0, 1]"),
    (dict(prompt="x", top_k=-1), "top_k must be >= 0"),
    (dict(prompt="x", repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(prompt="x", stop=["a", "b", "c", "d", "e"]), "at most 4 stop sequences"),
    (dict(prompt="x", stop=["a", ""]), "stop sequence 1 is an empty string"),
    (dict(messages=[{"role": "wizard", "content": "y"}]), "unknown role 'wizard'"),
    (dict(prompt="x", presence_penalty=2.5), "presence_penalty must be in [-2, 2] (0 = off), got 2.5"),
    (dict(prompt="x", frequency_penalty=-3.0), "frequency_penalty must be in [-2, 2] (0 = off), got -3.0"),
    (dict(prompt="x", min_p=1.5), "min_p must be in [0, 1] (0 = off), got 1.5"),
    (dict(prompt="x", min_p=-0.1), "min_p must be in [0, 1]"),
    (dict(prompt="x", top_logprobs=21), "top_logprobs must be in [0, 20], got 21"),
    (dict(prompt="x", stop_token_ids=[49152]), "stop_token_ids[0] is 49152, the model's token ids are in [0, 49152)"),
    (dict(prompt="x", stop_token_ids=list(range(17))), "stop_token_ids holds 17 ids, at most 16"),
    (dict(prompt="word " * 63, max_tokens=None), "leaves no room in the context of 64 tokens"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m for _, m in BAD])
async def test_bad_input(fake_generation, kwargs, message):
    _, client = fake_generation
    with pytest.raises(ragserve.InvalidArgumentError) as info:
        await client.generate(max_tokens=kwargs.pop("max_tokens", 8), **kwargs)
    assert message in info.value.message
    assert (await client.generate("still serving", max_tokens=2)).usage.completion_tokens == 2


async def test_logprobs_per_token_in_the_stream_and_the_final(fake_generation):
    engine, client = fake_generation
    n = len(engine.tokens)
    result = await client.generate("hi", max_tokens=40, logprobs=True, top_logprobs=3)
    assert engine.outputs == contract.OUTPUT_NAMES + ("output_log_probs", "cum_log_probs", "top_logprobs_ids", "top_logprobs")
    assert engine.inputs["return_log_probs"].tolist() == [[True]] and engine.inputs["num_top_logprobs"].tolist() == [[3]]
    assert len(result.logprobs) == result.usage.completion_tokens == n  # one per completion token; not the end id
    assert [lp.token_id for lp in result.logprobs] == engine.tokens
    first = result.logprobs[0]
    assert first.logprob == pytest.approx(-engine.tokens[0] / 1000)
    assert [t.token_id for t in first.top_logprobs] == [engine.tokens[0] + j for j in range(3)]
    assert first.token == tokenizer().decode([engine.tokens[0]])
    events = [e async for e in client.stream("hi", max_tokens=40, logprobs=True)]
    streamed = [lp for e in events[:-1] for lp in e.logprobs]
    assert [lp.token_id for lp in streamed] == engine.tokens and events[-1].logprobs == tuple(streamed)
    assert all(lp.top_logprobs == () for lp in streamed)
    # Without logprobs nothing extra is asked for, sent or returned.
    plain = await client.generate("hi", max_tokens=4)
    assert plain.logprobs == () and engine.outputs == contract.OUTPUT_NAMES
    assert not {"return_log_probs", "num_top_logprobs", "min_p", "presence_penalty", "frequency_penalty", "stop_words_list"} & set(engine.inputs)


async def test_stop_token_ids_end_the_generation_unseen(fake_generation):
    engine, client = fake_generation
    stop_at = 4
    token = engine.tokens[stop_at]
    assert token not in engine.tokens[:stop_at]
    result = await client.generate("hi", max_tokens=40, stop_token_ids=[token, 7])
    assert engine.inputs["stop_words_list"].tolist() == [[[token, 7], [1, 2]]]  # TensorRT-LLM's [ids; end offsets]
    assert result.finish_reason == "stop_sequence" and result.stop_token_id == token and result.stop_sequence is None
    assert result.usage.completion_tokens == stop_at and result.text == tokenizer().decode(engine.tokens[:stop_at])


async def test_penalties_and_min_p_map_onto_their_tensors(fake_generation):
    engine, client = fake_generation
    await client.generate("hi", max_tokens=2, presence_penalty=0.5, frequency_penalty=-1.5, min_p=0.05)
    sent = {k: v.tolist() for k, v in engine.inputs.items()}
    np.testing.assert_allclose([sent["presence_penalty"][0][0], sent["frequency_penalty"][0][0], sent["min_p"][0][0]], [0.5, -1.5, 0.05], rtol=1e-6)


async def test_a_request_the_server_cancels_ends_with_cancelled_and_the_text_so_far(fake_generation):
    engine, client = fake_generation
    engine.cancel_after = 3
    result = await client.generate("hi", max_tokens=40)
    assert result.finish_reason == "cancelled" and result.usage.completion_tokens == 3
    assert result.text == tokenizer().decode(engine.tokens[:3])
    events = [e async for e in client.stream("hi", max_tokens=40)]
    assert events[-1].finish_reason == "cancelled"


async def test_max_tokens_defaults_to_the_room_left_in_the_context(fake_generation):
    engine, client = fake_generation
    prompt = "word " * 20
    result = await client.generate(prompt)
    prompt_tokens = result.usage.prompt_tokens
    assert engine.inputs["request_output_len"].tolist() == [[64 - prompt_tokens]]


async def test_results_carry_the_request_id_and_per_call_metadata_is_sent(fake_generation):
    _, client = fake_generation
    result = await client.generate("hi", max_tokens=2, metadata=[("x-request-id", "caller-id-1")])
    assert result.request_id == "caller-id-1"
    assert (await client.generate("hi", max_tokens=2)).request_id not in (None, "caller-id-1")
    events = [e async for e in client.stream("hi", max_tokens=2, metadata=[("x-request-id", "caller-id-2")])]
    assert events[-1].request_id == "caller-id-2"
