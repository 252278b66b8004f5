"""TensorRT optimization profiles for an encoder: one per gateway length bucket.

The gateway pads every encoder request to a length bucket (`tokenization.bucket_widths`)
and sends at most the model's `max_batch` rows, so the shapes a plan must accept are known
exactly: (1..max_batch, width) for each width. A profile per width, with its opt shape at a
batch that keeps tokens per batch near `OPT_TOKENS`, lets TensorRT tune kernels for each
shape that will really run; Triton picks the matching profile per request.
`scripts/build_engines.py` builds the plan from this list after `check_coverage` passes.

Memory: Triton makes one execution context per listed profile and instance, and TensorRT
sizes each context's activations for the largest shape of ANY profile. So the largest shape,
rows x tokens, is bounded (`MAX_PROFILE_TOKENS`): a model whose `max_batch` rows at its full
length exceed it is refused before building, with the fix (fewer rows per Triton request).
Profile rows cannot be cut per width instead: Triton's dynamic batcher merges requests of one
shape up to `max_batch_size` rows whatever their width, so every profile must take them.
"""

from __future__ import annotations

from dataclasses import dataclass

from ragserve_server.models.registry import ModelSpec
from ragserve_server.models.buckets import bucket_widths

# Tokens per batch TensorRT tunes for at each width: 64 rows of 16..128 tokens, 32 of 256.
OPT_TOKENS = 8192
# The most rows x tokens one batch of a plan may hold: 64 rows of 512 tokens (a 512-token
# cross-encoder at the default max_batch). all-MiniLM-L6-v2 uses half (64 x 256).
MAX_PROFILE_TOKENS = 32768


@dataclass(frozen=True)
class Profile:
    """Shapes (batch, tokens) of the token inputs: min <= opt <= max, element-wise."""

    min: tuple[int, int]
    opt: tuple[int, int]
    max: tuple[int, int]

    def covers(self, shape: tuple[int, int]) -> bool:
        return all(lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max))


def profile_plan(spec: ModelSpec) -> list[Profile]:
    profiles = []
    previous = 0
    for width in bucket_widths(spec.max_input_tokens):
        opt_batch = max(1, min(spec.max_batch, OPT_TOKENS // width))
        if width in _exact_widths(spec):
            profiles.append(Profile((1, width), (opt_batch, width), (spec.max_batch, width)))
        else:  # past the last bucket the gateway sends the real length: one range profile
            profiles.append(Profile((1, previous + 1), (opt_batch, width), (spec.max_batch, width)))
        previous = width
    return profiles


def _exact_widths(spec: ModelSpec) -> set[int]:
    from ragserve_server.models.buckets import BUCKETS

    return {min(b, spec.max_input_tokens) for b in BUCKETS}


def required_shapes(spec: ModelSpec) -> list[tuple[int, int]]:
    """The corner shapes every plan must accept: 1 and max_batch rows at each bucket width
    (and, past the last bucket, at its first and last length)."""
    shapes = []
    previous = 0
    exact = _exact_widths(spec)
    for width in bucket_widths(spec.max_input_tokens):
        lengths = (width,) if width in exact else (previous + 1, width)
        shapes += [(rows, length) for length in lengths for rows in (1, spec.max_batch)]
        previous = width
    return shapes


def max_rows(spec: ModelSpec) -> int:
    """The most rows per Triton request a plan of this model may take (MAX_PROFILE_TOKENS)."""
    return max(1, MAX_PROFILE_TOKENS // max(bucket_widths(spec.max_input_tokens)))


def check_coverage(spec: ModelSpec, profiles: list[Profile]) -> None:
    """Raises ValueError naming the model, the uncovered or oversized shape and the fix."""
    widest = max(bucket_widths(spec.max_input_tokens))
    if spec.max_batch * widest > MAX_PROFILE_TOKENS:
        raise ValueError(
            f"model {spec.name!r}: {spec.max_batch} rows x {widest} tokens = {spec.max_batch * widest} tokens per batch, "
            f"more than a TensorRT profile may hold ({MAX_PROFILE_TOKENS}; every execution context is sized for the "
            f"largest profile): export it with --max-batch {max_rows(spec)} (or lower max_input_tokens) in its registry entry"
        )
    for profile in profiles:
        if profile.max[0] * profile.max[1] > MAX_PROFILE_TOKENS:
            raise ValueError(f"model {spec.name!r}: profile {profile} holds more than {MAX_PROFILE_TOKENS} tokens per batch")
    for profile in profiles:
        if not all(lo <= opt <= hi for lo, opt, hi in zip(profile.min, profile.opt, profile.max)):
            raise ValueError(f"model {spec.name!r}: profile {profile} is not ordered min <= opt <= max")
    for shape in required_shapes(spec):
        if not any(p.covers(shape) for p in profiles):
            raise ValueError(
                f"model {spec.name!r}: no TensorRT optimization profile covers shape (rows={shape[0]}, "
                f"tokens={shape[1]}) that the gateway sends for its {shape[1]}-token bucket; add a profile "
                f"for it (server/ragserve_server/models/tensorrt_profiles.py) or lower max_batch / max_input_tokens in the registry"
            )
