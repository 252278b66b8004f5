"""In-process tests of the engine's prefill-only scoring path (model_repository/smollm2/1/scoring.py)
on a tiny random Llama made at test time, compared with transformers' own forward pass on the
same folder: the candidate logits, the pointwise yes/no difference, FIRST's identifier order,
batching several prompts into one pass, and generation untouched beside it."""

from __future__ import annotations

import dataclasses
import sys
import threading
from pathlib import Path

import pytest

from support import import_or_unavailable  # noqa: E402 (tests/ is on sys.path)

torch = import_or_unavailable("torch", allow_module_level=True)
transformers = import_or_unavailable("transformers", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[2]
VERSION_DIR = ROOT / "model_repository" / "smollm2" / "1"
sys.path.insert(0, str(VERSION_DIR))
import engine as eng  # noqa: E402

from ragserve_server.models.generation_contract import ENGINE_PARAMETERS  # noqa: E402

TIMEOUT = 120
VOCAB = 512
DEPLOYED = eng.EngineConfig.from_parameters({k: v for k, v in ENGINE_PARAMETERS.items() if k != "hf_dir"} | {"device": "cpu"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A random Llama (2 layers, GQA, untied LM head) saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def hf_logits(tiny):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()

    def last(prompt: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return model(torch.tensor([prompt])).logits[0, -1].float()

    return last


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (int(torch.randint(5, 90, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


class Result:
    def __init__(self):
        self.values = self.abort = None
        self.done = threading.Event()

    def on_result(self, values):
        self.values = values
        self.done.set()

    def on_abort(self, kind, message):
        self.abort = (kind, message)
        self.done.set()

    def wait(self):
        assert self.done.wait(TIMEOUT), "scoring request did not finish"
        return self


def score(engine, prompt, candidates) -> Result:
    r = Result()
    engine.submit_score(eng.ScoreRequest(list(prompt), list(candidates), r.on_result, r.on_abort))
    return r


def test_candidate_logits_equal_transformers_and_share_one_pass(tiny, hf_logits):
    engine = eng.Engine(tiny, DEPLOYED)
    yes, no = 7, 11
    labels = list(range(20, 40))  # FIRST's identifiers stand-in: 20 single tokens
    batch = prompts(6)
    # Submitted before the engine starts: they arrive together and are scored in one step.
    pointwise = [score(engine, p, [yes, no]) for p in batch[:4]]
    listwise = [score(engine, p, labels) for p in batch[4:]]
    engine.start()
    try:
        for r in pointwise + listwise:
            assert r.wait().abort is None
        assert engine.scorer.scored == 6 and engine.scorer.passes == 1
        for p, r in zip(batch, pointwise + listwise):
            ref = hf_logits(p)
            wanted = [yes, no] if r in pointwise else labels
            assert torch.allclose(torch.tensor(r.values), ref[wanted], atol=1e-4, rtol=0)
            if r in pointwise:
                assert abs((r.values[0] - r.values[1]) - float(ref[yes] - ref[no])) < 1e-3
            else:  # FIRST's ranking: the identifiers by logit, best first
                assert sorted(range(len(labels)), key=lambda i: -r.values[i]) == sorted(
                    range(len(labels)), key=lambda i: -float(ref[labels[i]]))
    finally:
        engine.stop()


def test_scoring_budget_splits_steps_and_generation_is_unchanged(tiny, hf_logits):
    import scoring

    engine = eng.Engine(tiny, DEPLOYED).start()
    try:
        prompt = prompts(1, seed=5)[0]
        alone = _generate(engine, prompt)
        many = prompts(40, seed=7)  # ~2,000 tokens: more than one step's scoring budget
        passes = engine.scorer.passes
        results = [score(engine, p, [3, 4, 5]) for p in many]
        beside = _generate(engine, prompt)
        for p, r in zip(many, results):
            assert r.wait().abort is None
            assert torch.allclose(torch.tensor(r.values), hf_logits(p)[[3, 4, 5]], atol=1e-4, rtol=0)
        assert beside == alone  # greedy tokens of a sequence decoding beside the scoring passes
        assert sum(map(len, many)) > scoring.SCORE_TOKENS_PER_STEP and engine.scorer.passes - passes >= 2
        assert engine.stats().kv_tokens_reserved == 0
    finally:
        engine.stop()


def _generate(engine, prompt) -> list[int]:
    tokens, done = [], threading.Event()

    def on_token(token, reason):
        tokens.append(token)
        if reason is not None:
            done.set()

    engine.submit(eng.Sequence(list(prompt), 12, eng.SamplingParams(temperature=0.0), on_token, ignore_eos=True))
    assert done.wait(TIMEOUT)
    return tokens


def test_bad_scoring_requests_are_invalid_argument(tiny):
    engine = eng.Engine(tiny, dataclasses.replace(DEPLOYED, context_length=64))
    for prompt, candidates in [([], [1]), ([5] * 65, [1]), ([5, VOCAB], [1]), ([5], []), ([5], [VOCAB]), ([5], [-1]), ([5], list(range(65)))]:
        with pytest.raises(eng.RequestError, match="^INVALID_ARGUMENT:"):
            score(engine, prompt, candidates)
    assert not engine.scorer.pending


def test_a_full_scoring_queue_is_resource_exhausted(tiny):
    import scoring

    engine = eng.Engine(tiny, dataclasses.replace(DEPLOYED, max_waiting=1, max_running_sequences=1))  # not started
    limit = scoring.SCORE_QUEUE_FACTOR * 2
    for _ in range(limit):
        score(engine, [5, 6], [1])
    with pytest.raises(eng.RequestError, match="^RESOURCE_EXHAUSTED:"):
        score(engine, [5, 6], [1])
    engine.stop()


def test_cancelled_and_stopped_scoring_requests_are_closed(tiny):
    engine = eng.Engine(tiny, DEPLOYED)
    cancelled, stopped = score(engine, [5, 6], [1]), score(engine, [5, 7], [1])
    engine.scorer.queue[0].cancel()
    engine.scorer.drop_cancelled()
    assert cancelled.wait().abort[0] == "cancelled"
    engine.stop()
    assert stopped.wait().abort == ("error", "UNAVAILABLE: engine stopped")


def test_scoring_cancel_probes_are_paced_with_the_engines_and_asked_outside_the_lock(tiny):
    """A queued scoring request's is_cancelled (a Triton round trip each) is asked only on the
    engine's paced cancel polls, never with the engine's lock held; an in-process cancel needs none."""
    now = [100.0]
    engine = eng.Engine(tiny, DEPLOYED, clock=lambda: now[0])  # not started: steps driven by hand
    asked = []

    def is_cancelled():
        assert not engine._cv._is_owned(), "a scoring cancel probe ran under the engine's lock"
        asked.append(now[0])
        return len(asked) >= 2

    r = Result()
    engine.submit_score(eng.ScoreRequest([5, 6], [1], r.on_result, r.on_abort, is_cancelled=is_cancelled))
    engine.scorer.drop_cancelled(probe=False)
    assert asked == [] and len(engine.scorer.queue) == 1
    engine.scorer.drop_cancelled(probe=True)
    assert len(asked) == 1 and len(engine.scorer.queue) == 1
    engine.scorer.drop_cancelled(probe=True)
    assert r.wait().abort[0] == "cancelled" and not engine.scorer.queue

    # The engine's step hands its own pacing to the scorer: within one poll interval, one probe.
    probes = []
    engine.scorer.drop_cancelled = probes.append
    for _ in range(5):
        engine._step()
        now[0] += eng.CANCEL_POLL_INTERVAL_S / 10
    now[0] += eng.CANCEL_POLL_INTERVAL_S
    engine._step()
    assert probes == [True, False, False, False, False, True]
    engine.stop()
