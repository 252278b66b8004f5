"""The generation engine's settings, read from its config.pbtxt parameters."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class EngineConfig:
    """The engine's settings: the generation model's config.pbtxt parameters of the same
    names (all required there: the deployment's table, ragserve_server.models.generation_contract
    ENGINE_PARAMETERS, is the only place their values live)."""

    max_running_sequences: int  # sequences decoding together
    max_kv_tokens: int  # budget: sum over running sequences of prompt + max_tokens
    max_waiting: int  # queued beyond the free slots; more is RESOURCE_EXHAUSTED
    context_length: int  # prompt + max_tokens per sequence; 0 = the checkpoint's own
    prefill_tokens_per_step: int  # prompt tokens prefilled per step before the batch decodes
    chunked_prefill: int  # 1: a longer prompt goes on in the next steps; 0: prompts prefilled whole
    prefill_whole_tokens: int  # chunked: a prompt this short is prefilled whole, as a step's first prefill
    num_threads: int  # torch intra-op threads; 0 = torch's default
    device: str  # "cpu" (fp32) or "cuda" (fp16)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or value < 0):
                raise ValueError(f"engine parameter {f.name} must be an integer >= 0, got {value!r}")
        for name in ("max_running_sequences", "max_kv_tokens", "prefill_tokens_per_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine parameter {name} must be >= 1, got {getattr(self, name)}")
        if self.chunked_prefill not in (0, 1):
            raise ValueError(f"engine parameter chunked_prefill must be 0 or 1, got {self.chunked_prefill}")
        if self.device not in DEVICES:
            raise ValueError(f"engine parameter device must be one of {', '.join(DEVICES)}, got {self.device!r}")

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> "EngineConfig":
        """From Triton's string parameters; every field is required and unknown keys are refused."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in parameters]
        unknown = sorted(set(parameters) - set(names))
        if missing or unknown:
            raise ValueError("engine parameters: " + "; ".join(
                ([f"missing {', '.join(missing)}"] if missing else [])
                + ([f"unknown {', '.join(unknown)}"] if unknown else [])))
        values = {}
        for f in dataclasses.fields(cls):
            raw = str(parameters[f.name]).strip()
            if f.type == "int":
                try:
                    values[f.name] = int(raw or 0)
                except ValueError:
                    raise ValueError(f"engine parameter {f.name} must be an integer, got {raw!r}") from None
            else:
                values[f.name] = raw
        return cls(**values)

    def torch_device(self, index: int | None = None) -> torch.device:
        """The engine's device; on CUDA, GPU `index` (the Triton instance's device id)."""
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                "engine parameter device is 'cuda' but PyTorch sees no CUDA device "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                "run on a GPU machine with a CUDA build of torch, or set device to 'cpu'")
        if self.device == "cuda" and index is not None:
            return torch.device("cuda", index)
        return torch.device(self.device)


def instance_device_index(args: Mapping[str, str]) -> int | None:
    """The GPU of a Triton model instance (the python backend's initialize args): Triton
    places one KIND_GPU instance per GPU and says which in model_instance_device_id; None for
    a CPU instance."""
    if str(args.get("model_instance_kind", "")).upper() != "GPU":
        return None
    return int(args.get("model_instance_device_id", "0") or 0)
