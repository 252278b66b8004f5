"""Generate against the real Triton (SmolLM2 in the in-flight batching engine) and gateway."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from pathlib import Path

import pytest

import ragserve
from support import gateway_over, start_triton

pytestmark = pytest.mark.integration

HF = Path(__file__).resolve().parents[1] / "model_repository" / "smollm2" / "1" / "hf"
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Name three primary colours."}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
]
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def generation(tmp_path_factory):
    work = tmp_path_factory.mktemp("generation")
    triton = start_triton(work, ["smollm2"])
    with gateway_over(triton, ["smollm2"], work) as gateway:
        yield triton, gateway


def running_sequences(triton) -> float:
    with urllib.request.urlopen(triton.metrics_url, timeout=5) as reply:
        text = reply.read().decode()
    match = re.search(r'^ragserve_engine_running_sequences\{[^}]*\} (\S+)$', text, re.MULTILINE)
    assert match, "engine metric missing from Triton's metrics port"
    return float(match.group(1))


def wait_running(triton, value: float, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running_sequences(triton) == value:
            return value
        time.sleep(0.05)
    return running_sequences(triton)


async def test_greedy_equals_transformers_alone_and_batched(generation, reference):
    _, gateway = generation
    expected = [reference(m) for m in CHATS]
    async with ragserve.AsyncClient(gateway.address, timeout=120) as client:
        alone = [await client.generate(messages=m, max_tokens=MAX_TOKENS, temperature=0) for m in CHATS]
        # The same prompts again, all at once and among longer sampled sequences.
        noise = [client.generate(prompt=f"Tell me a story about number {i}.", max_tokens=40, temperature=0.8, seed=i) for i in range(3)]
        batched = await asyncio.gather(*(client.generate(messages=m, max_tokens=MAX_TOKENS, temperature=0) for m in CHATS), *noise)
    for (text, n_tokens), one, many in zip(expected, alone, batched):
        assert one.text == text and one.usage.completion_tokens == n_tokens
        assert many.text == text
    assert "Paris" in alone[0].text


async def test_seeded_sampling_is_reproducible(generation):
    _, gateway = generation
    kwargs = dict(prompt="Once upon a time", max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    async with ragserve.AsyncClient(gateway.address, timeout=120) as client:
        first = await client.generate(**kwargs)
        together = await asyncio.gather(client.generate(**kwargs), client.generate(**{**kwargs, "seed": 99}))
    assert together[0].text == first.text
    assert first.usage.completion_tokens == 16 and first.finish_reason == "length"


def test_stream_deltas_concatenate_to_unary_text(generation):
    _, gateway = generation
    with ragserve.Client(gateway.address, timeout=120) as client:
        unary = client.generate(messages=CHATS[1], max_tokens=MAX_TOKENS, temperature=0)
        events = list(client.stream(messages=CHATS[1], max_tokens=MAX_TOKENS, temperature=0))
    assert isinstance(events[-1], ragserve.GenerateResult)
    assert all(isinstance(e, ragserve.TextDelta) for e in events[:-1]) and len(events) > 3
    assert "".join(e.text for e in events[:-1]) == events[-1].text == unary.text


def test_stop_sequence_and_max_tokens(generation, reference):
    _, gateway = generation
    text, _ = reference(CHATS[0])
    cut = text.index("Paris")
    with ragserve.Client(gateway.address, timeout=120) as client:
        stopped = client.generate(messages=CHATS[0], max_tokens=MAX_TOKENS, temperature=0, stop=["Paris", "zzz"])
        short = client.generate(messages=CHATS[0], max_tokens=3, temperature=0)
    assert stopped.text == text[:cut] and stopped.finish_reason == "stop_sequence" and stopped.stop_sequence == "Paris"
    assert short.finish_reason == "length" and short.usage.completion_tokens == 3


def test_chat_template_matches_rendered_prompt(generation):
    from transformers import AutoTokenizer

    _, gateway = generation
    rendered = AutoTokenizer.from_pretrained(HF).apply_chat_template(CHATS[0], add_generation_prompt=True, tokenize=False)
    with ragserve.Client(gateway.address, timeout=120) as client:
        chat = client.generate(messages=CHATS[0], max_tokens=8, temperature=0)
        raw = client.generate(prompt=rendered, max_tokens=8, temperature=0)
    assert chat.text == raw.text and chat.usage.prompt_tokens == raw.usage.prompt_tokens


def test_cancelled_stream_frees_its_slot(generation):
    triton, gateway = generation
    assert wait_running(triton, 0, 10) == 0
    with ragserve.Client(gateway.address, timeout=120) as client:
        stream = client.stream(prompt="Count from one to one thousand:", max_tokens=1000, temperature=0)
        next(stream)
        assert wait_running(triton, 1, 5.0) == 1  # the engine reports after each step
        stream.close()  # leaves the loop: the SDK cancels the call
        started = time.monotonic()
        assert wait_running(triton, 0, 1.0) == 0
        assert time.monotonic() - started < 1.0
        # Still serving (sampled: it may end at once with end of sequence, which is not counted).
        answer = client.generate(prompt="Still serving?", max_tokens=2)
        assert answer.finish_reason in ("length", "stop") and answer.usage.completion_tokens <= 2


def test_deadline_cancels_generation(generation):
    triton, gateway = generation
    with ragserve.Client(gateway.address) as client:
        started = time.monotonic()
        with pytest.raises(ragserve.DeadlineExceededError):
            client.generate(prompt="Count from one to one thousand:", max_tokens=1000, temperature=0, timeout=1.0)
        assert time.monotonic() - started < 3
    assert wait_running(triton, 0, 2.0) == 0


def test_bad_input_against_the_real_engine(generation):
    _, gateway = generation
    with ragserve.Client(gateway.address, timeout=60) as client:
        with pytest.raises(ragserve.InvalidArgumentError, match="exceeds the context of 2048"):
            client.generate(prompt="word " * 2100, max_tokens=10)
        with pytest.raises(ragserve.InvalidArgumentError, match="max_tokens must be between 1 and 2047"):
            client.generate(prompt="hi", max_tokens=4096)
        assert client.generate(prompt="hi", max_tokens=2).usage.completion_tokens == 2
        models = {m.name: m for m in client.list_models()}
        assert models["smollm2-135m-instruct"].kind == "generation"
        assert models["smollm2-135m-instruct"].max_input_tokens == 2048


async def test_triton_serves_the_tensorrt_llm_contract(generation):
    """The running model's config is the contract, and a non-streaming request (TensorRT-LLM's
    `streaming` false) gets one final response with every token, the end id left out."""
    import tritonclient.grpc as triton_grpc

    from ragserve_server.models import generation_contract as contract
    from ragserve_server.models import model_config
    from ragserve_server.backend.triton import TritonBackend

    triton, _ = generation
    config = triton_grpc.InferenceServerClient(triton.grpc_url).get_model_config("smollm2").config
    assert model_config.mismatches("smollm2", contract.MAX_BATCH_SIZE, contract.INPUTS, contract.OUTPUTS, config) == []

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(HF)
    prompt = list(tokenizer.apply_chat_template(CHATS[0], add_generation_prompt=True)["input_ids"])
    inputs = contract.request_tensors(prompt, contract.Sampling(max_tokens=MAX_TOKENS, temperature=0), end_id=tokenizer.eos_token_id)
    backend = TritonBackend(triton.grpc_url)
    try:
        streamed = [(contract.response_tokens(out), final) async for out, final in backend.stream("smollm2", inputs, contract.OUTPUT_NAMES, timeout=60)]
        inputs["streaming"][:] = False
        whole = [(contract.response_tokens(out), final) async for out, final in backend.stream("smollm2", inputs, contract.OUTPUT_NAMES, timeout=60)]
    finally:
        await backend.close()
    tokens = [t for chunk, _ in streamed for t in chunk]
    assert [final for _, final in streamed] == [False] * (len(streamed) - 1) + [True]
    assert streamed[-1][0] == [] and len(tokens) < MAX_TOKENS  # ended by the end id, which is not returned
    assert tokenizer.eos_token_id not in tokens
    assert whole == [(tokens, True)]


# ---------------------------------------------------------------- logprobs, stop token ids, penalties, min-p, finish reasons
@pytest.fixture(scope="module")
def hf_logits():
    """transformers' greedy generate with each step's raw logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(HF)
    model = AutoModelForCausalLM.from_pretrained(HF, dtype=torch.float32).eval()

    def run(messages, max_new_tokens):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True)
        new = out.sequences[0, ids["input_ids"].shape[1] :].tolist()
        return new, [torch.log_softmax(step[0].float(), -1) for step in out.logits]

    return run


def test_greedy_logprobs_and_top_logprobs_equal_transformers(generation, hf_logits):
    _, gateway = generation
    tokens, logprobs = hf_logits(CHATS[0], 8)
    with ragserve.Client(gateway.address, timeout=120) as client:
        result = client.generate(messages=CHATS[0], max_tokens=8, temperature=0, logprobs=True, top_logprobs=5)
        events = list(client.stream(messages=CHATS[0], max_tokens=8, temperature=0, logprobs=True, top_logprobs=5))
    assert len(result.logprobs) == result.usage.completion_tokens
    assert [lp.token_id for lp in result.logprobs] == tokens[: len(result.logprobs)]
    for got, want in zip(result.logprobs, logprobs):
        assert got.logprob == pytest.approx(float(want[got.token_id]), abs=1e-3)
        assert [t.token_id for t in got.top_logprobs] == want.topk(5).indices.tolist()
        assert got.top_logprobs[0].token_id == got.token_id
    streamed = [lp for e in events[:-1] for lp in e.logprobs]
    assert streamed == list(events[-1].logprobs) == list(result.logprobs)
    assert events[-1].text == result.text and result.request_id and events[-1].request_id


def test_stop_token_ids_and_finish_reasons_against_the_engine(generation, reference, hf_logits):
    from transformers import AutoTokenizer

    _, gateway = generation
    tokenizer = AutoTokenizer.from_pretrained(HF)
    text, _ = reference(CHATS[0])
    ids, _ = hf_logits(CHATS[0], MAX_TOKENS)
    stop_id, at = ids[2], ids.index(ids[2])
    with ragserve.Client(gateway.address, timeout=120) as client:
        stopped = client.generate(messages=CHATS[0], max_tokens=MAX_TOKENS, temperature=0, stop_token_ids=[stop_id])
        assert stopped.finish_reason == "stop_sequence" and stopped.stop_token_id == stop_id
        assert stopped.usage.completion_tokens == at and stopped.text == tokenizer.decode(ids[:at], skip_special_tokens=True)
        word = text.split()[1]
        by_string = client.generate(messages=CHATS[0], max_tokens=MAX_TOKENS, temperature=0, stop=[word])
        assert by_string.finish_reason == "stop_sequence" and by_string.stop_sequence == word
        assert client.generate(messages=CHATS[0], max_tokens=2, temperature=0).finish_reason == "length"
        assert client.generate(messages=CHATS[0], max_tokens=200, temperature=0).finish_reason == "stop"
        # min_p 1 keeps only the likeliest token: sampling at any temperature gives the greedy text.
        sampled = client.generate(messages=CHATS[0], max_tokens=8, temperature=1.7, min_p=1.0, seed=3)
        greedy = client.generate(messages=CHATS[0], max_tokens=8, temperature=0)
        assert sampled.text == greedy.text
        penalised = client.generate(prompt="one one one one one one", max_tokens=12, temperature=0, frequency_penalty=2.0, presence_penalty=2.0)
        plain = client.generate(prompt="one one one one one one", max_tokens=12, temperature=0)
        assert penalised.text != plain.text


def test_max_tokens_defaults_to_the_room_left(generation):
    """A long prompt without max_tokens is served (the old default of 256 was refused here)."""
    _, gateway = generation
    with ragserve.Client(gateway.address, timeout=300) as client:
        prompt = "word " * 2000
        result = client.stream(prompt=prompt, temperature=0)
        first = next(result)
        result.close()
        assert first is not None
        with pytest.raises(ragserve.InvalidArgumentError, match="leaves no room in the context of 2048"):
            client.generate(prompt="word " * 2100)
