"""Streaming text from token ids: incremental detokenization and stop sequences.

`IncrementalDetokenizer` emits only text that can no longer change: a token that ends in
the middle of a UTF-8 character (decoded as U+FFFD) or whose spacing depends on the next
token is held back until the text is settled (the prefix-offset method used by TGI and vLLM).

`StopMatcher` finds stop sequences across deltas and holds back any tail that could still
become one, so that a stop sequence never leaks into the output, even in part.
"""

from __future__ import annotations

import itertools
from collections import deque

from tokenizers import Tokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Appends one token; returns the text that is now settled (may be "")."""
        self.tokens.append(token)
        prefix_text = self._decode(self.tokens[self._prefix_offset : self._read_offset])
        new_text = self._decode(self.tokens[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.tokens)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """What is left at the end of the sequence (a trailing partial character is dropped)."""
        prefix_text = self._decode(self.tokens[self._prefix_offset : self._read_offset])
        rest = self._decode(self.tokens[self._prefix_offset :])[len(prefix_text) :]
        self._prefix_offset = self._read_offset = len(self.tokens)
        return rest.rstrip("\ufffd")


class StopMatcher:
    """Aho-Corasick over the stop sequences, fed one character at a time: the work per
    delta is linear in the delta (amortised), whatever the stops' lengths. The automaton's
    state is the longest tail of the text that is a prefix of some stop sequence, which is
    exactly what must be held back. Of several matches, the one starting earliest in the text
    wins (ties: the first in `stops`), as `str.find` over the whole text would choose."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending: deque[str] = deque()  # characters decoded, not yet released (the held-back tail)
        self.stopped = False
        self.matched = ""  # the stop sequence found (the earliest in the text)
        self._longest = max((len(s) for s in self.stops), default=0)
        self._build()
        self._state = 0

    def _build(self) -> None:
        # Node 0 is the root. goto: per node, char -> node; fail: the longest proper suffix
        # that is a node; depth: the node's length; out: the best stop ending at the node
        # (the longest, i.e. the earliest start; ties by order in `stops`), as (length, index).
        self._goto: list[dict[str, int]] = [{}]
        self._fail = [0]
        self._depth = [0]
        self._out: list[tuple[int, int] | None] = [None]
        for index, stop in enumerate(self.stops):
            node = 0
            for char in stop:
                nxt = self._goto[node].get(char)
                if nxt is None:
                    nxt = len(self._goto)
                    self._goto.append({})
                    self._fail.append(0)
                    self._depth.append(self._depth[node] + 1)
                    self._out.append(None)
                    self._goto[node][char] = nxt
                node = nxt
            if self._out[node] is None:  # a repeated stop keeps its first index
                self._out[node] = (len(stop), index)
        queue = list(self._goto[0].values())
        for node in queue:  # breadth first: a node's fail link is set before its children's
            for char, child in self._goto[node].items():
                fail = self._fail[node]
                while fail and char not in self._goto[fail]:
                    fail = self._fail[fail]
                target = self._goto[fail].get(char, 0)
                self._fail[child] = target if target != child else 0
                inherited = self._out[self._fail[child]]
                if self._out[child] is None:
                    self._out[child] = inherited  # a shorter stop that is a suffix of this one
                queue.append(child)

    def _step(self, char: str) -> int:
        state, goto, fail = self._state, self._goto, self._fail
        while state and char not in goto[state]:
            state = fail[state]
        state = goto[state].get(char, 0)
        self._state = state
        return state

    def feed(self, delta: str) -> str:
        """Adds decoded text; returns what may be released now. After a stop sequence is
        found, `stopped` is True and nothing more is released."""
        if self.stopped or not delta:
            return ""
        if not self.stops:
            return delta
        pending = self._pending
        base = len(pending)  # delta's chars are at base + i in pending
        pending.extend(delta)
        best: tuple[int, int] | None = None  # (start in text, index in stops)
        for i, char in enumerate(delta):
            position = base + i
            if best is not None and position - self._longest + 1 > best[0]:
                break  # no later match can start before the one found
            out = self._out[self._step(char)]
            if out is not None:
                length, index = out
                candidate = (position - length + 1, index)
                if best is None or candidate < best:
                    best = candidate
        if best is not None:
            self.stopped = True
            start, index = best
            self.matched = self.stops[index]
            released = "".join(itertools.islice(pending, start))
            pending.clear()
            return released
        keep = self._depth[self._state]  # the tail that may still become a stop sequence
        # Only what leaves the buffer is touched: linear in the text, not in the stops' length.
        return "".join(pending.popleft() for _ in range(len(pending) - keep))

    def flush(self) -> str:
        """At the end of the sequence: a held-back tail that did not become a stop sequence."""
        if self.stopped:
            return ""
        released = "".join(self._pending)
        self._pending.clear()
        self._state = 0
        return released
