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
from ragserve_server import generation_contract as contract
from ragserve_server.catalog import GENERATION, Catalog, served
from ragserve_server.detokenizer import IncrementalDetokenizer, StopMatcher
from ragserve_server.registry import smollm2_spec
from ragserve_server.settings import Settings

HF = Path(__file__).resolve().parents[1] / "model_repository" / "smollm2" / "1" / "hf"
pytestmark = pytest.mark.skipif(not (HF / "tokenizer.json").exists(), reason="SmolLM2 folder not built: run `make models`")

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


def response(tokens: list[int]) -> dict[str, np.ndarray]:
    """One streamed TensorRT-LLM response: the new tokens of the first beam."""
    return {
        "output_ids": np.array(tokens, dtype=np.int32).reshape(1, 1, len(tokens)),
        "sequence_length": np.array([[len(tokens)]], dtype=np.int32),
    }


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

    async def stream(self, model, inputs, outputs, *, timeout):
        self.inputs, self.outputs = inputs, outputs
        limit = int(inputs["request_output_len"][0, 0])
        end_id = int(inputs["end_id"][0, 0])
        sequence = self.tokens + [end_id]
        done = False
        try:
            for i, token in enumerate(sequence[:limit]):
                last = i == limit - 1
                if token == end_id and not self.returns_end_id:
                    done = True
                    yield response([]), True
                    return
                done = last or token == end_id
                yield response([token]), done
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
    spec = dataclasses.replace(smollm2_spec(), max_input_tokens=64)
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
    result = await client.generate("hi", max_tokens=40, stop=["東京"])
    assert result.text == "Héllo wörld! " and result.finish_reason == "stop"
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
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m for _, m in BAD])
async def test_bad_input(fake_generation, kwargs, message):
    _, client = fake_generation
    with pytest.raises(ragserve.InvalidArgumentError) as info:
        await client.generate(max_tokens=kwargs.pop("max_tokens", 8), **kwargs)
    assert message in info.value.message
    assert (await client.generate("still serving", max_tokens=2)).usage.completion_tokens == 2
