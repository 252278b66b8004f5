"""Streaming text from token ids: incremental detokenization and stop sequences.

`IncrementalDetokenizer` emits only text that can no longer change: a token that ends in
the middle of a UTF-8 character (decoded as U+FFFD) or whose spacing depends on the next
token is held back until the text is settled (the prefix-offset method used by TGI and vLLM).

`StopMatcher` finds stop sequences across deltas and holds back any tail that could still
become one, so that a stop sequence never leaks into the output, even in part.
"""

from __future__ import annotations

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
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""  # everything decoded so far
        self.emitted = 0  # chars of `text` already released to the caller
        self.stopped = False
        self.matched = ""  # the stop sequence found (the earliest in the text)

    def feed(self, delta: str) -> str:
        """Adds decoded text; returns what may be released now. After a stop sequence is
        found, `stopped` is True and nothing more is released."""
        if self.stopped or not delta:
            return ""
        self.text += delta
        longest = max((len(s) for s in self.stops), default=0)
        search_from = max(0, self.emitted - longest + 1)
        hits = [(i, s) for i, s in ((self.text.find(s, search_from), s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            end, self.matched = min(hits, key=lambda hit: hit[0])
        else:
            end = len(self.text) - self._held_back()
        released = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        if self.stopped:
            self.text = self.text[:end]
        return released

    def flush(self) -> str:
        """At the end of the sequence: a held-back tail that did not become a stop sequence."""
        if self.stopped:
            return ""
        released = self.text[self.emitted :]
        self.emitted = len(self.text)
        return released

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop sequence."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), best, -1):
                if self.text.endswith(stop[:n]):
                    best = n
                    break
        return best
