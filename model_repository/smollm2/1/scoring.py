"""Prefill-only scoring: the logits of a few candidate tokens at the position after a prompt.

What the LLM rerankers of the gateway need (pointwise: the logits of "Yes" and "No" after a
relevance question; listwise in FIRST's style: the logits of the passage identifiers after
"["). A request names its prompt and its candidate token ids; the engine answers with the
raw (fp32) logits of those ids at the prompt's last position, in one response, and generates
nothing.

Batching: scoring requests wait in their own FIFO queue (``Scorer``); each engine step takes
as many as fit in ``SCORE_TOKENS_PER_STEP`` prompt tokens (the first always goes, whatever
its length) and runs them as ONE forward pass without the KV cache: the dense layers
(projections, MLP, RMSNorm) over all their rows together, attention per prompt (causal,
each prompt only sees itself), the LM head only on each prompt's last row. Requests that
arrive while a step runs are scored together in the next step. A scoring request holds no
KV slot and no KV reservation, so it never waits for generation to free one; while
sequences are decoding, a step's scoring pass delays their next token by its own duration
(at most about ``SCORE_TOKENS_PER_STEP`` tokens of prefill, plus one longer prompt alone).

In fp32 on the CPU the logits equal transformers' forward pass on the same folder within
float rounding (tests/generation/test_scoring.py).
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from llama import Llama
from sampler import RequestError

log = logging.getLogger("ragserve.engine")

# Prompt tokens scored per engine step (several prompts share the pass up to this; one longer
# prompt goes alone). 1024: about ten pointwise prompts of SmolLM2's (~90 tokens with a short
# document), or one listwise window of 20 short passages (~600), per step.
SCORE_TOKENS_PER_STEP = 1024
# Scoring requests queued at most: this times (max_waiting + max_running_sequences); beyond,
# RESOURCE_EXHAUSTED. Each holds only its prompt's ids until its pass.
SCORE_QUEUE_FACTOR = 4
MAX_CANDIDATES = 64  # candidate ids per request (FIRST's identifiers: at most 26 letters)


@dataclass(eq=False)
class ScoreRequest:
    prompt: list[int]
    candidates: list[int]
    on_result: Callable[[list[float]], None]  # the candidates' logits, in the request's order
    on_abort: Callable[[str, str], None] = lambda kind, msg: None  # as Sequence.on_abort
    is_cancelled: Callable[[], bool] = lambda: False
    _cancel: bool = field(default=False)

    def cancel(self) -> None:
        self._cancel = True

    def cancelled(self, probe: bool = True) -> bool:
        """The in-process flag; with `probe`, also the caller's is_cancelled (a Triton round trip)."""
        if self._cancel:
            return True
        if not probe:
            return False
        try:
            return bool(self.is_cancelled())
        except Exception:
            log.exception("is_cancelled() failed")
            return False


def last_logits(model: Llama, prompts: list[list[int]]) -> torch.Tensor:
    """fp32 logits [len(prompts), vocab] at the last position of each prompt, all prompts in
    one pass over the weights, nothing written to any cache."""
    w = model.w
    lengths = [len(p) for p in prompts]
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=model.device)
    positions = torch.cat([torch.arange(n, device=model.device) for n in lengths])
    cos, sin = model.cos[positions][:, None], model.sin[positions][:, None]  # [rows, 1, D]
    H, KV, D = w.n_heads, w.n_kv, w.head_dim
    rep = H // KV
    x = w.embed[ids]  # [rows, hidden]
    for layer in w.layers:
        q, k, v = model._qkv(x, layer)
        rows = q.shape[0]
        q = model._rope(q.view(rows, H, D), cos, sin)
        k = model._rope(k.view(rows, KV, D), cos, sin)
        v = v.view(rows, KV, D)
        parts, start = [], 0
        for n in lengths:
            qs, ks, vs = (t[start:start + n].transpose(0, 1) for t in (q, k, v))  # [heads, n, D]
            attn = F.scaled_dot_product_attention(
                qs[None], ks.repeat_interleave(rep, 0)[None], vs.repeat_interleave(rep, 0)[None],
                is_causal=True, scale=model.scale)[0]
            parts.append(attn.transpose(0, 1).reshape(n, H * D))
            start += n
        x = x + F.linear(torch.cat(parts), layer["o"])
        x = model._mlp(x, layer)
    last = torch.tensor(lengths, device=model.device).cumsum(0) - 1
    return model._logits(x[last])


class Scorer:
    """The engine's scoring queue and its per-step pass (see the module docstring)."""

    def __init__(self, model: Llama, max_queued: int, wake: threading.Condition):
        self.model = model
        self.max_queued = max_queued
        self._cv = wake  # the engine's condition: a new request wakes its loop
        self.queue: collections.deque[ScoreRequest] = collections.deque()
        self.scored = 0  # prompts scored since start
        self.passes = 0  # forward passes that scored them

    @property
    def pending(self) -> bool:
        return bool(self.queue)

    def validate(self, req: ScoreRequest, context_length: int) -> None:
        vocab = self.model.w.vocab
        n = len(req.prompt)
        if n == 0:
            raise RequestError("INVALID_ARGUMENT", "input_ids is empty")
        if n > context_length:
            raise RequestError("INVALID_ARGUMENT", f"prompt ({n} tokens) exceeds the context length ({context_length})")
        if min(req.prompt) < 0 or max(req.prompt) >= vocab:
            raise RequestError("INVALID_ARGUMENT", f"token ids must be in [0, {vocab})")
        if not 1 <= len(req.candidates) <= MAX_CANDIDATES:
            raise RequestError("INVALID_ARGUMENT", f"candidate_token_ids must hold 1 to {MAX_CANDIDATES} ids, got {len(req.candidates)}")
        if min(req.candidates) < 0 or max(req.candidates) >= vocab:
            raise RequestError("INVALID_ARGUMENT", f"candidate_token_ids must be in [0, {vocab})")

    def submit(self, req: ScoreRequest) -> None:
        """Called with the engine's condition held."""
        if len(self.queue) >= self.max_queued:
            raise RequestError("RESOURCE_EXHAUSTED", f"scoring queue is full ({self.max_queued} waiting)")
        self.queue.append(req)

    def drop_cancelled(self, probe: bool = True) -> None:
        """Closes cancelled requests. The engine passes `probe` on its paced cancel polls (as for
        its sequences); the probes run without the lock, so submit never waits on them."""
        with self._cv:
            queued = list(self.queue)
        gone = [r for r in queued if r.cancelled(probe)]
        if not gone:
            return
        with self._cv:
            gone = [r for r in gone if r in self.queue]  # abort_all may have emptied the queue meanwhile
            for req in gone:
                self.queue.remove(req)
        for req in gone:
            _safe(req.on_abort, "cancelled", "CANCELLED: request cancelled")

    def abort_all(self, message: str) -> None:
        with self._cv:
            gone, self.queue = list(self.queue), collections.deque()
        for req in gone:
            _safe(req.on_abort, "error", message)

    def step(self) -> int:
        """Scores this step's share of the queue in one pass; returns how many prompts."""
        with self._cv:
            batch, tokens = [], 0
            while self.queue and (not batch or tokens + len(self.queue[0].prompt) <= SCORE_TOKENS_PER_STEP):
                req = self.queue.popleft()
                batch.append(req)
                tokens += len(req.prompt)
        if not batch:
            return 0
        try:
            logits = last_logits(self.model, [r.prompt for r in batch])
            rows = [logits[i, r.candidates].tolist() for i, r in enumerate(batch)]
            self.scored += len(batch)
            self.passes += 1
        except Exception as exc:  # a failed pass fails its requests, not the engine
            log.exception("scoring pass failed")
            for req in batch:
                _safe(req.on_abort, "error", f"INTERNAL: {exc}")
            return 0
        for req, values in zip(batch, rows):
            if not _safe(req.on_result, values):
                _safe(req.on_abort, "cancelled", "CANCELLED: response could not be sent")
        return len(batch)


def _safe(fn, *args) -> bool:
    try:
        fn(*args)
        return True
    except Exception:
        log.exception("scoring callback failed")
        return False
