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
or in any batch. Plain greedy rows of a step share one batched argmax.
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
        out = logits.argmax(-1).tolist()
        for i, state in enumerate(states):
            if state.plain_greedy:
                continue  # the batched argmax above
            p = state.params
            row = logits[i]
            if state.seen is not None:
                penalised = torch.where(row < 0, row * p.repetition_penalty, row / p.repetition_penalty)
                row = torch.where(state.seen, penalised, row)
            if state.counts is not None:
                row = row - p.frequency_penalty * state.counts - p.presence_penalty * (state.counts > 0).to(row.dtype)
            if p.greedy:
                out[i] = int(row.argmax())
            else:
                out[i] = self._sample(row, state)
            if p.logprobs:
                state.last = self._logprobs(logits[i], out[i], p.top_logprobs)
        return out

    @staticmethod
    def _logprobs(raw: torch.Tensor, token: int, k: int) -> TokenLogprobs:
        logprobs = torch.log_softmax(raw.float(), dim=-1)
        if not k:
            return TokenLogprobs(float(logprobs[token]))
        top = torch.topk(logprobs, k)
        return TokenLogprobs(float(logprobs[token]), tuple(top.indices.tolist()), tuple(top.values.tolist()))

    @staticmethod
    def _sample(row: torch.Tensor, state: SamplingState) -> int:
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
            remove_sorted[-1:] = False  # keep at least one token
            remove = remove_sorted.scatter(0, sorted_idx, remove_sorted)
            row = row.masked_fill(remove, -math.inf)
        probs = F.softmax(row, dim=-1)
        return int(torch.multinomial(probs, 1, generator=state.generator))
