"""The engine's KV cache: one K and one V tensor, a slot per running sequence."""

from __future__ import annotations

from llama import Llama


class KVSlots:
    """The KV cache: slot i holds running sequence i; capacity grows by doubling."""

    def __init__(self, model: Llama, slots: int, capacity: int):
        self.model, self.slots = model, slots
        self.capacity = 0
        self.k = self.v = None
        self.ensure(capacity)

    def ensure(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        cap = max(self.capacity, 256)
        while cap < needed:
            cap *= 2
        cap = min(cap, self.model.context_length)
        k, v = self.model.new_cache(self.slots, cap)
        if self.capacity:
            k[:, :, :, :self.capacity] = self.k
            v[:, :, :, :self.capacity] = self.v
        self.k, self.v, self.capacity = k, v, cap

    def move(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
