"""Length buckets: the padded widths encoder requests are sent at.

Padding to a few widths lets Triton batch requests of different lengths together (its
dynamic batcher only groups requests whose tensors have the same shape); the TensorRT
profiles are cut at the same widths.
"""

from __future__ import annotations

BUCKETS = (16, 32, 64, 128, 256, 512)


def bucket_length(length: int, max_tokens: int) -> int:
    """The padded length for a sequence: the smallest bucket that holds it."""
    for size in BUCKETS:
        if length <= size:
            return min(size, max(max_tokens, length))
    return length


def bucket_widths(max_tokens: int) -> list[int]:
    """Every padded width `bucket_length` gives for a model: its buckets up to the limit, and
    the limit itself where it lies past the last bucket (lengths there are sent unpadded)."""
    widths = sorted({min(size, max_tokens) for size in BUCKETS})
    if max_tokens > BUCKETS[-1]:
        widths.append(max_tokens)
    return widths
