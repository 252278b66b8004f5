"""Per-sequence token selection for the in-flight batching engine.

`SamplingParams` holds what a request asked for, in the terms of TensorRT-LLM's request
tensors (the generation contract; see model.py): its field defaults are what the engine uses
for an absent tensor, the same as TensorRT-LLM's, and `validate` holds the range checks
(TensorRT-LLM's `SamplingConfig` checks). Both live only here.

`Sampler.choose` picks the next token of every running sequence from its logits, in vLLM's
order (penalties, then greedy or temperature and the filters); greedy equality with
transformers depends on steps 1 and 3 only:

0. log probabilities, when asked for: log_softmax of the model's raw logits (before any step
   below, vLLM's "raw_logprobs"): the chosen token's and the `top_logprobs` largest;
1. repetition penalty over the prompt and the generated tokens (logit / p if positive,
   logit * p if negative; transformers' and vLLM's);
2. frequency and presence penalties over the generated tokens only (OpenAI's definition:
   logit - frequency * count - presence * (count > 0));
3. greedy sequences: argmax, done;
4. temperature (logits / t);
5. min-p: drop tokens whose probability is below min_p times the largest (0: off);
6. top-k: keep the k largest logits (k = 0: off);
7. top-p: keep the smallest set of tokens whose probability reaches p (p <= 0 or 1: off);
8. softmax, then one multinomial draw with the sequence's own `torch.Generator`.

A sequence is greedy when `runtime_top_k == 1`, when top-k and top-p are both off (as in
TensorRT-LLM), or when `temperature == 0`. Every sequence has its own generator seeded from
the request (default 0, as in TensorRT-LLM), so a seeded request gives the same tokens alone
or in any batch.

Every step is batched over the rows that need it (one sort for all top-p rows, one top-k,
one softmax), and the only host transfer is the chosen tokens at the end (plus, when asked
for, their log probs): no per-row sync, which on a GPU would wait for the device once per
row. The draw of step 8 is `torch.multinomial`'s own for one sample (an Exp(1) variate per
token from the row's generator, then argmax of probs / variate), so a batch draws exactly
the tokens each row would alone (tests/test_gpu_unit.py checks it against the per-row path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


class RequestError(Exception):
    """A request the engine refuses; ``str()`` starts with the status name and a colon
    (``INVALID_ARGUMENT: ...``, ``RESOURCE_EXHAUSTED: ...``) so callers can map it."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0 = off, 1 = greedy
    top_p: float = 0.0  # <= 0 = off (TensorRT-LLM resets it)
    repetition_penalty: float = 1.0  # 1 = off
    seed: int = 0
    presence_penalty: float = 0.0  # 0 = off
    frequency_penalty: float = 0.0  # 0 = off
    min_p: float = 0.0  # 0 = off (an input of ours, not TensorRT-LLM's)
    logprobs: bool = False  # return_log_probs
    top_logprobs: int = 0  # num_top_logprobs (ours): alternatives per token

    def validate(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise RequestError("INVALID_ARGUMENT", f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise RequestError("INVALID_ARGUMENT", f"runtime_top_k must be >= 0, got {self.top_k}")
        if not (math.isfinite(self.top_p) and self.top_p <= 1):
            raise RequestError("INVALID_ARGUMENT", f"runtime_top_p must be <= 1, got {self.top_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise RequestError("INVALID_ARGUMENT", f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not 0 <= self.seed < 2**64:
            raise RequestError("INVALID_ARGUMENT", f"seed must be in [0, 2**64), got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise RequestError("INVALID_ARGUMENT", f"{name} must be finite, got {value}")
        if not (math.isfinite(self.min_p) and 0 <= self.min_p <= 1):
            raise RequestError("INVALID_ARGUMENT", f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError("INVALID_ARGUMENT",
                               f"num_top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def top_p_on(self) -> bool:
        return 0 < self.top_p < 1

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1 or (self.top_k == 0 and self.top_p <= 0)


@dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token's log probability and the `top_logprobs` largest (ids, values)."""

    logprob: float
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


@dataclass(eq=False)
class SamplingState:
    """What one sequence's sampling carries between steps."""

    params: SamplingParams
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None  # bool [vocab]: tokens seen, for the repetition penalty
    counts: torch.Tensor | None = None  # float [vocab]: generated tokens, for frequency/presence
    plain_greedy: bool = field(init=False)
    last: TokenLogprobs | None = None  # the last chosen token's, when logprobs were asked for

    def __post_init__(self) -> None:
        self.plain_greedy = self.params.greedy and not self.params.penalised and not self.params.logprobs


class Sampler:
    def __init__(self, vocab: int, device: torch.device):
        self.vocab = vocab
        self.device = device

    def start(self, params: SamplingParams, prompt: list[int]) -> SamplingState:
        state = SamplingState(params)
        if params.repetition_penalty != 1.0:
            state.seen = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
            state.seen[torch.tensor(prompt, dtype=torch.long, device=self.device)] = True
        if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            state.counts = torch.zeros(self.vocab, dtype=torch.float32, device=self.device)
        if not params.greedy:
            state.generator = torch.Generator(device=self.device)
            state.generator.manual_seed(params.seed)
        return state

    @staticmethod
    def record(state: SamplingState, token: int) -> None:
        if state.seen is not None:
            state.seen[token] = True
        if state.counts is not None:
            state.counts[token] += 1

    def choose(self, logits: torch.Tensor, states: list[SamplingState]) -> list[int]:
        """Next token per row of `logits` [n, vocab] (fp32), in the order of the module docstring."""
        tokens = logits.argmax(-1)
        rows = [i for i, state in enumerate(states) if not state.plain_greedy]
        if not rows:
            return tokens.tolist()
        special = [states[i] for i in rows]
        index = self._index(rows)
        scores = self._penalise(logits.index_select(0, index), special)
        picked = scores.argmax(-1)
        drawn = [j for j, state in enumerate(special) if not state.params.greedy]
        if drawn:
            at = self._index(drawn)
            picked = picked.index_copy(0, at, self._sample(scores.index_select(0, at), [special[j] for j in drawn]))
        tokens = tokens.index_copy(0, index, picked)
        wanted = [j for j, state in enumerate(special) if state.params.logprobs]
        if wanted:
            self._logprobs(logits.index_select(0, index), picked, [special[j] for j in wanted], wanted)
        return tokens.tolist()

    def _index(self, rows: list[int]) -> torch.Tensor:
        """Row numbers on the device, copied without waiting for the device's queue."""
        return torch.tensor(rows, dtype=torch.long, device="cpu").to(self.device, non_blocking=True)

    def _column(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device="cpu").to(self.device, non_blocking=True)[:, None]

    def _penalise(self, rows: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """Steps 1 and 2; rows without a penalty get neutral values (x / 1, x - 0: unchanged)."""
        if any(state.seen is not None for state in states):
            none = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
            seen = torch.stack([none if state.seen is None else state.seen for state in states])
            factor = self._column([state.params.repetition_penalty if state.seen is not None else 1.0 for state in states])
            rows = torch.where(seen, torch.where(rows < 0, rows * factor, rows / factor), rows)
        if any(state.counts is not None for state in states):
            none = torch.zeros(self.vocab, dtype=torch.float32, device=self.device)
            counts = torch.stack([none if state.counts is None else state.counts for state in states])
            on = [state.counts is not None for state in states]
            frequency = self._column([s.params.frequency_penalty if o else 0.0 for s, o in zip(states, on)])
            presence = self._column([s.params.presence_penalty if o else 0.0 for s, o in zip(states, on)])
            rows = rows - frequency * counts - presence * (counts > 0).to(rows.dtype)
        return rows

    def _logprobs(self, raw: torch.Tensor, picked: torch.Tensor, states: list[SamplingState], wanted: list[int]) -> None:
        """Step 0 for the rows in `wanted`: one log_softmax, one top-k, one transfer."""
        at = self._index(wanted)
        logprobs = torch.log_softmax(raw.index_select(0, at).float(), dim=-1)
        chosen = logprobs.gather(1, picked.index_select(0, at)[:, None])[:, 0].tolist()
        k = max(state.params.top_logprobs for state in states)
        if k:
            top = torch.topk(logprobs, k)
            ids, values = top.indices.tolist(), top.values.tolist()
        for n, state in enumerate(states):
            want = state.params.top_logprobs
            if not want:
                state.last = TokenLogprobs(chosen[n])
            else:
                state.last = TokenLogprobs(chosen[n], tuple(ids[n][:want]), tuple(values[n][:want]))

    def _sample(self, rows: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """Steps 4-8 for sampled rows [m, vocab]; each row with its own parameters and generator."""
        params = [state.params for state in states]
        if any(p.temperature != 1.0 for p in params):
            rows = rows / self._column([p.temperature for p in params])
        if any(p.min_p > 0 for p in params):
            probs = F.softmax(rows, dim=-1)
            floor = self._column([p.min_p for p in params]) * probs.amax(-1, keepdim=True)
            rows = rows.masked_fill(probs < floor, -math.inf)
        if any(p.top_k > 0 for p in params):
            k = min(max(p.top_k for p in params), rows.shape[-1])
            values = torch.topk(rows, k).values
            kth = values.gather(1, self._index([max(0, min(p.top_k, k) - 1) for p in params])[:, None])
            off = self._column([0.0 if p.top_k > 0 else 1.0 for p in params]).bool()
            rows = rows.masked_fill((rows < kth) & ~off, -math.inf)
        nucleus = [j for j, p in enumerate(params) if p.top_p_on]
        if nucleus:
            at = self._index(nucleus)
            part = rows.index_select(0, at)
            sorted_logits, sorted_idx = torch.sort(part, dim=-1, descending=False)
            cum = sorted_logits.softmax(-1).cumsum(-1)
            remove_sorted = cum <= self._column([1 - params[j].top_p for j in nucleus])
            remove_sorted[:, -1] = False  # keep at least one token
            remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
            rows = rows.index_copy(0, at, part.masked_fill(remove, -math.inf))
        probs = F.softmax(rows, dim=-1)
        # torch.multinomial(probs, 1, generator) row by row, without its host sync per row.
        noise = torch.stack([
            torch.empty(rows.shape[-1], dtype=probs.dtype, device=self.device).exponential_(1, generator=state.generator)
            for state in states
        ])
        return (probs / noise).argmax(-1)
