"""In-process tests of the SmolLM2 in-flight batching engine (no Triton).

The engine is imported from model_repository/smollm2/1/ (engine.py, llama.py, sampler.py),
with the deployment's settings (generation_contract.ENGINE_PARAMETERS). Needs the HF folder
built by scripts/convert_smollm2.py; skipped otherwise.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from pathlib import Path

import pytest

from support import import_or_unavailable, unavailable  # noqa: E402 (tests/ is on sys.path)

torch = import_or_unavailable("torch", allow_module_level=True)
transformers = import_or_unavailable("transformers", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
VERSION_DIR = ROOT / "model_repository" / "smollm2" / "1"
HF_DIR = VERSION_DIR / "hf"
TIMEOUT = 120

if not (HF_DIR / "model.safetensors").is_file():
    unavailable(f"{HF_DIR} not built: run .venv/bin/python scripts/convert_smollm2.py "
                f"--out model_repository/smollm2/1/hf", allow_module_level=True)


sys.path.insert(0, str(VERSION_DIR))
import engine as eng  # noqa: E402

from ragserve_server.models.generation_contract import ENGINE_PARAMETERS  # noqa: E402

DEPLOYED = eng.EngineConfig.from_parameters(
    {k: v for k, v in ENGINE_PARAMETERS.items() if k != "hf_dir"} | {"device": "cpu"})


def config(**changes) -> "eng.EngineConfig":
    return dataclasses.replace(DEPLOYED, **changes)

QUESTIONS = ["What is the capital of France?",
             "Write a haiku about the sea.",
             "List three prime numbers."]
OTHERS = ["Explain gravity to a child.",
          "Give me a recipe for pancakes.",
          "Why is the sky blue? Answer in detail."]


class Collector:
    """Callbacks of one sequence; the engine calls them on its own thread."""

    def __init__(self, cancel_after: int | None = None):
        self.tokens: list[int] = []
        self.reason: str | None = None
        self.abort: tuple[str, str] | None = None
        self.done = threading.Event()
        self.cancel_after = cancel_after
        self.seq = None
        self.logprobs = []

    def on_token(self, token, reason):
        self.tokens.append(token)
        if self.seq.params.logprobs:
            self.logprobs.append(self.seq.sampling.last)
        if self.cancel_after is not None and len(self.tokens) == self.cancel_after:
            self.seq.cancel()
        if reason is not None:
            self.reason = reason
            self.done.set()

    def on_abort(self, kind, message):
        self.abort = (kind, message)
        self.done.set()

    def wait(self):
        assert self.done.wait(TIMEOUT), "sequence did not finish"
        return self


def submit(engine, prompt, max_tokens, cancel_after=None, ignore_eos=False, end_id=None, stop_words=(), **params):
    c = Collector(cancel_after)
    c.seq = eng.Sequence(list(prompt), max_tokens, eng.SamplingParams(**params), c.on_token,
                         c.on_abort, ignore_eos=ignore_eos, end_id=end_id, stop_words=stop_words)
    engine.submit(c.seq)
    return c


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(HF_DIR)


def chat(tokenizer, question):
    return list(tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                              add_generation_prompt=True)["input_ids"])


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [chat(tokenizer, q) for q in QUESTIONS]


@pytest.fixture(scope="module")
def reference(prompts):
    """transformers' own greedy generate, one prompt at a time."""
    model = transformers.AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32)
    model.eval()
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                                 do_sample=False)
            out.append(gen[0, len(p):].tolist())
    del model
    return out


@pytest.fixture(scope="module")
def engine():
    e = eng.Engine(HF_DIR, config(max_running_sequences=8, max_waiting=8)).start()
    yield e
    e.stop()


def test_eos_is_im_end(engine, tokenizer):
    assert engine.eos == {tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_greedy_alone_matches_transformers(engine, prompts, reference):
    for prompt, ref in zip(prompts, reference):
        c = submit(engine, prompt, 20, temperature=0.0).wait()
        assert c.tokens == ref
        assert c.reason == ("stop" if ref[-1] in engine.eos else "length")


def test_greedy_batched_matches_transformers(engine, tokenizer, prompts, reference):
    # Three other sequences of different lengths run alongside (one sampled, one with a
    # repetition penalty, one greedy running longer): batching must not change results.
    others = [chat(tokenizer, q) for q in OTHERS]
    side = [submit(engine, others[0], 40, temperature=0.9, top_p=0.9, seed=1),
            submit(engine, others[1], 30, temperature=0.0, repetition_penalty=1.3),
            submit(engine, others[2], 35, temperature=0.0)]
    mine = [submit(engine, p, 20, temperature=0.0) for p in prompts]
    for c, ref in zip(mine, reference):
        assert c.wait().tokens == ref
    for c in side:
        assert c.wait().reason in ("stop", "length")


def test_seeded_sampling_reproducible_alone_and_batched(engine, tokenizer, prompts):
    params = dict(temperature=0.9, top_p=0.95, top_k=50, repetition_penalty=1.1, seed=1234)
    first = submit(engine, prompts[1], 16, **params).wait().tokens
    again = submit(engine, prompts[1], 16, **params).wait().tokens
    assert first == again
    noise = [submit(engine, chat(tokenizer, q), 24, temperature=1.0, top_p=1.0, seed=i)
             for i, q in enumerate(OTHERS)]
    batched = submit(engine, prompts[1], 16, **params).wait().tokens
    for c in noise:
        c.wait()
    assert batched == first


def test_length_finish_reason(engine, prompts):
    c = submit(engine, prompts[1], 5, temperature=0.0, ignore_eos=True).wait()
    assert len(c.tokens) == 5 and c.reason == "length"


def test_cancel_mid_way_frees_slot(engine, tokenizer, prompts):
    keeper = submit(engine, prompts[0], 20, temperature=0.0)
    c = submit(engine, chat(tokenizer, "Write a long essay about the ocean."), 400,
               cancel_after=3, temperature=0.0, ignore_eos=True).wait()
    assert c.abort is not None and c.abort[0] == "cancelled"
    assert c.abort[1].startswith("CANCELLED:")
    assert 3 <= len(c.tokens) <= 4  # dropped within one decode step
    assert c.seq not in engine.running and c.seq.slot == -1
    keeper.wait()
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.kv_tokens_reserved) == (0, 0, 0)


def test_invalid_requests_rejected_without_disturbing_others(engine, prompts, reference):
    running = submit(engine, prompts[0], 20, temperature=0.0)
    bad = [(prompts[0], 2048), ([], 5), (prompts[0], 0), ([10**6], 5)]
    for prompt, max_tokens in bad:
        with pytest.raises(eng.RequestError) as info:
            submit(engine, prompt, max_tokens, temperature=0.0)
        assert str(info.value).startswith("INVALID_ARGUMENT:")
    with pytest.raises(eng.RequestError, match="^INVALID_ARGUMENT:"):
        submit(engine, prompts[0], 5, temperature=-1.0)
    assert running.wait().tokens == reference[0]


def test_waiting_queue_and_full_queue_rejection(prompts):
    seen = []
    e = eng.Engine(HF_DIR, config(max_running_sequences=1, max_waiting=2),
                   on_stats=lambda s: seen.append((s.running, s.waiting)))
    try:
        # Not started yet: everything queues. One request may start at once (a free
        # slot), plus max_waiting queued; the next is refused.
        cs = [submit(e, prompts[2], 6, temperature=0.0, ignore_eos=True) for _ in range(3)]
        with pytest.raises(eng.RequestError, match="^RESOURCE_EXHAUSTED:"):
            submit(e, prompts[2], 6, temperature=0.0)
        e.start()
        for c in cs:
            assert c.wait().reason == "length" and len(c.tokens) == 6
        assert max(r for r, _ in seen) == 1  # max_running respected
        assert (1, 2) in seen  # two waited while one ran
    finally:
        e.stop()


def test_kv_budget_makes_requests_wait(prompts):
    need = len(prompts[0]) + 8
    seen = []
    e = eng.Engine(HF_DIR, config(max_running_sequences=4, max_kv_tokens=need + need // 2),
                   on_stats=lambda s: seen.append((s.running, s.waiting, s.kv_tokens_reserved))).start()
    try:
        cs = [submit(e, prompts[0], 8, temperature=0.0, ignore_eos=True) for _ in range(2)]
        outs = [c.wait().tokens for c in cs]
        assert outs[0] == outs[1]
        assert max(r for r, _, _ in seen) == 1  # the second waited for KV room
        assert max(kv for _, _, kv in seen) == need
        with pytest.raises(eng.RequestError, match="^INVALID_ARGUMENT:.*max_kv_tokens"):
            submit(e, prompts[0], need, temperature=0.0)
    finally:
        e.stop()


# ---------------------------------------------------------------- the TensorRT-LLM contract's semantics
def test_greedy_forms_of_the_contract(engine, prompts, reference):
    # TensorRT-LLM is greedy with runtime_top_k = 1 (what the gateway sends for temperature 0),
    # and when top-k and top-p are both off (absent tensors).
    assert submit(engine, prompts[0], 20, top_k=1, top_p=1.0, temperature=1.0).wait().tokens == reference[0]
    assert submit(engine, prompts[0], 20).wait().tokens == reference[0]


def test_end_id_ends_the_sequence(engine, prompts, reference):
    ref = reference[0]
    end = ref[3]
    c = submit(engine, prompts[0], 20, end_id=end, temperature=0.0).wait()
    assert c.tokens == ref[: ref.index(end) + 1] and c.reason == "stop"
    # An end id that never comes: the checkpoint's EOS does not end it either.
    c = submit(engine, prompts[0], 20, end_id=-1, temperature=0.0).wait()
    assert c.tokens[: len(ref)] == ref[: len(c.tokens)] and len(c.tokens) == 20 and c.reason == "length"


@pytest.mark.parametrize("params", [
    dict(temperature=-0.5), dict(top_k=-1), dict(top_p=1.5), dict(repetition_penalty=0.0),
    dict(temperature=float("nan")), dict(seed=-1), dict(seed=2**64),
])
def test_sampling_range_checks(params):
    with pytest.raises(eng.RequestError, match="^INVALID_ARGUMENT:"):
        eng.SamplingParams(**params).validate()


# ---------------------------------------------------------------- settings and device
def test_engine_config_requires_every_parameter_and_refuses_unknown_ones():
    params = {k: v for k, v in ENGINE_PARAMETERS.items() if k != "hf_dir"} | {"device": "cpu"}
    with pytest.raises(ValueError, match="missing max_waiting"):
        eng.EngineConfig.from_parameters({k: v for k, v in params.items() if k != "max_waiting"})
    with pytest.raises(ValueError, match="unknown max_runing"):
        eng.EngineConfig.from_parameters(params | {"max_runing": "3"})
    with pytest.raises(ValueError, match="max_kv_tokens must be an integer"):
        eng.EngineConfig.from_parameters(params | {"max_kv_tokens": "lots"})
    with pytest.raises(ValueError, match="device must be one of cpu, cuda"):
        eng.EngineConfig.from_parameters(params | {"device": "tpu"})
    assert eng.EngineConfig.from_parameters(params | {"context_length": ""}).context_length == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure on a machine without CUDA")
def test_cuda_without_cuda_fails_at_load_with_a_clear_message():
    with pytest.raises(RuntimeError, match="device is 'cuda' but PyTorch sees no CUDA device"):
        eng.Engine(HF_DIR, config(device="cuda"))


def test_every_tensor_is_created_on_the_engine_device():
    """No torch factory call in the model folder without `device=` (CUDA runs stay on the GPU)."""
    import ast

    factories = {"tensor", "zeros", "ones", "empty", "full", "arange", "randn", "rand", "zeros_like", "Generator"}
    missing = []
    for name in ("engine.py", "llama.py", "sampler.py"):
        tree = ast.parse((VERSION_DIR / name).read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in factories
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and not any(k.arg == "device" for k in node.keywords)):
                missing.append(f"{name}:{node.lineno} torch.{node.func.attr}")
    assert not missing, missing


def test_fp16_forward_agrees_with_fp32(prompts):
    """The dtype path CUDA runs (fp16 weights and cache, fp32 norms and logits), exercised here
    on the CPU: greedy tokens equal fp32's over a short run."""
    import llama

    tokens = {}
    for dtype in (torch.float32, torch.float16):
        model = llama.Llama(HF_DIR, context_length=256, device=torch.device("cpu"), dtype=dtype)
        k, v = model.new_cache(1, 128)
        assert k.dtype == dtype
        with torch.inference_mode():
            out = [int(model.prefill(prompts[0], k, v, 0).argmax())]
            for i in range(5):
                logits = model.decode(torch.tensor([out[-1]]), torch.tensor([len(prompts[0]) + i]), k, v)
                assert logits.dtype == torch.float32
                out.append(int(logits.argmax()))
        tokens[dtype] = out
    assert tokens[torch.float16] == tokens[torch.float32]


# ---------------------------------------------------------------- logprobs, stop words, penalties, min-p
@pytest.fixture(scope="module")
def hf_model():
    model = transformers.AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32)
    return model.eval()


def test_greedy_logprobs_match_transformers(engine, prompts, reference, hf_model):
    """The chosen token's log prob and the top 5 are log_softmax of the raw logits, as in
    transformers' generate(output_logits=True)."""
    prompt = prompts[0]
    c = submit(engine, prompt, 12, temperature=0.0, logprobs=True, top_logprobs=5).wait()
    assert c.tokens == reference[0][:12]
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(c.tokens), do_sample=False,
                                output_logits=True, return_dict_in_generate=True)
    for step, (token, got) in enumerate(zip(c.tokens, c.logprobs)):
        want = torch.log_softmax(out.logits[step][0].float(), -1)
        assert got.logprob == pytest.approx(float(want[token]), abs=1e-4)
        top = torch.topk(want, 5)
        assert list(got.top_ids) == top.indices.tolist()
        assert list(got.top_logprobs) == pytest.approx(top.values.tolist(), abs=1e-4)
        assert got.top_ids[0] == token  # greedy picks the likeliest


def test_a_stop_word_ends_the_sequence_and_is_returned(engine, prompts, reference):
    ref = reference[1]
    word = ref[3]
    first = ref.index(word)
    c = submit(engine, prompts[1], 20, temperature=0.0, stop_words=((word,), (49151, 49150))).wait()
    assert c.reason == eng.FINISH_STOP_WORD and c.tokens == ref[: first + 1]
    two = (ref[4], ref[5])
    c = submit(engine, prompts[1], 20, temperature=0.0, stop_words=(two,)).wait()
    assert c.reason == eng.FINISH_STOP_WORD and c.tokens == ref[:6]


def test_presence_and_frequency_penalties_follow_openai(engine, prompts, hf_model):
    """Greedy with penalties equals a step-by-step greedy over transformers' logits with
    logit - frequency * count - presence * (count > 0) over the generated tokens."""
    prompt, presence, frequency = prompts[2], 0.8, 0.6
    c = submit(engine, prompt, 10, temperature=0.0, presence_penalty=presence, frequency_penalty=frequency).wait()
    generated: list[int] = []
    with torch.inference_mode():
        for _ in range(len(c.tokens)):
            logits = hf_model(torch.tensor([prompt + generated])).logits[0, -1].float()
            counts = torch.zeros_like(logits)
            for t in generated:
                counts[t] += 1
            logits = logits - frequency * counts - presence * (counts > 0).float()
            generated.append(int(logits.argmax()))
    assert c.tokens == generated


def test_min_p_one_keeps_only_the_likeliest_token(engine, prompts, reference):
    for seed in (1, 2):
        c = submit(engine, prompts[0], 12, temperature=1.5, min_p=1.0, seed=seed).wait()
        assert c.tokens == reference[0][:12]


def test_new_sampling_range_checks():
    for params, message in [(dict(min_p=1.5), "min_p"), (dict(top_logprobs=21), "num_top_logprobs"),
                            (dict(presence_penalty=float("nan")), "presence_penalty")]:
        with pytest.raises(eng.RequestError, match=message):
            eng.SamplingParams(**params).validate()


# ---------------------------------------------------------------- chunked prefill
CHUNK = 64  # small, so that the long prompt below is prefilled in ~10 chunks


@pytest.fixture(scope="module")
def long_prompt(tokenizer):
    """A chat prompt of ~600 tokens, far over CHUNK."""
    notes = " ".join(f"Note {i}: the {w} in room {i * 7 % 23} was checked on day {i % 9} and found fine."
                     for i, w in enumerate(["pump", "valve", "fan", "lamp", "door", "boiler"] * 4 + ["lamp"]))
    ids = chat(tokenizer, notes + " Which room was the last lamp in? Answer in one sentence.")
    assert 500 < len(ids) < 700, len(ids)
    return ids


def greedy_reference(hf_model, prompt, max_tokens):
    with torch.inference_mode():
        ids = torch.tensor([prompt])
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def record_prefills(engine, then=None):
    """Wraps the engine's model.prefill and model.step (the mixed pass): a list of (step,
    sequence, start, tokens, mixed) per prompt chunk run; ``then(calls)`` after each record,
    before the chunk runs."""
    calls = []
    prefill, step = engine.model.prefill, engine.model.step

    def record(start, n, mixed):
        calls.append((engine.steps, engine.prefilling, start, n, mixed))
        if then is not None:
            then(calls)

    def recorded_prefill(tokens, k, v, slot, start=0):
        record(start, len(tokens), False)
        return prefill(tokens, k, v, slot, start)

    def recorded_step(decode_tokens, positions, chunk_tokens, slot, start, k, v, **kw):
        record(start, len(chunk_tokens), True)
        return step(decode_tokens, positions, chunk_tokens, slot, start, k, v, **kw)

    engine.model.prefill, engine.model.step = recorded_prefill, recorded_step
    return calls


class StepCollector(Collector):
    """Also records the engine step each token came from (callbacks run inside the step)."""

    def __init__(self, engine, **kw):
        super().__init__(**kw)
        self.engine, self.steps = engine, []

    def on_token(self, token, reason):
        self.steps.append(self.engine.steps)
        super().on_token(token, reason)


def submit_recorded(engine, prompt, max_tokens, **params):
    c = StepCollector(engine)
    c.seq = eng.Sequence(list(prompt), max_tokens, eng.SamplingParams(**params), c.on_token, c.on_abort)
    engine.submit(c.seq)
    return c


def test_chunked_prefill_config():
    assert DEPLOYED.chunked_prefill == 1  # the deployment chunks
    with pytest.raises(ValueError, match="chunked_prefill must be 0 or 1"):
        config(chunked_prefill=2)


def test_long_prompt_in_chunks_matches_transformers_and_unchunked(long_prompt, hf_model):
    ref = greedy_reference(hf_model, long_prompt, 8)
    out = {}
    for chunked in (1, 0):
        e = eng.Engine(HF_DIR, config(max_running_sequences=2, prefill_tokens_per_step=CHUNK, chunked_prefill=chunked))
        calls = record_prefills(e)
        e.start()
        try:
            out[chunked] = submit(e, long_prompt, 8, temperature=0.0).wait().tokens
        finally:
            e.stop()
        if chunked:  # one chunk per step, in order, CHUNK tokens each but the last
            assert [(start, n) for _, _, start, n, _ in calls] == [
                (s, min(CHUNK, len(long_prompt) - s)) for s in range(0, len(long_prompt), CHUNK)]
            steps = [step for step, _, _, _, _ in calls]
            assert steps == list(range(steps[0], steps[0] + len(steps)))
            assert e.mixed_steps == 0  # nothing else ran: no mixed pass
        else:
            assert [(start, n) for _, _, start, n, _ in calls] == [(0, len(long_prompt))]
    assert out[1] == ref
    assert out[0] == ref


@pytest.mark.parametrize("whole_up_to", [64, 0])
def test_a_short_prompt_is_prefilled_whole_up_to_prefill_whole_tokens(tokenizer, hf_model, whole_up_to):
    """Chunks of 16 tokens: a ~40-token chat prompt arriving while another sequence decodes is
    prefilled in one (mixed) step when it is within prefill_whole_tokens, else in chunks.
    Either way both results equal transformers'."""
    running, short = chat(tokenizer, OTHERS[0]), chat(tokenizer, QUESTIONS[0])
    assert 16 < len(short) <= 64
    e = eng.Engine(HF_DIR, config(max_running_sequences=4, prefill_tokens_per_step=16, prefill_whole_tokens=whole_up_to))
    calls = record_prefills(e)
    e.start()
    try:
        first = submit_recorded(e, running, 24, temperature=0.0)
        while not first.steps:  # decoding before the short prompt arrives
            time.sleep(0.01)
        second = submit_recorded(e, short, 8, temperature=0.0)
        assert second.wait().tokens == greedy_reference(hf_model, short, 8)
        assert first.wait().tokens == greedy_reference(hf_model, running, 24)
    finally:
        e.stop()
    chunks = [(start, n, mixed) for _, seq, start, n, mixed in calls if seq is second.seq]
    if whole_up_to:
        assert chunks == [(0, len(short), True)]  # one step, beside the running decode
    else:
        assert [(start, n) for start, n, _ in chunks] == [(s, min(16, len(short) - s)) for s in range(0, len(short), 16)]


def test_running_sequences_decode_between_the_chunks_of_a_long_prompt(tokenizer, long_prompt, hf_model):
    """Three sequences run while a long prompt is prefilled in chunks: they get a token at every
    step of its prefill, each chunk and their decode in one mixed pass; one of them finishes
    meanwhile, so the long one's K/V moves down a slot when it joins the batch. Every result
    equals transformers'."""
    shorts = [chat(tokenizer, q) for q in OTHERS]
    short_ref = [greedy_reference(hf_model, p, 30) for p in shorts]
    long_ref = greedy_reference(hf_model, long_prompt, 8)
    e = eng.Engine(HF_DIR, config(max_running_sequences=8, prefill_tokens_per_step=CHUNK))
    calls = record_prefills(e)
    seen = []
    e.on_stats = lambda s: seen.append(s)
    # Everything queued before the engine starts: the schedule does not depend on timing.
    cs = [submit_recorded(e, p, n, temperature=0.0) for p, n in zip(shorts, (30, 30, 4))]
    lc = submit_recorded(e, long_prompt, 8, temperature=0.0)
    e.start()
    try:
        for c, ref, n in zip(cs, short_ref, (30, 30, 4)):
            assert c.wait().tokens == ref[:n]
        assert lc.wait().tokens == long_ref
    finally:
        e.stop()
    chunk_steps = [step for step, seq, _, _, _ in calls if seq is lc.seq]
    assert len(chunk_steps) >= len(long_prompt) // CHUNK  # in chunks, one per step
    # Each chunk ran with the batch's decode in one forward pass (the others ran throughout).
    assert all(mixed for _, seq, _, _, mixed in calls if seq is lc.seq)
    assert e.mixed_steps >= len(chunk_steps)
    assert chunk_steps == list(range(chunk_steps[0], chunk_steps[-1] + 1))
    assert lc.steps[0] == chunk_steps[-1]  # its first token comes from its last chunk
    for c in cs[:2]:  # still running after the long prompt: a token at every step of its prefill
        assert c.steps[-1] > chunk_steps[-1]
        assert set(range(chunk_steps[0], chunk_steps[-1] + 1)) <= set(c.steps)
    assert chunk_steps[0] < cs[2].steps[-1] < chunk_steps[-1]  # left while the long one prefilled
    assert any(s.prefilling == 1 and s.running == 3 for s in seen)
    assert max(s.running + s.prefilling for s in seen) == 4


def test_cancel_mid_prefill_frees_slot_and_reservation(prompts, reference, long_prompt):
    e = eng.Engine(HF_DIR, config(max_running_sequences=2, prefill_tokens_per_step=CHUNK))
    keeper = submit(e, prompts[0], 20, temperature=0.0)
    doomed = submit(e, long_prompt, 8, temperature=0.0)

    def cancel_in_third_chunk(calls):
        # Cancelled during its third chunk: the engine drops it at the start of the next step.
        if sum(seq is doomed.seq for _, seq, _, _, _ in calls) == 3:
            doomed.seq.cancel()

    calls = record_prefills(e, then=cancel_in_third_chunk)
    e.start()
    try:
        doomed.wait()
        assert doomed.abort is not None and doomed.abort[0] == "cancelled" and doomed.tokens == []
        assert len([start for _, seq, start, _, _ in calls if seq is doomed.seq]) == 3
        assert any(mixed for _, seq, _, _, mixed in calls if seq is doomed.seq)  # beside the keeper
        assert doomed.seq.slot == -1 and e.prefilling is None
        assert keeper.wait().tokens == reference[0]
        # Its slot and reservation are free again: both slots can be used, results unchanged.
        again = [submit(e, prompts[0], 20, temperature=0.0) for _ in range(2)]
        assert [c.wait().tokens for c in again] == [reference[0]] * 2
        stats = e.stats()
        assert (stats.running, stats.prefilling, stats.waiting, stats.kv_tokens_reserved) == (0, 0, 0, 0)
    finally:
        e.stop()


@pytest.mark.parametrize("chunk_start", [0, 100])
def test_mixed_step_equals_prefill_then_decode(prompts, long_prompt, chunk_start):
    """Llama.step (one pass: decode of slots 0..2 + a prompt chunk in slot 4, slot 3 left free as
    when a running sequence leaves) gives the logits and K/V of prefill(chunk) then decode."""
    import llama

    model = llama.Llama(HF_DIR, context_length=1024, device=torch.device("cpu"), dtype=torch.float32)
    slot, chunk = 4, long_prompt[chunk_start:chunk_start + CHUNK]
    caches = [model.new_cache(5, 1024) for _ in range(2)]
    with torch.inference_mode():
        for k, v in caches:  # the same history in both caches
            firsts = [int(model.prefill(p, k, v, i).argmax()) for i, p in enumerate(prompts)]
            if chunk_start:
                model.prefill(long_prompt[:chunk_start], k, v, slot)
        tokens = torch.tensor(firsts)
        positions = torch.tensor([len(p) for p in prompts])
        (k1, v1), (k2, v2) = caches
        want_last = model.prefill(chunk, k1, v1, slot, chunk_start)
        want = model.decode(tokens, positions, k1, v1)
        got, got_last = model.step(tokens, positions, chunk, slot, chunk_start, k2, v2)
        assert got.dtype == got_last.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(got_last, want_last, atol=1e-4, rtol=1e-5)
        assert got.argmax(-1).tolist() == want.argmax(-1).tolist()
        for i, p in enumerate(prompts):
            for a, b in ((k1, k2), (v1, v2)):
                torch.testing.assert_close(b[:, i, :, :len(p) + 1], a[:, i, :, :len(p) + 1], atol=1e-4, rtol=1e-5)
        for a, b in ((k1, k2), (v1, v2)):
            torch.testing.assert_close(b[:, slot, :, :chunk_start + CHUNK], a[:, slot, :, :chunk_start + CHUNK],
                                       atol=1e-4, rtol=1e-5)
            assert not b[:, 3].any()  # the free slot is untouched
        # A chunk that does not end its prompt: no lm_head row for it, same decode logits.
        again, none = model.step(tokens, positions, chunk, slot, chunk_start, k2, v2, chunk_logits=False)
        assert none is None
        torch.testing.assert_close(again, got, atol=1e-4, rtol=1e-5)
