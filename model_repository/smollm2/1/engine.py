"""In-flight (continuous) batching engine for a Llama-architecture causal LM, on CPU or CUDA.

Used by the Triton python-backend model next to this file (``model.py``) and importable on
its own (tests, benchmarks: put this folder on ``sys.path``): it has no Triton dependency.
The folder is self-contained (NVIDIA's Triton container has no ragserve package):

* ``engine.py`` (this file): settings (``EngineConfig``), the scheduler, the KV slots and
  the engine's stats (``EngineStats``);
* ``llama.py``: the forward pass (prefill one sequence, decode the running batch, or both in
  one mixed pass);
* ``sampler.py``: per-sequence sampling, its defaults and range checks (``SamplingParams``).

Scheduler
---------
* ONE background thread runs the loop; each step: drop cancelled sequences, prefill (below),
  run one decode step for every running sequence, emit tokens, retire the finished ones. A
  new request therefore joins at the next step and a finished/cancelled one frees its slot
  and KV reservation at once.
* Prefill: each step prefills at most ``prefill_tokens_per_step`` prompt tokens, so running
  sequences keep their pace while new prompts come in. With ``chunked_prefill`` a longer
  prompt is prefilled in chunks, one per step (attending to its chunks already in the
  cache), interleaved with the batch's decode steps; at most one sequence is part-way
  through its prompt (``prefilling``): it holds a slot and its KV reservation but is not in
  the decode batch, and no other sequence is admitted before its prompt is done (FIFO). A
  sequence's first token comes from its prompt's last position; then it joins the decode
  batch. A prompt of at most ``prefill_whole_tokens`` is not chunked when it is the step's
  first prefill (short chat prompts get their first token a step or more sooner). Without
  ``chunked_prefill`` prompts are prefilled whole, and the budget only bounds how many whole
  prompts join in one step (the first always does, so one long prompt stalls the batch for
  its whole prefill).
* Mixed step (``chunked_prefill`` with a running batch): the step's LAST prefill chunk and
  the batch's decode run as ONE forward pass (``Llama.step``: the dense layers once over the
  n decode rows + the chunk's rows, so every weight is read once per step; attention apart).
  Prompts the step completes before that chunk (short ones admitted behind a finished one)
  are prefilled on their own first, join, and decode in the mixed pass like the rest of
  the batch. After the pass, in this order: every cache length advances; if the chunk ended
  its prompt, that sequence joins at slot n (its K/V copied down first if running sequences
  left while it prefilled) and its first token is emitted; then the batch's tokens, in slot
  order. So a prompt finished by a mixed pass decodes from the next step on (one prefilled
  on its own, with no batch running or unchunked, still decodes in the same step, the batch
  then including it). ``mixed_steps`` counts the mixed passes.
* Admission control: at most ``max_running_sequences`` sequences (running + prefilling), and
  the sum over them of ``prompt + max_tokens`` (their worst-case KV use) stays within
  ``max_kv_tokens``; others wait FIFO in a queue of at most ``max_waiting`` (beyond that:
  RESOURCE_EXHAUSTED).

KV slots
--------
One static tensor per K and V, ``[layers, slots, kv_heads, capacity, head_dim]``, on the
engine's device. Running sequences always occupy slots ``0..n-1`` (when one leaves, the last
slot is moved into its place), so a decode step reads the cache through plain views. A
prefilling sequence takes slot ``n`` when it starts; since nothing is admitted while it
prefills, the running slots only shrink below it, and when its prompt is done its KV moves
down to slot ``n`` if running sequences left meanwhile (one copy of its prompt's K/V).
Capacity grows by doubling (up to the context length) when an admitted sequence needs more,
so memory follows the longest request (it never shrinks; a freed slot and its KV
reservation are reusable at the next step).

Device
------
``device = "cpu"``: fp32 weights and cache. ``device = "cuda"``: fp16 weights, the KV cache
and every tensor on the GPU; without CUDA the engine refuses to start (``EngineConfig``).

Greedy results on the CPU equal ``transformers``' ``generate(do_sample=False)`` token for
token on the same folder (tests/generation/test_engine.py checks it, alone and batched).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine_config import EngineConfig
from kv_slots import KVSlots
from llama import Llama, eos_ids
from sampler import RequestError, Sampler, SamplingParams, SamplingState
from scoring import SCORE_QUEUE_FACTOR, ScoreRequest, Scorer

__all__ = ["Engine", "EngineConfig", "EngineStats", "FINISH_LENGTH", "FINISH_STOP", "FINISH_STOP_WORD",
           "RequestError", "SamplingParams", "ScoreRequest", "Sequence"]

log = logging.getLogger("ragserve.engine")

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_STOP_WORD = "stop_word"  # the sequence ends with one of its stop words (kept, as TensorRT-LLM does)
# Triton's cancel probes (request.is_cancelled) are a round trip to its parent process each:
# asked at most this often (per engine, every sequence at once), outside the engine's lock.
# In-process cancels (Sequence.cancel, a failed send) are seen at the next step regardless.
CANCEL_POLL_INTERVAL_S = 0.005


@dataclass(frozen=True)
class EngineStats:
    """The engine's state after a step (``Engine.stats()``, and ``on_stats`` after each step)."""

    running: int  # sequences in the decode batch
    waiting: int  # sequences queued for a slot
    step_tokens: int  # tokens generated by the last step
    generated_tokens: int  # tokens generated since start
    kv_tokens_reserved: int  # sum over running and prefilling sequences of prompt + max_tokens
    kv_tokens_budget: int  # max_kv_tokens
    steps: int
    prefilling: int = 0  # sequences holding a slot, their prompt part-way prefilled (0 or 1)


# on_token(token_id, finish_reason): finish_reason is None except on the last token; with
# FINISH_STOP the token is the end id that ended the sequence, with FINISH_STOP_WORD the last
# token of a stop word. With logprobs asked for, seq.sampling.last holds the token's.
TokenCallback = Callable[[int, "str | None"], None]
# on_abort(kind, message): kind is "cancelled" or "error"; no further calls follow.
AbortCallback = Callable[[str, str], None]


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    on_token: TokenCallback
    on_abort: AbortCallback = lambda kind, msg: None
    # Polled at most every CANCEL_POLL_INTERVAL_S; Triton passes request.is_cancelled.
    is_cancelled: Callable[[], bool] = lambda: False
    end_id: int | None = None  # None = the checkpoint's EOS ids
    ignore_eos: bool = False  # benchmarks: always run to max_tokens
    stop_words: tuple[tuple[int, ...], ...] = ()  # token sequences that end the sequence

    generated: list[int] = field(default_factory=list)
    slot: int = -1
    cache_len: int = 0  # tokens whose K/V are in the cache (while prefilling: prompt tokens done)
    sampling: SamplingState | None = None
    _cancel: bool = False

    def cancel(self) -> None:
        """In-process cancellation (thread-safe: a flag the engine reads each step)."""
        self._cancel = True

    @property
    def reserved(self) -> int:
        return len(self.prompt) + self.max_tokens

    def cancelled(self, probe: bool = True) -> bool:
        """The in-process flag; with `probe`, also the caller's is_cancelled."""
        if self._cancel:
            return True
        if not probe:
            return False
        try:
            return bool(self.is_cancelled())
        except Exception:  # a broken cancel probe must not kill the engine loop
            log.exception("is_cancelled() failed")
            return False


class Engine:
    def __init__(self, model_dir: str | os.PathLike, config: EngineConfig,
                 on_stats: Callable[[EngineStats], None] | None = None, *,
                 device_index: int | None = None, clock: Callable[[], float] = time.monotonic):
        """``on_stats(stats)`` is called from the engine thread after every step that
        generated tokens or changed the running/waiting counts (for metrics).
        ``device_index``: the GPU on CUDA (Triton's model_instance_device_id); ``clock``
        paces the cancel probes (CANCEL_POLL_INTERVAL_S)."""
        self.config = config
        self.device = config.torch_device(device_index)
        self._clock = clock
        self._next_cancel_poll = float("-inf")
        self.cancel_polls = 0  # rounds of is_cancelled probes (tests)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.model = Llama(model_dir, context_length=config.context_length or None,
                           device=self.device, dtype=dtype)
        self.eos = eos_ids(model_dir)
        self.context_length = self.model.context_length
        self.max_running = config.max_running_sequences
        self.max_kv_tokens = config.max_kv_tokens
        self.max_waiting = config.max_waiting
        self.sampler = Sampler(self.model.w.vocab, self.device)
        self.kv = KVSlots(self.model, self.max_running, min(256, self.context_length))
        self.on_stats = on_stats

        self.running: list[Sequence] = []
        self.prefilling: Sequence | None = None  # part-way through its prompt (chunked prefill)
        self.reserved_tokens = 0
        self.waiting: collections.deque[Sequence] = collections.deque()
        self._cv = threading.Condition()
        # Prefill-only scoring requests (scoring.py): their own queue, one batched pass per step.
        # A pointwise Rerank call sends up to 32 prompts at once: the queue holds several calls'.
        self.scorer = Scorer(self.model, SCORE_QUEUE_FACTOR * (self.max_waiting + self.max_running), self._cv)
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.mixed_steps = 0  # steps whose decode and prefill chunk ran as one forward pass
        self.tokens_generated = 0

    # ---------------------------------------------------------------- public API
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        for seq in list(self.waiting) + self.running + self._prefilling():
            self._safe(seq.on_abort, "error", "UNAVAILABLE: engine stopped")
        self.waiting.clear()
        self.running.clear()
        self.prefilling = None
        self.scorer.abort_all("UNAVAILABLE: engine stopped")

    def submit(self, seq: Sequence) -> None:
        """Validate and enqueue; raises RequestError (nothing is queued then)."""
        n = len(seq.prompt)
        if n == 0:
            raise RequestError("INVALID_ARGUMENT", "input_ids is empty")
        if seq.max_tokens < 1:
            raise RequestError("INVALID_ARGUMENT", "request_output_len must be >= 1")
        if n + seq.max_tokens > self.context_length:
            raise RequestError(
                "INVALID_ARGUMENT",
                f"prompt ({n} tokens) + request_output_len ({seq.max_tokens}) exceeds the context "
                f"length ({self.context_length})")
        if seq.reserved > self.max_kv_tokens:
            raise RequestError(
                "INVALID_ARGUMENT",
                f"prompt + request_output_len ({seq.reserved}) exceeds max_kv_tokens "
                f"({self.max_kv_tokens})")
        vocab = self.model.w.vocab
        if min(seq.prompt) < 0 or max(seq.prompt) >= vocab:
            raise RequestError("INVALID_ARGUMENT", f"token ids must be in [0, {vocab})")
        if any(not word or min(word) < 0 or max(word) >= vocab for word in seq.stop_words):
            raise RequestError("INVALID_ARGUMENT", f"stop_words_list: words must be non-empty, token ids in [0, {vocab})")
        seq.params.validate()
        with self._cv:
            if self._stop:
                raise RequestError("UNAVAILABLE", "engine stopped")
            # Requests that can start at the next step do not count against the queue:
            # a burst into an idle engine must not be refused.
            free_slots = max(0, self.max_running - self._slots_held())
            if len(self.waiting) >= self.max_waiting + free_slots:
                raise RequestError(
                    "RESOURCE_EXHAUSTED",
                    f"generation queue is full ({self.max_waiting} waiting)")
            self.waiting.append(seq)
            self._cv.notify()

    def submit_score(self, req: ScoreRequest) -> None:
        """Validate and enqueue a prefill-only scoring request (scoring.py); raises RequestError."""
        self.scorer.validate(req, self.context_length)
        with self._cv:
            if self._stop:
                raise RequestError("UNAVAILABLE", "engine stopped")
            self.scorer.submit(req)
            self._cv.notify()

    def stats(self, step_tokens: int = 0) -> EngineStats:
        return EngineStats(
            running=len(self.running), waiting=len(self.waiting), step_tokens=step_tokens,
            generated_tokens=self.tokens_generated, kv_tokens_reserved=self.reserved_tokens,
            kv_tokens_budget=self.max_kv_tokens, steps=self.steps, prefilling=len(self._prefilling()))

    def _prefilling(self) -> list[Sequence]:
        return [self.prefilling] if self.prefilling is not None else []

    def _slots_held(self) -> int:
        return len(self.running) + len(self._prefilling())

    # ---------------------------------------------------------------- engine loop
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # per thread: nothing strays onto GPU 0
        last = None
        while True:
            with self._cv:
                while not self._stop and not self.waiting and not self._slots_held() and not self.scorer.pending:
                    last = self._report(last, 0)
                    self._cv.wait()
                if self._stop:
                    return
            try:
                with torch.inference_mode():
                    produced = self._step()
            except Exception as exc:  # never let one bad step kill the server
                log.exception("engine step failed")
                for seq in list(self.running) + self._prefilling():
                    self._retire(seq)
                    self._safe(seq.on_abort, "error", f"INTERNAL: {exc}")
                produced = 0
            last = self._report(last, produced)

    def _report(self, last: tuple[int, ...] | None, produced: int) -> tuple[int, ...]:
        now = (len(self.running), len(self.waiting), len(self._prefilling()))
        if self.on_stats is not None and (now != last or produced):
            self._safe(self.on_stats, self.stats(produced))
        return now

    def _step(self) -> int:
        probe = self._drop_cancelled()
        self.scorer.drop_cancelled(probe)
        self.scorer.step()  # waiting scoring prompts, one pass (no KV slots; nothing generated)
        produced, chunk = self._prefill()
        if chunk is not None and self.running and self.config.chunked_prefill:
            produced += self._mixed_step(*chunk)  # one forward pass for the chunk and the batch
        else:
            if chunk is not None:
                produced += self._run_chunk(*chunk)
            if self.running:
                produced += self._decode_step()
        self.steps += 1
        self.tokens_generated += produced
        return produced

    def _drop_cancelled(self) -> bool:
        """Retires cancelled sequences; says whether this step probed Triton's cancel flags."""
        now = self._clock()
        probe = now >= self._next_cancel_poll
        if probe:
            self._next_cancel_poll = now + CANCEL_POLL_INTERVAL_S
            self.cancel_polls += 1
        for seq in [s for s in self.running + self._prefilling() if s.cancelled(probe)]:
            self._retire(seq)
            self._safe(seq.on_abort, "cancelled", "CANCELLED: request cancelled")
        with self._cv:
            waiting = list(self.waiting)
        # Probed without the lock (submit must not wait on Triton round trips); only this
        # thread takes from the queue, so what was waiting is still there to remove.
        gone = [s for s in waiting if s.cancelled(probe)]
        if gone:
            with self._cv:
                for seq in gone:
                    if seq in self.waiting:  # stop() may have emptied the queue meanwhile
                        self.waiting.remove(seq)
        for seq in gone:
            self._safe(seq.on_abort, "cancelled", "CANCELLED: request cancelled")
        return probe

    def _prefill(self) -> tuple[int, tuple[Sequence, int, int] | None]:
        """This step's prefill work, within ``prefill_tokens_per_step`` prompt tokens: the next
        chunk of the prefilling sequence if there is one, then waiting sequences FIFO. Every
        chunk but the step's last is run here (each completes its prompt); the last one is
        returned as ``(sequence, start, tokens)``, not yet run, for ``_step`` to run (with the
        batch's decode in one pass when there is a batch). Returns the tokens produced here
        (first tokens of sequences whose prompt is done) and that last chunk, or None."""
        budget = self.config.prefill_tokens_per_step
        produced = prefilled = 0
        pending: tuple[Sequence, int, int] | None = None
        while True:
            if pending is not None:
                seq, start, todo = pending
                if start + todo < len(seq.prompt):
                    break  # budget spent: the rest of its prompt in the next steps
                if self.config.chunked_prefill and prefilled >= budget:
                    break
                with self._cv:
                    if not self._admissible(budget - prefilled, first=False):
                        break  # nothing else starts in this step: the pending chunk is the last
                produced += self._run_chunk(*pending)  # completes its prompt: it joins the batch
                pending = None
            if self.prefilling is None and not self._admit(budget - prefilled, first=not prefilled):
                break
            seq = self.prefilling
            todo = len(seq.prompt) - seq.cache_len
            # A short prompt in one step (the step's first prefill only): chunking it would
            # only delay its first token, while a step's cost grows little with a few more rows.
            whole = not prefilled and seq.cache_len == 0 and todo <= self.config.prefill_whole_tokens
            if self.config.chunked_prefill and not whole:
                todo = min(todo, budget - prefilled)
            pending = (seq, seq.cache_len, todo)
            prefilled += todo
        return produced, pending

    def _run_chunk(self, seq: Sequence, start: int, todo: int) -> int:
        """Prefills ``todo`` prompt tokens of the prefilling ``seq`` from ``start`` on its own;
        when that ends its prompt it joins the batch and its first token is emitted (1)."""
        logits = self.model.prefill(seq.prompt[start:start + todo], self.kv.k, self.kv.v, seq.slot, start)
        seq.cache_len += todo
        if seq.cache_len < len(seq.prompt):
            return 0
        self._join(seq)
        self._emit(seq, self.sampler.choose(logits[None], [seq.sampling])[0])
        return 1

    def _mixed_step(self, seq: Sequence, start: int, todo: int) -> int:
        """One forward pass (``Llama.step``) for the running batch's decode (slots 0..n-1) and
        the prefilling ``seq``'s chunk (its slot, >= n). Then, as ``_run_chunk`` followed by
        ``_decode_step`` would: if the chunk ends its prompt, ``seq`` joins the batch (K/V
        copied down to slot n if needed) and its first token is emitted; then the batch's
        tokens, in slot order. A sequence that joins here decodes from the next step on."""
        seqs = list(self.running)
        tokens, positions = self._batch_inputs(seqs)
        done = start + todo == len(seq.prompt)
        logits, last = self.model.step(tokens, positions, seq.prompt[start:start + todo], seq.slot, start,
                                       self.kv.k, self.kv.v, chunk_logits=done,
                                       max_position=max(s.cache_len for s in seqs))
        self.mixed_steps += 1
        # Every cache length first: a retirement below moves the last slot's K/V by its length.
        for s in seqs:
            s.cache_len += 1
        seq.cache_len += todo
        produced = 0
        if done:
            self._join(seq)
            self._emit(seq, self.sampler.choose(last[None], [seq.sampling])[0])
            produced = 1
        for s, token in zip(seqs, self.sampler.choose(logits, [s.sampling for s in seqs])):
            self._emit(s, token)
        return produced + len(seqs)

    def _admit(self, budget: int, first: bool) -> bool:
        """Makes the head of the queue the prefilling sequence if it may start now, with slot
        ``len(running)`` (free: nothing else is prefilling) and its KV reservation. It is the
        prefilling one from here on, so that a cancel or a failing step frees what it holds."""
        with self._cv:
            if not self._admissible(budget, first):
                return False
            seq = self.waiting.popleft()
        self.prefilling, seq.slot, seq.cache_len = seq, len(self.running), 0
        self.reserved_tokens += seq.reserved
        self.kv.ensure(seq.reserved)
        seq.sampling = self.sampler.start(seq.params, seq.prompt)
        return True

    def _admissible(self, budget: int, first: bool) -> bool:
        """Whether ``_admit`` would start the head of the queue now (called with ``_cv`` held;
        only this thread takes from the queue, so the answer holds until it does)."""
        if not self.waiting or self._slots_held() >= self.max_running:
            return False
        seq = self.waiting[0]
        if self.reserved_tokens + seq.reserved > self.max_kv_tokens:
            return False  # FIFO: the head waits for room, later ones wait behind it
        # Unchunked, a prompt is prefilled whole: the budget bounds how long running
        # sequences stall behind prefills in one step (the first prompt always goes).
        if not self.config.chunked_prefill and not first and len(seq.prompt) > budget:
            return False
        return True

    def _join(self, seq: Sequence) -> None:
        """A fully prefilled sequence joins the decode batch at slot ``len(running)``. Its own
        slot is never below that (the running slots only shrank while it prefilled); above it,
        running sequences left meanwhile and its K/V move down."""
        self.prefilling = None
        n = len(self.running)
        if seq.slot != n:
            self.kv.move(seq.slot, n, seq.cache_len)
            seq.slot = n
        self.running.append(seq)

    def _decode_step(self) -> int:
        seqs = list(self.running)
        tokens, positions = self._batch_inputs(seqs)
        logits = self.model.decode(tokens, positions, self.kv.k, self.kv.v,
                                   max_position=max(s.cache_len for s in seqs))
        for s in seqs:
            s.cache_len += 1
        for seq, token in zip(seqs, self.sampler.choose(logits, [s.sampling for s in seqs])):
            self._emit(seq, token)
        return len(seqs)

    def _batch_inputs(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode rows' last tokens and positions on the device, copied from the host
        without waiting for the device (the positions' max is passed from the host too)."""
        host = torch.tensor([[s.generated[-1] for s in seqs], [s.cache_len for s in seqs]], dtype=torch.long, device="cpu")
        both = host.to(self.device, non_blocking=True)
        return both[0], both[1]

    def _ends(self, seq: Sequence, token: int) -> bool:
        if seq.ignore_eos:
            return False
        return token == seq.end_id if seq.end_id is not None else token in self.eos

    def _emit(self, seq: Sequence, token: int) -> None:
        seq.generated.append(token)
        Sampler.record(seq.sampling, token)
        reason = None
        if self._ends(seq, token):
            reason = FINISH_STOP
        elif any(seq.generated[-len(w):] == list(w) for w in seq.stop_words):
            reason = FINISH_STOP_WORD
        elif len(seq.generated) >= seq.max_tokens:
            reason = FINISH_LENGTH
        if reason is not None:
            self._retire(seq)
        if not self._safe(seq.on_token, token, reason):
            # The caller can no longer receive tokens (e.g. stream gone): stop work on it, and
            # still try to close its stream, or Triton keeps the request (and the model) alive.
            self._retire(seq)
            self._safe(seq.on_abort, "cancelled", "CANCELLED: response could not be sent")

    def _retire(self, seq: Sequence) -> None:
        """Remove a running or prefilling sequence and free its slot and KV reservation. A
        running one's slot gets the last running slot, so running slots stay ``0..n-1``; a
        prefilling one's slot is above them and is simply free again."""
        if seq is self.prefilling:
            self.prefilling = None
            self.reserved_tokens -= seq.reserved
            seq.slot = -1
            return
        if seq not in self.running:
            return
        i, last = seq.slot, len(self.running) - 1
        moved = self.running[last]
        if i != last:
            self.kv.move(last, i, moved.cache_len)
            moved.slot = i
            self.running[i] = moved
        self.running.pop()
        self.reserved_tokens -= seq.reserved
        seq.slot = -1

    @staticmethod
    def _safe(fn, *args) -> bool:
        try:
            fn(*args)
            return True
        except Exception:
            log.exception("engine callback failed")
            return False
