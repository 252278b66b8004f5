"""Bounded admission: a permit is taken before any work, and a full gateway says so at once.

No queueing here: a caller that would wait is answered RESOURCE_EXHAUSTED immediately, the
same way for unary, batch and stream calls; Triton's own queue absorbs bursts below it.
"""

from __future__ import annotations

from ragserve_server.errors import Overloaded


class Admission:
    def __init__(self, max_concurrent: int) -> None:
        self.capacity = max_concurrent
        self.in_use = 0

    def acquire(self) -> None:
        """Takes a permit or raises Overloaded. The event loop is single-threaded: a plain
        counter is race-free."""
        if self.in_use >= self.capacity:
            raise Overloaded(f"server is at capacity ({self.capacity} requests in flight); retry with backoff")
        self.in_use += 1

    def release(self) -> None:
        self.in_use -= 1
