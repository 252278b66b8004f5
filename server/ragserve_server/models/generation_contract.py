"""The tensors the gateway exchanges with the generation model: TensorRT-LLM's contract.

The table follows Triton's TensorRT-LLM backend, the `tensorrt_llm` model of
triton-inference-server/tensorrtllm_backend, file
`all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt` at commit
c2e65b88d85255be30cf50440a91662abeb497dd (2025-05-13, the last version kept in that
repository before the backend moved into NVIDIA/TensorRT-LLM under `triton_backend/`).
Names, dtypes, dims, `reshape`, `optional` and `allow_ragged_batch` are copied as they are
there, for the subset of inputs the gateway sends and the outputs it reads; a TensorRT-LLM
engine deployed under the generation model's Triton name (`decoupled: true`,
`max_batch_size > 0`) therefore serves Generate with no gateway change. The CPU engine
(model_repository/smollm2/1/model.py) implements the same tensors.

How our API maps onto it (`request_tensors`):
- greedy (`temperature == 0`) is `runtime_top_k = 1` with a neutral `temperature = 1.0`:
  TensorRT-LLM's documented greedy setting;
- sampling sends `temperature`, `runtime_top_k` (0 = off) and `runtime_top_p` (1.0 = off,
  which keeps TensorRT-LLM from falling back to greedy when top-k is off too);
- an unset `seed` becomes a random one per request: TensorRT-LLM's default seed is 0, which
  would make every unseeded request the same;
- `end_id` is the model's (first) end-of-sequence id; TensorRT-LLM stops there and leaves
  the end id out of `output_ids`.
- `stop_token_ids` become `stop_words_list` [1, 2, n]: one single-token word per id (row 0
  the ids, row 1 each word's end offset, TensorRT-LLM's layout); the engine stops after such a
  token and returns it, and the gateway leaves it out of the text and the count;
- `presence_penalty` / `frequency_penalty` are TensorRT-LLM's tensors of the same names
  (OpenAI semantics: over the generated tokens); sent only when not 0;
- `logprobs` is `return_log_probs`; each response then carries `output_log_probs`
  [1, beams, n] (one per new token) and `cum_log_probs` [1, beams].
Extensions of ours (`EXTENSIONS`; optional, sent or asked for only when a request uses them):
TensorRT-LLM's Triton backend has no min-p input and no top-k alternatives, so `min_p` FP32
and `num_top_logprobs` INT32 are inputs of ours, and `top_logprobs_ids` INT32 / `top_logprobs`
FP32 [1, beams, n, k] outputs of ours. A TensorRT-LLM deployment declares none of them: the
start-up check accepts it (they are optional), and a request that uses min_p or
top_logprobs is refused by its Triton (INVALID_ARGUMENT, "unexpected inference input").
Scoring (ours, for the LLM rerankers: services/rerank_llm.py): `candidate_token_ids` INT32 [N]
makes a request prefill-only: no token is generated, and one final response carries
`candidate_logits` FP32 [1, N], the raw logits of those ids at the prompt's last position
(`score_tensors`, `response_candidate_logits`). TensorRT-LLM gets the same numbers from
`return_generation_logits` (`generation_logits` [1, beams, 1, vocab] with
`request_output_len` 1: the first generated position is the one after the prompt) or from
`return_context_logits` (`context_logits` [1, prompt, vocab], its last row); both return the
whole vocabulary per request, so a gateway for such a deployment gathers the candidate ids
itself. README "LLM rerankers" says more.
TensorRT-LLM has no finish reason: `finish_reason` derives it from the final response, the
end ids and the token count. Stop strings are not expressible as token ids in general and
stay in the gateway (detokenizer.StopMatcher), which ends the Triton call on a match.
Each streamed response carries the new tokens only: `output_ids` [1, beams, n] with
`sequence_length` [1, beams] = n.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ragserve_server.errors import InvalidInput
from ragserve_server.models.model_config import TensorSpec

SOURCE = (
    "triton-inference-server/tensorrtllm_backend@c2e65b88d85255be30cf50440a91662abeb497dd:"
    "all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt"
)

# Rows Triton may hand the model in one execute call. The gateway sends one row per request;
# an in-flight batching engine takes each request as it comes.
MAX_BATCH_SIZE = 64

_SCALAR = dict(dims=(1,), reshape=())
INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("input_ids", "TYPE_INT32", (-1,), optional=True, allow_ragged_batch=True, comment="prompt token ids, chat template applied"),
    TensorSpec("input_lengths", "TYPE_INT32", **_SCALAR, comment="number of prompt token ids"),
    TensorSpec("request_output_len", "TYPE_INT32", **_SCALAR, comment="max_tokens"),
    TensorSpec("end_id", "TYPE_INT32", **_SCALAR, optional=True, comment="generation stops here; not returned"),
    TensorSpec("streaming", "TYPE_BOOL", **_SCALAR, optional=True, comment="one response per step"),
    TensorSpec("temperature", "TYPE_FP32", **_SCALAR, optional=True),
    TensorSpec("runtime_top_k", "TYPE_INT32", **_SCALAR, optional=True, comment="0 = off; 1 = greedy"),
    TensorSpec("runtime_top_p", "TYPE_FP32", **_SCALAR, optional=True, comment="<= 0 = off"),
    TensorSpec("repetition_penalty", "TYPE_FP32", **_SCALAR, optional=True),
    TensorSpec("seed", "TYPE_UINT64", **_SCALAR, optional=True, comment="named random_seed before 2025-05"),
    TensorSpec("stop_words_list", "TYPE_INT32", (2, -1), optional=True, allow_ragged_batch=True, comment="stop_token_ids: [ids; end offsets]"),
    TensorSpec("presence_penalty", "TYPE_FP32", **_SCALAR, optional=True),
    TensorSpec("frequency_penalty", "TYPE_FP32", **_SCALAR, optional=True),
    TensorSpec("return_log_probs", "TYPE_BOOL", **_SCALAR, optional=True, comment="output_log_probs and cum_log_probs"),
    TensorSpec("min_p", "TYPE_FP32", **_SCALAR, optional=True, comment="ragserve extension; 0 = off"),
    TensorSpec("num_top_logprobs", "TYPE_INT32", **_SCALAR, optional=True, comment="ragserve extension: alternatives per token"),
    TensorSpec("candidate_token_ids", "TYPE_INT32", (-1,), optional=True, allow_ragged_batch=True, comment="ragserve extension: prefill only, logits of these ids"),
)
OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("output_ids", "TYPE_INT32", (-1, -1), comment="[beams, new tokens] per response"),
    TensorSpec("sequence_length", "TYPE_INT32", (-1,), comment="[beams]: tokens in this response"),
    TensorSpec("cum_log_probs", "TYPE_FP32", (-1,), optional=True, comment="[beams]: sum of the log probs so far"),
    TensorSpec("output_log_probs", "TYPE_FP32", (-1, -1), optional=True, comment="[beams, new tokens]"),
    TensorSpec("top_logprobs_ids", "TYPE_INT32", (-1, -1, -1), optional=True, comment="ragserve extension: [beams, new tokens, k]"),
    TensorSpec("top_logprobs", "TYPE_FP32", (-1, -1, -1), optional=True, comment="ragserve extension: [beams, new tokens, k]"),
    TensorSpec("candidate_logits", "TYPE_FP32", (-1,), optional=True, comment="ragserve extension: [N] logits after the prompt"),
)
# Ours, not TensorRT-LLM's: a TensorRT-LLM deployment has none of these (module docstring).
EXTENSIONS = frozenset({"min_p", "num_top_logprobs", "top_logprobs_ids", "top_logprobs", "candidate_token_ids", "candidate_logits"})
# The outputs every request asks for; `output_names` adds the log-prob ones a request wants.
OUTPUT_NAMES: tuple[str, ...] = ("output_ids", "sequence_length")

# The engine settings this deployment renders into the generation model's config.pbtxt
# (model_repository/smollm2/1/engine.py `EngineConfig` parses them; every key is required
# there, so this table is the only place their values live). `device` is added per variant.
ENGINE_PARAMETERS: dict[str, str] = {
    "max_running_sequences": "16",
    # KV budget: sum over running sequences of prompt + max_tokens.
    "max_kv_tokens": "32768",
    "max_waiting": "64",
    # SmolLM2 was trained at 2048 tokens (its config says 8192); "" = the HF config value.
    "context_length": "2048",
    # Prompt tokens prefilled per engine step; with a running batch, that chunk and the batch's
    # decode are one forward pass (engine.py, mixed step). 32, measured on a 2-CPU machine
    # (bench/generate_bench.py --long-prompt: 8 streams decoding, ~180 ms a step, then a
    # 1,514-token prompt arrives, through Triton and the gateway): the streams' ITL p99 during
    # that prefill is 1.9x their steady p99 (median of 2 rounds; unchunked 22x) for a first
    # token of that prompt at 13.7 s (unchunked 4.7 s); single rounds: 48: 2.3x, 10.7 s;
    # 64: 2.3x, 10.5 s; 128: 2.6x, 5.8 s (128 before the mixed pass: 4.0x).
    "prefill_tokens_per_step": "32",
    # "1": a longer prompt is prefilled in chunks of the above, one per step, between the
    # running batch's decode steps; "0": whole prompts (a long one stalls the batch meanwhile).
    "chunked_prefill": "1",
    # With chunked prefill, a prompt of at most this many tokens (a chat question with its
    # template is ~40) is prefilled whole in one step when it is the step's first prefill:
    # chunked by 32, such prompts took 2 steps each and 16 staggered streams' TTFT p50 was
    # 2.9-4.1 s against 1.7 s with 128-token chunks (bench/generate_bench.py levels).
    "prefill_whole_tokens": "64",
    # torch intra-op threads; "0" = torch default.
    "num_threads": "2",
    # Weights folder, relative to the model's directory unless absolute (read by model.py).
    "hf_dir": "1/hf",
}

# On CUDA (the `torch_cuda` variant) these replace the values above, which were measured on 2
# CPU cores. A GPU decode step of this 135M model costs about the same for 1 or 64 rows (it is
# bound by kernel launches and weight reads, not by rows), so the batch is as wide as Triton's
# max_batch_size; a step with a 512-token prefill chunk stays a few milliseconds, so a
# 1,500-token prompt takes 3 steps to its first token instead of ~47 with 32-token chunks.
# The KV budget is every slot at the full context: 64 x 2048 tokens x 30 layers x 3 KV heads
# x 64 dims x 2 (K, V) x 2 bytes = 3 GiB of fp16 cache at most (it grows with the longest request).
# Not yet measured on a GPU (issue 24: bench/gpu_check.sh when a device is lent).
ENGINE_PARAMETERS_CUDA: dict[str, str] = {
    "max_running_sequences": str(MAX_BATCH_SIZE),
    "max_kv_tokens": str(MAX_BATCH_SIZE * int(ENGINE_PARAMETERS["context_length"])),
    "max_waiting": "256",
    "prefill_tokens_per_step": "512",
    "prefill_whole_tokens": "512",
}


def engine_parameters(device: str) -> dict[str, str]:
    """The engine's config.pbtxt parameters on `device` ("cpu" or "cuda"), `device` included."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"engine device must be cpu or cuda, got {device!r}")
    return {**ENGINE_PARAMETERS, **(ENGINE_PARAMETERS_CUDA if device == "cuda" else {}), "device": device}

# Finish reasons, named as in our API (FinishReason): STOP is the end of sequence.
STOP, LENGTH, STOP_SEQUENCE, CANCELLED = "stop", "length", "stop_sequence", "cancelled"

# OpenAI's ranges.
PENALTY_RANGE = (-2.0, 2.0)
MAX_TOP_LOGPROBS = 20
MAX_STOP_TOKEN_IDS = 16

# Far below these, logits / temperature (and a seen token's logit / repetition_penalty)
# overflow to inf and the sampler's softmax turns to NaN (vLLM floors temperature at 0.01 for
# the same reason); at these floors logits of +-60 stay within fp16.
MIN_TEMPERATURE = 1e-3
MIN_REPETITION_PENALTY = 1e-3


@dataclass(frozen=True)
class Sampling:
    """Our API's sampling settings; the defaults of the optional request fields live here."""

    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # 1 = off
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None  # None = a random seed per request
    presence_penalty: float = 0.0  # 0 = off
    frequency_penalty: float = 0.0  # 0 = off
    min_p: float = 0.0  # 0 = off
    top_logprobs: int = 0  # alternatives per token; needs logprobs
    logprobs: bool = False
    stop_token_ids: tuple[int, ...] = ()

    # The request's `optional` fields, set only when present (their defaults: above).
    OPTIONAL = ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "presence_penalty", "frequency_penalty", "min_p", "top_logprobs")

    def validate(self) -> None:
        """The API's range checks (TensorRT-LLM's SamplingConfig checks the same ranges)."""
        if not (math.isfinite(self.temperature) and (self.temperature == 0 or _at_least(self.temperature, MIN_TEMPERATURE))):
            raise InvalidInput(
                f"temperature must be >= 0: 0 for greedy, else at least {MIN_TEMPERATURE} (smaller values overflow "
                f"the sampler), got {self.temperature}"
            )
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise InvalidInput(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidInput(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not (math.isfinite(self.repetition_penalty) and _at_least(self.repetition_penalty, MIN_REPETITION_PENALTY)):
            raise InvalidInput(
                f"repetition_penalty must be > 0 (1 = none) and at least {MIN_REPETITION_PENALTY} (smaller values "
                f"overflow the sampler), got {self.repetition_penalty}"
            )
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise InvalidInput(f"seed must be in [0, 2**64), got {self.seed}")
        low, high = PENALTY_RANGE
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and low <= value <= high):
                raise InvalidInput(f"{name} must be in [{low:g}, {high:g}] (0 = off), got {value}")
        if not (math.isfinite(self.min_p) and 0 <= self.min_p <= 1):
            raise InvalidInput(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidInput(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise InvalidInput(f"top_logprobs ({self.top_logprobs}) needs logprobs: set logprobs to true")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidInput(f"stop_token_ids holds {len(self.stop_token_ids)} ids, at most {MAX_STOP_TOKEN_IDS}")

    def check_vocabulary(self, vocab_size: int) -> None:
        """Token ids the request names must be the model's."""
        for index, token in enumerate(self.stop_token_ids):
            if not 0 <= token < vocab_size:
                raise InvalidInput(f"stop_token_ids[{index}] is {token}, the model's token ids are in [0, {vocab_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _at_least(value: float, floor: float) -> bool:
    """Compared in float32, the proto's type: a caller sending the floor itself sends its float32, a hair off."""
    return bool(np.float32(value) >= np.float32(floor))


def request_tensors(prompt_ids: Sequence[int], sampling: Sampling, end_id: int) -> dict[str, np.ndarray]:
    """One request's input tensors, each with its batch dimension of 1, dtypes from `INPUTS`.

    The optional controls beyond TensorRT-LLM's basic sampling are sent only when a request
    uses them, so a deployment without an extension serves every request that does not."""
    seed = sampling.seed if sampling.seed is not None else random.getrandbits(64)
    values: dict[str, object] = {
        "input_ids": [list(prompt_ids)],
        "input_lengths": [[len(prompt_ids)]],
        "request_output_len": [[sampling.max_tokens]],
        "end_id": [[end_id]],
        "streaming": [[True]],
        "temperature": [[1.0 if sampling.greedy else sampling.temperature]],
        "runtime_top_k": [[1 if sampling.greedy else sampling.top_k]],
        "runtime_top_p": [[sampling.top_p]],
        "repetition_penalty": [[sampling.repetition_penalty]],
        "seed": [[seed]],
    }
    if sampling.stop_token_ids:
        ids = list(sampling.stop_token_ids)
        values["stop_words_list"] = [[ids, list(range(1, len(ids) + 1))]]
    if sampling.presence_penalty:
        values["presence_penalty"] = [[sampling.presence_penalty]]
    if sampling.frequency_penalty:
        values["frequency_penalty"] = [[sampling.frequency_penalty]]
    if sampling.logprobs:
        values["return_log_probs"] = [[True]]
    if sampling.min_p:
        values["min_p"] = [[sampling.min_p]]
    if sampling.top_logprobs:
        values["num_top_logprobs"] = [[sampling.top_logprobs]]
    return {spec.name: np.asarray(values[spec.name], dtype=spec.numpy_dtype) for spec in INPUTS if spec.name in values}


def output_names(sampling: Sampling) -> tuple[str, ...]:
    """The outputs to ask for: the log-prob ones only when the request wants them."""
    names = OUTPUT_NAMES
    if sampling.logprobs:
        names += ("output_log_probs", "cum_log_probs")
    if sampling.top_logprobs:
        names += ("top_logprobs_ids", "top_logprobs")
    return names


# A scoring request's outputs (the empty output_ids keep `cancelled_by_server` meaningful).
SCORE_OUTPUT_NAMES: tuple[str, ...] = OUTPUT_NAMES + ("candidate_logits",)


def score_tensors(prompt_ids: Sequence[int], candidates: Sequence[int]) -> dict[str, np.ndarray]:
    """A prefill-only request: the logits of `candidates` at the position after the prompt.
    `request_output_len` is required by the contract; 1 is what TensorRT-LLM would need."""
    values: dict[str, object] = {
        "input_ids": [list(prompt_ids)],
        "input_lengths": [[len(prompt_ids)]],
        "request_output_len": [[1]],
        "candidate_token_ids": [list(candidates)],
    }
    return {spec.name: np.asarray(values[spec.name], dtype=spec.numpy_dtype) for spec in INPUTS if spec.name in values}


def response_candidate_logits(outputs: Mapping[str, np.ndarray], n: int) -> np.ndarray | None:
    """The `n` candidate logits of a scoring request's final response (None: absent or short)."""
    logits = outputs.get("candidate_logits")
    if logits is None or logits.size != n:
        return None
    return logits.reshape(n).astype(np.float64)


@dataclass(frozen=True)
class TokenLogprobs:
    """One generated token's log probability and its most likely alternatives (best first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def response_logprobs(outputs: Mapping[str, np.ndarray], tokens: Sequence[int]) -> list[TokenLogprobs]:
    """The log probs of one response's new `tokens` (first beam); [] when it carries none."""
    logprobs = outputs.get("output_log_probs")
    if logprobs is None or logprobs.size == 0 or not tokens:
        return []
    n = len(tokens)
    values = logprobs.reshape(-1, logprobs.shape[-1])[0][:n].tolist()
    ids, top = outputs.get("top_logprobs_ids"), outputs.get("top_logprobs")
    alternatives: list[tuple[tuple[int, float], ...]] = [()] * n
    if ids is not None and top is not None and ids.size:
        k = ids.shape[-1]
        ids, top = ids.reshape(-1, ids.shape[-2], k)[0][:n], top.reshape(-1, top.shape[-2], k)[0][:n]
        alternatives = [tuple(zip(i.tolist(), v.tolist())) for i, v in zip(ids, top)]
    return [TokenLogprobs(t, v, a) for t, v, a in zip(tokens, values, alternatives)]


def response_tokens(outputs: Mapping[str, np.ndarray]) -> list[int]:
    """The new token ids of one streamed response (first beam; `sequence_length` bounds them)."""
    ids = outputs.get("output_ids")
    if ids is None or ids.size == 0:
        return []
    rows = ids.reshape(int(np.prod(ids.shape[:-1], dtype=np.int64)), ids.shape[-1])
    tokens = rows[0]
    lengths = outputs.get("sequence_length")
    if lengths is not None and lengths.size:
        tokens = tokens[: int(lengths.reshape(-1)[0])]
    return tokens.tolist()


def cancelled_by_server(outputs: Mapping[str, np.ndarray], final: bool) -> bool:
    """A final response without any tensor: the model closed the request without finishing it
    (the CPU engine's answer to a request Triton cancelled). A finished sequence's final
    response always carries `output_ids`, empty when it ended on the end id."""
    return final and "output_ids" not in outputs


def finish_reason(*, completion_tokens: int, max_tokens: int, ended_by_end_id: bool) -> str:
    """STOP or LENGTH at the end of a sequence, from what TensorRT-LLM reports.

    An end id ends the sequence before `max_tokens` (the end id itself is not returned, so
    even an end id as the last allowed token leaves the count below `max_tokens`); an engine
    that does return an end id (`ended_by_end_id`) stopped too. A full count is LENGTH.
    """
    if ended_by_end_id or completion_tokens < max_tokens:
        return STOP
    return LENGTH
