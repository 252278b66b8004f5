"""Per-key quotas: a concurrency share and a token-bucket rate for each key that sets them.

    quotas = KeyQuotas()
    release = quotas.take(entry)   # raises QuotaExceeded (RESOURCE_EXHAUSTED, with a retry hint)
    try: ...                        # the call
    finally: release()

A key's state is kept by its name, so a keys-file reload (which makes new ApiKey objects)
keeps the calls in flight and the bucket's level. The bucket refills continuously at
`rate` calls a second up to `burst`; each call takes one. The retry hint of a rate refusal
is the time until the bucket holds one call again; of a concurrency refusal, a short fixed
wait (no way to know when a call of this key ends). All on the event loop: no locks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ragserve_server.errors import Overloaded
from ragserve_server.security.keys import ApiKey

CONCURRENCY_RETRY_AFTER = 0.05  # seconds


class QuotaExceeded(Overloaded):
    reason = "key_quota"


@dataclass
class _State:
    in_flight: int = 0
    tokens: float = 0.0
    refilled: float = field(default_factory=time.monotonic)
    primed: bool = False


class KeyQuotas:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._states: dict[str, _State] = {}

    def take(self, key: ApiKey) -> Callable[[], None]:
        """Takes one call of `key`'s quota; returns its release (idempotent)."""
        if key.max_concurrent is None and key.rate is None:
            return _nothing
        state = self._states.get(key.name)
        if state is None:
            state = self._states[key.name] = _State(refilled=self.clock())
        if key.max_concurrent is not None and state.in_flight >= key.max_concurrent:
            raise QuotaExceeded(
                f"the API key {key.name!r} has {state.in_flight} calls running, its share is {key.max_concurrent}",
                retry_after=CONCURRENCY_RETRY_AFTER,
            )
        if key.rate is not None:
            now = self.clock()
            if not state.primed:  # a new key (or a first rate) starts with a full bucket
                state.tokens, state.primed = key.burst, True
            else:
                state.tokens = min(key.burst, state.tokens + (now - state.refilled) * key.rate)
            state.refilled = now
            if state.tokens < 1.0:
                raise QuotaExceeded(
                    f"the API key {key.name!r} is over its rate of {key.rate:g} calls a second (burst {key.burst:g})",
                    retry_after=(1.0 - state.tokens) / key.rate,
                )
            state.tokens -= 1.0
        state.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                state.in_flight -= 1

        return release


def _nothing() -> None:
    pass
