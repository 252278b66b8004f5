"""Generate in-process against a fake streaming backend: validation, detokenization, stops."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

import ragserve
from ragserve_server.app import create_gateway
from ragserve_server.catalog import GENERATION, Catalog, generation_model
from ragserve_server.detokenizer import IncrementalDetokenizer, StopMatcher
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


class FakeEngine:
    """Streams the tokens of TEXT one response at a time, like the decoupled engine model."""

    def __init__(self) -> None:
        self.tokens = tokenizer().encode(TEXT).ids
        self.closed_early = asyncio.Event()
        self.inputs = None

    async def stream(self, model, inputs, outputs, *, timeout):
        self.inputs = inputs
        limit = int(inputs["max_tokens"][0])
        sent = 0
        try:
            for token in self.tokens[:limit]:
                sent += 1
                yield {"token_id": np.array([token], dtype=np.int64)}, False
                await asyncio.sleep(0)
            reason = "length" if limit < len(self.tokens) else "stop"
            yield {"finish_reason": np.array([reason.encode()], dtype=object)}, True
        finally:
            if sent < min(limit, len(self.tokens)):
                self.closed_early.set()

    async def is_ready(self, models):
        return True

    async def close(self):
        pass


@pytest.fixture
async def fake_generation():
    engine = FakeEngine()
    model = generation_model(HF, context_length=64)
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
    assert unary.text == TEXT and unary.usage.completion_tokens == len(engine.tokens)
    assert unary.usage.prompt_tokens == len(tokenizer().encode("hi").ids)


async def test_stop_sequence_cancels_the_engine_request(fake_generation):
    engine, client = fake_generation
    result = await client.generate("hi", max_tokens=40, stop=["東京"])
    assert result.text == "Héllo wörld! " and result.finish_reason == "stop"
    await asyncio.wait_for(engine.closed_early.wait(), 2)


async def test_length_and_sampling_inputs(fake_generation):
    engine, client = fake_generation
    result = await client.generate("hi", max_tokens=3, temperature=0.5, top_p=0.9, top_k=5, repetition_penalty=1.1, seed=7)
    assert result.finish_reason == "length" and result.usage.completion_tokens == 3
    sent = {k: v.tolist() for k, v in engine.inputs.items() if k != "input_ids"}
    assert sent["top_k"] == [5] and sent["seed"] == [7] and sent["max_tokens"] == [3]
    np.testing.assert_allclose(sent["temperature"] + sent["top_p"] + sent["repetition_penalty"], [0.5, 0.9, 1.1], rtol=1e-6)


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
