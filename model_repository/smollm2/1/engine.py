"""In-flight (continuous) batching engine for a Llama-architecture causal LM on CPU.

Used by the Triton python-backend model next to this file (``model.py``) and importable
on its own (tests, benchmarks): it has no Triton dependency.

Design
------
* Weights come straight from the HF folder's safetensors (fp32). The forward pass is
  written here, not ``transformers``': q/k/v and gate/up projections are fused into one
  matmul each, and the whole running batch is decoded in one pass per step.
* KV cache: one static tensor per K and V, ``[layers, slots, kv_heads, capacity, head_dim]``.
  Running sequences always occupy slots ``0..n-1`` (when one leaves, the last slot is
  moved into its place), so a decode step reads the cache through plain views
  ``[:, :n, :, :L]`` without gathering. Capacity grows by doubling (up to the context
  length) when an admitted sequence needs more, so memory follows the longest request
  (it never shrinks; a freed slot and its KV reservation are reusable at the next step).
* Each slot has its own position; RoPE is looked up per position and attention masks every
  slot to its own valid length, so sequences of any lengths share a decode step. GQA is
  done without repeating K/V: the query heads that share a KV head become extra query
  rows of that head.
* ONE background thread runs the loop: drop cancelled sequences, admit waiting ones
  (prefill one sequence at a time, its first token comes from the prefill), run one
  decode step for every running sequence, emit tokens, retire the finished ones. A new
  request therefore joins at the next step and a finished/cancelled one frees its slot
  and KV reservation at once.
* Admission control: at most ``max_running`` sequences, and the sum over running sequences
  of ``prompt + max_tokens`` (their worst-case KV use) stays within ``max_kv_tokens``;
  others wait FIFO in a queue of at most ``max_waiting`` (beyond that: RESOURCE_EXHAUSTED).
* Sampling is per sequence and follows transformers' processor order (repetition
  penalty, then temperature, top-k, top-p, then multinomial), with a ``torch.Generator``
  per sequence seeded from the request, so a seeded request gives the same tokens alone
  or in any batch. ``temperature == 0`` is greedy (argmax after the repetition penalty).

Greedy results equal ``transformers``' ``generate(do_sample=False)`` token for token on
the same folder (tests/generation/test_engine.py checks it, alone and batched).
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("ragserve.engine")

FINISH_STOP = "stop"
FINISH_LENGTH = "length"


class RequestError(Exception):
    """A request the engine refuses; ``str()`` starts with the status name and a colon
    (``INVALID_ARGUMENT: ...``, ``RESOURCE_EXHAUSTED: ...``) so callers can map it."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None  # None = nondeterministic

    def validate(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise RequestError("INVALID_ARGUMENT", "temperature must be >= 0")
        if not (0 < self.top_p <= 1):
            raise RequestError("INVALID_ARGUMENT", "top_p must be in (0, 1]")
        if self.top_k < 0:
            raise RequestError("INVALID_ARGUMENT", "top_k must be >= 0")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise RequestError("INVALID_ARGUMENT", "repetition_penalty must be > 0")


# on_token(token_id, finish_reason): finish_reason is None except on the last token.
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
    # Polled once per engine step; Triton passes request.is_cancelled.
    is_cancelled: Callable[[], bool] = lambda: False
    ignore_eos: bool = False  # benchmarks: always run to max_tokens

    generated: list[int] = field(default_factory=list)
    slot: int = -1
    cache_len: int = 0  # tokens whose K/V are in the cache
    _cancel: bool = False
    _generator: torch.Generator | None = None
    _seen: torch.Tensor | None = None  # bool [vocab]: tokens seen, for repetition penalty

    def cancel(self) -> None:
        """In-process cancellation (thread-safe: a flag the engine reads each step)."""
        self._cancel = True

    @property
    def reserved(self) -> int:
        return len(self.prompt) + self.max_tokens

    def cancelled(self) -> bool:
        if self._cancel:
            return True
        try:
            return bool(self.is_cancelled())
        except Exception:  # a broken cancel probe must not kill the engine loop
            log.exception("is_cancelled() failed")
            return False


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


class LlamaWeights:
    """fp32 weights of a Llama checkpoint, laid out for the fused forward below."""

    def __init__(self, model_dir: str | os.PathLike):
        from safetensors.torch import load_file

        model_dir = Path(model_dir)
        cfg = json.loads((model_dir / "config.json").read_text())
        self.config = cfg
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise NotImplementedError("biases in attention/MLP are not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise NotImplementedError(f"hidden_act {cfg.get('hidden_act')}")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise NotImplementedError(f"rope type {rope}")
        self.rope_theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))

        self.n_layers = cfg["num_hidden_layers"]
        self.hidden = cfg["hidden_size"]
        self.n_heads = cfg["num_attention_heads"]
        self.n_kv = cfg.get("num_key_value_heads", self.n_heads)
        self.head_dim = cfg.get("head_dim") or self.hidden // self.n_heads
        self.eps = float(cfg["rms_norm_eps"])
        self.vocab = cfg["vocab_size"]
        self.max_positions = int(cfg.get("max_position_embeddings", 2048))

        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no safetensors in {model_dir}")
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(str(f)))
        sd = {k: v.float() for k, v in sd.items()}

        self.embed = sd["model.embed_tokens.weight"]
        self.lm_head = sd.get("lm_head.weight", self.embed)
        self.final_norm = sd["model.norm.weight"]
        self.layers = []
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            self.layers.append(dict(
                ln1=sd[p + "input_layernorm.weight"],
                ln2=sd[p + "post_attention_layernorm.weight"],
                qkv=torch.cat([sd[p + "self_attn.q_proj.weight"],
                               sd[p + "self_attn.k_proj.weight"],
                               sd[p + "self_attn.v_proj.weight"]]).contiguous(),
                o=sd[p + "self_attn.o_proj.weight"],
                gate_up=torch.cat([sd[p + "mlp.gate_proj.weight"],
                                   sd[p + "mlp.up_proj.weight"]]).contiguous(),
                down=sd[p + "mlp.down_proj.weight"],
            ))

    def eos_ids(self, model_dir: str | os.PathLike) -> set[int]:
        ids: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            path = Path(model_dir) / name
            if path.is_file():
                eos = json.loads(path.read_text()).get("eos_token_id")
                if isinstance(eos, int):
                    ids.add(eos)
                elif isinstance(eos, list):
                    ids.update(int(e) for e in eos)
                if ids:
                    break
        return ids


class Engine:
    def __init__(self, model_dir: str | os.PathLike, *, max_running: int = 16,
                 max_kv_tokens: int = 16 * 2048, max_waiting: int = 64,
                 context_length: int | None = None, num_threads: int | None = None,
                 prefill_tokens_per_step: int = 512,
                 on_stats: Callable[[int, int, int], None] | None = None):
        """``on_stats(running, waiting, tokens_this_step)`` is called from the engine
        thread after every step (for metrics)."""
        if num_threads:
            torch.set_num_threads(num_threads)
        self.w = LlamaWeights(model_dir)
        self.eos = self.w.eos_ids(model_dir)
        self.context_length = int(context_length or self.w.max_positions)
        self.max_running = int(max_running)
        self.max_kv_tokens = int(max_kv_tokens)
        self.max_waiting = int(max_waiting)
        self.prefill_tokens_per_step = int(prefill_tokens_per_step)
        self.on_stats = on_stats

        w = self.w
        inv_freq = 1.0 / (w.rope_theta ** (
            torch.arange(0, w.head_dim, 2, dtype=torch.int64).float() / w.head_dim))
        freqs = torch.outer(torch.arange(self.context_length, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()  # [context, head_dim]
        self.scale = w.head_dim ** -0.5

        self.capacity = 0
        self.k_cache = self.v_cache = torch.empty(0)
        self._ensure_capacity(min(256, self.context_length))

        self.running: list[Sequence] = []
        self.reserved_tokens = 0
        self.waiting: collections.deque[Sequence] = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
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
        for seq in list(self.waiting) + self.running:
            self._safe(seq.on_abort, "error", "UNAVAILABLE: engine stopped")
        self.waiting.clear()
        self.running.clear()

    def submit(self, seq: Sequence) -> None:
        """Validate and enqueue; raises RequestError (nothing is queued then)."""
        n = len(seq.prompt)
        if n == 0:
            raise RequestError("INVALID_ARGUMENT", "input_ids is empty")
        if seq.max_tokens < 1:
            raise RequestError("INVALID_ARGUMENT", "max_tokens must be >= 1")
        if n + seq.max_tokens > self.context_length:
            raise RequestError(
                "INVALID_ARGUMENT",
                f"prompt ({n} tokens) + max_tokens ({seq.max_tokens}) exceeds the context "
                f"length ({self.context_length})")
        if seq.reserved > self.max_kv_tokens:
            raise RequestError(
                "INVALID_ARGUMENT",
                f"prompt + max_tokens ({seq.reserved}) exceeds max_kv_tokens "
                f"({self.max_kv_tokens})")
        if min(seq.prompt) < 0 or max(seq.prompt) >= self.w.vocab:
            raise RequestError("INVALID_ARGUMENT", f"token ids must be in [0, {self.w.vocab})")
        seq.params.validate()
        with self._cv:
            if self._stop:
                raise RequestError("UNAVAILABLE", "engine stopped")
            # Requests that can start at the next step do not count against the queue:
            # a burst into an idle engine must not be refused.
            free_slots = max(0, self.max_running - len(self.running))
            if len(self.waiting) >= self.max_waiting + free_slots:
                raise RequestError(
                    "RESOURCE_EXHAUSTED",
                    f"generation queue is full ({self.max_waiting} waiting)")
            self.waiting.append(seq)
            self._cv.notify()

    def stats(self) -> tuple[int, int]:
        return len(self.running), len(self.waiting)

    # ---------------------------------------------------------------- engine loop
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        last = None
        while True:
            with self._cv:
                while not self._stop and not self.waiting and not self.running:
                    self._report(last, 0)
                    last = (0, 0)
                    self._cv.wait()
                if self._stop:
                    return
            try:
                with torch.inference_mode():
                    produced = self._step()
            except Exception as exc:  # never let one bad step kill the server
                log.exception("engine step failed")
                for seq in list(self.running):
                    self._retire(seq)
                    self._safe(seq.on_abort, "error", f"INTERNAL: {exc}")
                produced = 0
            last = self._report(last, produced)

    def _report(self, last, produced: int):
        now = (len(self.running), len(self.waiting))
        if self.on_stats is not None and (now != last or produced):
            self._safe(self.on_stats, now[0], now[1], produced)
        return now

    def _step(self) -> int:
        self._drop_cancelled()
        produced = self._admit()
        if self.running:
            produced += self._decode_step()
        self.steps += 1
        self.tokens_generated += produced
        return produced

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.running if s.cancelled()]:
            self._retire(seq)
            self._safe(seq.on_abort, "cancelled", "CANCELLED: request cancelled")
        with self._cv:
            gone = [s for s in self.waiting if s.cancelled()]
            for seq in gone:
                self.waiting.remove(seq)
        for seq in gone:
            self._safe(seq.on_abort, "cancelled", "CANCELLED: request cancelled")

    def _admit(self) -> int:
        produced = 0
        prefilled = 0
        while True:
            with self._cv:
                if not self.waiting or len(self.running) >= self.max_running:
                    break
                seq = self.waiting[0]
                if self.reserved_tokens + seq.reserved > self.max_kv_tokens:
                    break  # FIFO: the head waits for room, later ones wait behind it
                # Bound how long running sequences stall behind prefills in one step.
                if prefilled and prefilled + len(seq.prompt) > self.prefill_tokens_per_step:
                    break
                self.waiting.popleft()
            self._ensure_capacity(seq.reserved)
            seq.slot = len(self.running)
            self.running.append(seq)
            self.reserved_tokens += seq.reserved
            self._init_sampling(seq)
            logits = self._prefill(seq)
            prefilled += len(seq.prompt)
            token = self._choose(logits[None], [seq])[0]
            produced += 1
            self._emit(seq, token)
        return produced

    def _decode_step(self) -> int:
        seqs = list(self.running)
        tokens = torch.tensor([s.generated[-1] for s in seqs], dtype=torch.long)
        positions = torch.tensor([s.cache_len for s in seqs], dtype=torch.long)
        logits = self._decode(tokens, positions)
        for s in seqs:
            s.cache_len += 1
        for seq, token in zip(seqs, self._choose(logits, seqs)):
            self._emit(seq, token)
        return len(seqs)

    def _emit(self, seq: Sequence, token: int) -> None:
        seq.generated.append(token)
        if seq._seen is not None:
            seq._seen[token] = True
        reason = None
        if token in self.eos and not seq.ignore_eos:
            reason = FINISH_STOP
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
        """Remove a running sequence and free its slot: the last slot moves into it."""
        if seq not in self.running:
            return
        i, last = seq.slot, len(self.running) - 1
        moved = self.running[last]
        if i != last:
            n = moved.cache_len
            self.k_cache[:, i, :, :n] = self.k_cache[:, last, :, :n]
            self.v_cache[:, i, :, :n] = self.v_cache[:, last, :, :n]
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

    # ---------------------------------------------------------------- KV cache
    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        cap = max(self.capacity, 256)
        while cap < needed:
            cap *= 2
        cap = min(cap, self.context_length)
        w = self.w
        shape = (w.n_layers, self.max_running, w.n_kv, cap, w.head_dim)
        k, v = torch.zeros(shape), torch.zeros(shape)
        if self.capacity:
            k[:, :, :, :self.capacity] = self.k_cache
            v[:, :, :, :self.capacity] = self.v_cache
        self.k_cache, self.v_cache, self.capacity = k, v, cap

    # ---------------------------------------------------------------- model
    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Same op order as transformers' LlamaRMSNorm (fp32 throughout).
        var = x.pow(2).mean(-1, keepdim=True)
        return weight * (x * torch.rsqrt(var + self.w.eps))

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _mlp(self, x: torch.Tensor, layer: dict) -> torch.Tensor:
        h = self._rms(x, layer["ln2"])
        gate, up = F.linear(h, layer["gate_up"]).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, layer["down"])

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._rms(x, self.w.final_norm), self.w.lm_head)

    def _prefill(self, seq: Sequence) -> torch.Tensor:
        """Run the whole prompt of one sequence, fill its cache slot; logits of the last
        position [vocab]."""
        w = self.w
        T, H, KV, D = len(seq.prompt), w.n_heads, w.n_kv, w.head_dim
        ids = torch.tensor(seq.prompt, dtype=torch.long)
        x = w.embed[ids]  # [T, hidden]
        cos, sin = self.cos[:T][None], self.sin[:T][None]  # broadcast over heads
        for li, layer in enumerate(w.layers):
            h = self._rms(x, layer["ln1"])
            q, k, v = F.linear(h, layer["qkv"]).split([H * D, KV * D, KV * D], dim=-1)
            q = self._rope(q.view(T, H, D).transpose(0, 1), cos, sin)  # [H, T, D]
            k = self._rope(k.view(T, KV, D).transpose(0, 1), cos, sin)  # [KV, T, D]
            v = v.view(T, KV, D).transpose(0, 1)
            self.k_cache[li, seq.slot, :, :T] = k
            self.v_cache[li, seq.slot, :, :T] = v
            rep = H // KV  # query head h uses KV head h // rep, as transformers' repeat_kv
            attn = F.scaled_dot_product_attention(
                q[None], k.repeat_interleave(rep, 0)[None], v.repeat_interleave(rep, 0)[None],
                is_causal=True, scale=self.scale)[0]  # [H, T, D]
            x = x + F.linear(attn.transpose(0, 1).reshape(T, H * D), layer["o"])
            x = self._mlp(x, layer)
        seq.cache_len = T
        return self._logits(x[-1:])[0]

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token for each running sequence (slot i = row i); logits [n, vocab]."""
        w = self.w
        n, H, KV, D = tokens.shape[0], w.n_heads, w.n_kv, w.head_dim
        rep = H // KV
        L = int(positions.max()) + 1  # longest valid cache length after this step
        # Flat row of (slot, kv head, position) in a layer's cache viewed as [-1, head_dim]:
        # index_copy_ there is far cheaper than advanced-index assignment.
        cache_rows = ((torch.arange(n)[:, None] * KV + torch.arange(KV)[None, :]) * self.capacity
                      + positions[:, None]).reshape(-1)
        # Additive mask: slot i attends to cache positions <= its own position (its history
        # + this token). A float mask is a little faster than a bool one in CPU SDPA.
        valid = torch.arange(L)[None, :] <= positions[:, None]
        mask = torch.zeros(n, 1, 1, L).masked_fill_(~valid[:, None, None, :], float("-inf"))
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [n, 1, D]
        x = w.embed[tokens]  # [n, hidden]
        for li, layer in enumerate(w.layers):
            h = self._rms(x, layer["ln1"])
            q, k, v = F.linear(h, layer["qkv"]).split([H * D, KV * D, KV * D], dim=-1)
            q = self._rope(q.view(n, H, D), cos, sin)
            k = self._rope(k.view(n, KV, D), cos, sin)
            kc, vc = self.k_cache[li], self.v_cache[li]
            kc.view(-1, D).index_copy_(0, cache_rows, k.reshape(n * KV, D))
            vc.view(-1, D).index_copy_(0, cache_rows, v.reshape(n * KV, D))
            # GQA without repeating K/V: the `rep` query heads of a KV head are its rows.
            attn = F.scaled_dot_product_attention(
                q.view(n, KV, rep, D), kc[:n, :, :L], vc[:n, :, :L],
                attn_mask=mask, scale=self.scale)  # [n, KV, rep, D]
            x = x + F.linear(attn.reshape(n, H * D), layer["o"])
            x = self._mlp(x, layer)
        return self._logits(x)

    # ---------------------------------------------------------------- sampling
    def _init_sampling(self, seq: Sequence) -> None:
        p = seq.params
        if p.repetition_penalty != 1.0:
            seq._seen = torch.zeros(self.w.vocab, dtype=torch.bool)
            seq._seen[torch.tensor(seq.prompt, dtype=torch.long)] = True
        if p.temperature > 0:
            g = torch.Generator()
            if p.seed is None:
                g.seed()
            else:
                g.manual_seed(int(p.seed) & 0xFFFF_FFFF_FFFF_FFFF)
            seq._generator = g

    def _choose(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """Next token per row. Mirrors transformers: RepetitionPenalty, then (sampling
        only) Temperature, TopK, TopP warpers, softmax, multinomial."""
        out = logits.argmax(-1).tolist()
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.repetition_penalty == 1.0 and p.temperature == 0:
                continue  # plain greedy: the batched argmax above
            row = logits[i]
            if p.repetition_penalty != 1.0:
                penalised = torch.where(row < 0, row * p.repetition_penalty,
                                        row / p.repetition_penalty)
                row = torch.where(seq._seen, penalised, row)
            if p.temperature == 0:
                out[i] = int(row.argmax())
                continue
            if p.temperature != 1.0:
                row = row / p.temperature
            if p.top_k > 0:
                k = min(p.top_k, row.shape[-1])
                kth = torch.topk(row, k).values[-1]
                row = row.masked_fill(row < kth, -math.inf)
            if p.top_p < 1.0:
                sorted_logits, sorted_idx = torch.sort(row, descending=False)
                cum = sorted_logits.softmax(-1).cumsum(-1)
                remove_sorted = cum <= (1 - p.top_p)
                remove_sorted[-1:] = False  # keep at least one token
                remove = remove_sorted.scatter(0, sorted_idx, remove_sorted)
                row = row.masked_fill(remove, -math.inf)
            probs = F.softmax(row, dim=-1)
            out[i] = int(torch.multinomial(probs, 1, generator=seq._generator))
        return out
