"""Generate against the real Triton (SmolLM2 in the in-flight batching engine) and gateway."""

from __future__ import annotations

import asyncio
import re
import time
from contextlib import contextmanager
import urllib.request
from pathlib import Path

import pytest

import ragserve
from support import gateway_over, metric_value, start_triton

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


def generated_tokens(triton) -> float:
    """Tokens the engine has generated so far (its counter on Triton's metrics port)."""
    return metric_value(triton.metrics_url, "ragserve_engine_generated_tokens_total")


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
        other_alone = await client.generate(**{**kwargs, "seed": 99})
    assert together[0].text == first.text
    # Another seed: another text (16 tokens at temperature 0.9), itself reproducible alone.
    assert together[1].text != first.text
    assert other_alone.text == together[1].text
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
        assert wait_running(triton, 1, 60) == 1  # the engine reports after each step
        stream.close()  # leaves the loop: the SDK cancels the call
        cancelled_at = generated_tokens(triton)
        assert wait_running(triton, 0, 60) == 0
        # Freed by the cancel, not by running to its 1000 tokens.
        assert generated_tokens(triton) - cancelled_at < 200
        # Still serving (sampled: it may end at once with end of sequence, which is not counted).
        answer = client.generate(prompt="Still serving?", max_tokens=2)
        assert answer.finish_reason in ("length", "stop") and answer.usage.completion_tokens <= 2


def test_deadline_cancels_generation(generation):
    triton, gateway = generation
    assert wait_running(triton, 0, 60) == 0
    before = generated_tokens(triton)
    with ragserve.Client(gateway.address) as client:
        started = time.monotonic()
        with pytest.raises(ragserve.DeadlineExceededError):
            client.generate(prompt="Count from one to one thousand:", max_tokens=1000, temperature=0, timeout=1.0)
        # Far less than the minutes 1000 tokens take here: the call ended at its deadline.
        assert time.monotonic() - started < 20
    assert wait_running(triton, 0, 60) == 0
    assert generated_tokens(triton) - before < 300  # the engine stopped with the call, short of 1000


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
def smollm2_hf():
    """(model, tokenizer) of SmolLM2's folder in transformers, fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(HF, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(HF)


@pytest.fixture(scope="module")
def hf_logits(smollm2_hf):
    """transformers' greedy generate with each step's raw logits."""
    import torch

    model, tokenizer = smollm2_hf

    def run(messages, max_new_tokens):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad(), one_torch_thread():
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


def test_logprobs_with_a_stop_string_cover_exactly_the_tokens_generated(generation, hf_logits, smollm2_hf):
    """A stop string cuts the text, not the token accounting: one logprob per completion token
    up to the token that completed the stop string (transformers' greedy tokens and raw log
    probabilities), the text a prefix of those tokens' text ending just before the stop, and
    the stream's deltas carrying the same logprobs as the unary answer."""
    _, gateway = generation
    _, tokenizer = smollm2_hf
    tokens, logprobs = hf_logits(CHATS[0], MAX_TOKENS)
    full = tokenizer.decode(tokens, skip_special_tokens=True)
    assert "Paris" in full, full
    with ragserve.Client(gateway.address, timeout=120) as client:
        result = client.generate(messages=CHATS[0], max_tokens=MAX_TOKENS, temperature=0, stop=["Paris"], logprobs=True)
        events = list(client.stream(messages=CHATS[0], max_tokens=MAX_TOKENS, temperature=0, stop=["Paris"], logprobs=True))
    assert result.finish_reason == "stop_sequence" and result.text == full[: full.index("Paris")]
    got = [lp.token_id for lp in result.logprobs]
    assert len(got) == result.usage.completion_tokens < len(tokens)
    assert got == tokens[: len(got)]
    # The last token is the one whose text completed "Paris"; the one before had not.
    assert "Paris" in tokenizer.decode(got, skip_special_tokens=True)
    assert "Paris" not in tokenizer.decode(got[:-1], skip_special_tokens=True)
    for lp, want in zip(result.logprobs, logprobs):
        assert lp.logprob == pytest.approx(float(want[lp.token_id]), abs=1e-3)
    streamed = [lp for e in events[:-1] for lp in e.logprobs]
    assert streamed == list(events[-1].logprobs) == list(result.logprobs)


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


# ---------------------------------------------------------------- sampling transforms against a reference on the same logits
REPEAT = [{"role": "user", "content": "Say the word one, again and again: one one one one one one one one"}]


@contextmanager
def one_torch_thread():
    """torch on one thread for the references: on a loaded 2-core machine two threads are several
    times slower than one (they wait on each other), and these forwards are small."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def raw_logits(smollm2_hf, prompt: list[int], tokens: list[int]):
    """transformers' fp32 logits [len(tokens) + 1, vocab] of every step: the step before each
    of `tokens` (the engine's choices) and the one after."""
    import torch

    model, _ = smollm2_hf
    with torch.no_grad(), one_torch_thread():
        out = model(torch.tensor([prompt + tokens])).logits[0].float()
    return out[len(prompt) - 1 :]


def penalised_greedy(smollm2_hf, prompt: list[int], steps: int, repetition=1.0, presence=0.0, frequency=0.0) -> list[int]:
    """Greedy decoding with the penalties applied to transformers' logits, written from their
    definitions (repetition: transformers'/vLLM's over prompt and output; presence/frequency:
    OpenAI's over the output), independent of the engine's sampler."""
    import torch

    model, _ = smollm2_hf
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos)
    tokens: list[int] = []
    with torch.no_grad(), one_torch_thread():
        out = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(steps):
            row = out.logits[0, -1].float().clone()
            for token in set(prompt + tokens) if repetition != 1.0 else ():
                row[token] = row[token] * repetition if row[token] < 0 else row[token] / repetition
            for token in set(tokens):
                row[token] -= frequency * tokens.count(token) + presence
            token = int(row.argmax())
            if token in eos:
                break
            tokens.append(token)
            out = model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


def chat_prompt(smollm2_hf, messages) -> list[int]:
    _, tokenizer = smollm2_hf
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


@pytest.mark.parametrize(
    "penalties",
    [dict(repetition_penalty=1.5), dict(presence_penalty=1.5), dict(frequency_penalty=0.8), dict(frequency_penalty=0.5, presence_penalty=0.5)],
    ids=["repetition", "presence", "frequency", "both"],
)
def test_penalties_equal_a_reference_on_the_same_logits(generation, smollm2_hf, penalties):
    _, gateway = generation
    prompt = chat_prompt(smollm2_hf, REPEAT)
    steps = 16
    want = penalised_greedy(
        smollm2_hf, prompt, steps,
        repetition=penalties.get("repetition_penalty", 1.0),
        presence=penalties.get("presence_penalty", 0.0),
        frequency=penalties.get("frequency_penalty", 0.0),
    )
    plain = penalised_greedy(smollm2_hf, prompt, steps)
    assert want != plain, "the reference penalties change nothing on this prompt: pick another"
    with ragserve.Client(gateway.address, timeout=120) as client:
        got = client.generate(messages=REPEAT, max_tokens=steps, temperature=0, logprobs=True, **penalties)
    assert got.usage.prompt_tokens == len(prompt)
    assert [lp.token_id for lp in got.logprobs] == want


def test_min_p_keeps_only_tokens_above_its_share_and_logprobs_are_raw(generation, smollm2_hf):
    """min_p 0.1 at temperature 1.5: every sampled token has, at its step, at least a tenth of
    the likeliest token's probability (after the temperature), computed on transformers' logits
    of the same prefix; its logprob is the raw log_softmax, taken before the transforms."""
    import torch

    _, gateway = generation
    prompt = chat_prompt(smollm2_hf, CHATS[2])
    kept_more_than_one = 0
    with ragserve.Client(gateway.address, timeout=120) as client:
        results = [
            client.generate(messages=CHATS[2], max_tokens=24, temperature=1.5, top_k=0, top_p=1.0, min_p=0.1, seed=seed, logprobs=True)
            for seed in (1, 2, 3)
        ]
    for result in results:
        tokens = [lp.token_id for lp in result.logprobs]
        logits = raw_logits(smollm2_hf, prompt, tokens)
        for step, lp in enumerate(result.logprobs):
            probs = torch.softmax(logits[step] / 1.5, -1)
            share = float(probs[lp.token_id] / probs.max())
            assert share >= 0.1 - 1e-3, f"step {step}: token {lp.token_id} has {share:.4f} of the likeliest's probability"
            kept_more_than_one += int((probs >= 0.1 * probs.max()).sum() > 1)
            assert lp.logprob == pytest.approx(float(torch.log_softmax(logits[step], -1)[lp.token_id]), abs=2e-3)
    assert kept_more_than_one > 5, "min_p left one token at nearly every step: the test shows nothing"


def test_top_logprobs_without_logprobs_is_refused(generation):
    """Over the wire (the SDK turns logprobs on by itself when top_logprobs is given)."""
    import grpc

    from ragserve.v1 import generate_pb2, generate_pb2_grpc

    _, gateway = generation
    with grpc.insecure_channel(gateway.address) as channel:
        stub = generate_pb2_grpc.GenerateStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(generate_pb2.GenerateRequest(prompt="hi", max_tokens=2, top_logprobs=3), timeout=60)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "needs logprobs" in refused.value.details()
        answer = stub.Generate(generate_pb2.GenerateRequest(prompt="hi", max_tokens=2, top_logprobs=3, logprobs=True), timeout=60)
        assert all(len(lp.top_logprobs) == 3 for lp in answer.logprobs)
