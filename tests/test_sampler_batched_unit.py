"""The generation engine's sampler: its batched path (model_repository/smollm2/1/sampler.py
`Sampler.choose`, no per-row host sync) against the per-row path it replaced (`per_row_choose`
below, the sampler as it was: one argmax, penalties, filters and `torch.multinomial` per row),
on the CPU with fixed seeds: the same tokens and the same log probs, row for row, for every
kind of row mixed in one batch; and one host transfer per step however many rows sample."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from support import import_or_unavailable  # noqa: E402

torch = import_or_unavailable("torch", allow_module_level=True)
F = torch.nn.functional

VERSION_DIR = Path(__file__).resolve().parents[1] / "model_repository" / "smollm2" / "1"
sys.path.insert(0, str(VERSION_DIR))
from sampler import Sampler, SamplingParams, TokenLogprobs  # noqa: E402

VOCAB = 1000


def per_row_choose(sampler: Sampler, logits: torch.Tensor, states) -> list[int]:
    """The per-row sampler (the engine's before batching), kept here as the reference."""
    out = logits.argmax(-1).tolist()
    for i, state in enumerate(states):
        if state.plain_greedy:
            continue
        p = state.params
        row = logits[i]
        if state.seen is not None:
            penalised = torch.where(row < 0, row * p.repetition_penalty, row / p.repetition_penalty)
            row = torch.where(state.seen, penalised, row)
        if state.counts is not None:
            row = row - p.frequency_penalty * state.counts - p.presence_penalty * (state.counts > 0).to(row.dtype)
        out[i] = int(row.argmax()) if p.greedy else _sample_row(row, state)
        if p.logprobs:
            logprobs = torch.log_softmax(logits[i].float(), dim=-1)
            k = p.top_logprobs
            if not k:
                state.last = TokenLogprobs(float(logprobs[out[i]]))
            else:
                top = torch.topk(logprobs, k)
                state.last = TokenLogprobs(float(logprobs[out[i]]), tuple(top.indices.tolist()), tuple(top.values.tolist()))
    return out


def _sample_row(row, state) -> int:
    p = state.params
    if p.temperature != 1.0:
        row = row / p.temperature
    if p.min_p > 0:
        probs = F.softmax(row, dim=-1)
        row = row.masked_fill(probs < p.min_p * probs.max(), -math.inf)
    if p.top_k > 0:
        kth = torch.topk(row, min(p.top_k, row.shape[-1])).values[-1]
        row = row.masked_fill(row < kth, -math.inf)
    if p.top_p_on:
        sorted_logits, sorted_idx = torch.sort(row, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cum <= (1 - p.top_p)
        remove_sorted[-1:] = False
        remove = remove_sorted.scatter(0, sorted_idx, remove_sorted)
        row = row.masked_fill(remove, -math.inf)
    return int(torch.multinomial(F.softmax(row, dim=-1), 1, generator=state.generator))


# One of each kind of row: plain greedy, greedy with penalties / logprobs, and sampling with
# every filter alone and together.
PARAMS = [
    SamplingParams(temperature=0.0),
    SamplingParams(top_k=1, repetition_penalty=1.3),
    SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.3, logprobs=True, top_logprobs=3),
    SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=7),
    SamplingParams(temperature=0.7, top_p=0.9, seed=11),
    SamplingParams(temperature=1.3, top_k=40, seed=12, logprobs=True),
    SamplingParams(temperature=0.9, top_k=5, top_p=0.8, min_p=0.05, repetition_penalty=1.1, seed=13),
    SamplingParams(temperature=1.0, top_p=0.5, presence_penalty=-0.4, frequency_penalty=0.6, seed=14, logprobs=True, top_logprobs=5),
    SamplingParams(temperature=2.0, min_p=0.2, seed=2**63 + 5),
    SamplingParams(temperature=0.5, top_k=VOCAB + 10, seed=15),
]


def run(choose, steps: int = 12, seed: int = 0):
    """`steps` steps of every row of PARAMS with fresh sampling states; tokens and logprobs per step."""
    sampler = Sampler(VOCAB, torch.device("cpu"))
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, VOCAB, (20,), generator=g).tolist() for _ in PARAMS]
    states = [sampler.start(p, prompt) for p, prompt in zip(PARAMS, prompts)]
    history = []
    for _ in range(steps):
        logits = torch.randn(len(PARAMS), VOCAB, generator=g) * 4
        tokens = choose(sampler, logits, states)
        for state, token in zip(states, tokens):
            Sampler.record(state, token)
        history.append((tokens, [s.last for s in states]))
    return history


def test_batched_sampler_equals_the_per_row_sampler():
    batched = run(lambda sampler, logits, states: sampler.choose(logits, states))
    reference = run(per_row_choose)
    for step, ((tokens, lps), (want, want_lps)) in enumerate(zip(batched, reference)):
        assert tokens == want, f"step {step}"
        for row, (got, exp) in enumerate(zip(lps, want_lps)):
            if exp is None:
                assert got is None
                continue
            assert got.top_ids == exp.top_ids, (step, row)
            assert got.logprob == pytest.approx(exp.logprob, abs=1e-6), (step, row)
            assert got.top_logprobs == pytest.approx(exp.top_logprobs, abs=1e-6), (step, row)
    sampled = {tuple(t[i] for t, _ in batched) for i in range(3, len(PARAMS))}
    assert len(sampled) > 3, "the sampling rows should not all pick the same tokens"


def test_a_seeded_row_draws_the_same_tokens_alone_and_in_a_batch():
    sampler = Sampler(VOCAB, torch.device("cpu"))
    g = torch.Generator().manual_seed(3)
    logits = [torch.randn(len(PARAMS), VOCAB, generator=g) * 3 for _ in range(8)]
    together = [sampler.start(p, [1, 2, 3]) for p in PARAMS]
    alone = [sampler.start(p, [1, 2, 3]) for p in PARAMS]
    for step in logits:
        batch = sampler.choose(step, together)
        for i, state in enumerate(alone):
            (token,) = sampler.choose(step[i:i + 1], [state])
            assert token == batch[i]
            Sampler.record(state, token)
            Sampler.record(together[i], batch[i])


def test_one_host_transfer_per_step_however_many_rows_sample(monkeypatch):
    """No int()/item()/float() on a tensor, and `tolist` once for the tokens (the log prob rows
    add theirs once per step, not per row)."""
    sampler = Sampler(VOCAB, torch.device("cpu"))
    params = [p for p in PARAMS if not p.logprobs]
    states = [sampler.start(p, [4, 5, 6]) for p in params]
    calls = {"tolist": 0, "scalar": 0}
    tolist, item = torch.Tensor.tolist, torch.Tensor.item

    def counted_tolist(self):
        calls["tolist"] += 1
        return tolist(self)

    def counted_item(self):
        calls["scalar"] += 1
        return item(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    monkeypatch.setattr(torch.Tensor, "item", counted_item)
    for name in ("__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, _original=original):
            calls["scalar"] += 1
            return _original(self)

        monkeypatch.setattr(torch.Tensor, name, counted)
    sampler.choose(torch.randn(len(params), VOCAB), states)
    assert calls == {"tolist": 1, "scalar": 0}
