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
from ragserve_server.model_config import TensorSpec

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
)
OUTPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("output_ids", "TYPE_INT32", (-1, -1), comment="[beams, new tokens] per response"),
    TensorSpec("sequence_length", "TYPE_INT32", (-1,), comment="[beams]: tokens in this response"),
)
OUTPUT_NAMES: tuple[str, ...] = tuple(t.name for t in OUTPUTS)

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
    # Prompt tokens prefilled per engine step before the running batch decodes again.
    "prefill_tokens_per_step": "512",
    # torch intra-op threads; "0" = torch default.
    "num_threads": "2",
    # Weights folder, relative to the model's directory unless absolute (read by model.py).
    "hf_dir": "1/hf",
}

STOP, LENGTH = "stop", "length"

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

    OPTIONAL = ("temperature", "top_p", "top_k", "repetition_penalty", "seed")

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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _at_least(value: float, floor: float) -> bool:
    """Compared in float32, the proto's type: a caller sending the floor itself sends its float32, a hair off."""
    return bool(np.float32(value) >= np.float32(floor))


def request_tensors(prompt_ids: Sequence[int], sampling: Sampling, end_id: int) -> dict[str, np.ndarray]:
    """One request's input tensors, each with its batch dimension of 1, dtypes from `INPUTS`."""
    seed = sampling.seed if sampling.seed is not None else random.getrandbits(64)
    values = {
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
    return {spec.name: np.asarray(values[spec.name], dtype=spec.numpy_dtype) for spec in INPUTS}


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


def finish_reason(*, completion_tokens: int, max_tokens: int, ended_by_end_id: bool) -> str:
    """STOP or LENGTH at the end of a sequence, from what TensorRT-LLM reports.

    An end id ends the sequence before `max_tokens` (the end id itself is not returned, so
    even an end id as the last allowed token leaves the count below `max_tokens`); an engine
    that does return an end id (`ended_by_end_id`) stopped too. A full count is LENGTH.
    """
    if ended_by_end_id or completion_tokens < max_tokens:
        return STOP
    return LENGTH
