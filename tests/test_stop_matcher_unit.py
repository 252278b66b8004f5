"""StopMatcher (generation/detokenizer.py): the same releases as the plain quadratic matcher it
replaced, for any stops and any way the text is cut into deltas; and linear time in the text
with long stop strings (the matcher an attacker could slow with 4 stops of 100k characters)."""

from __future__ import annotations

import time

from hypothesis import given, settings, strategies as st

from ragserve_server.generation.detokenizer import StopMatcher


class ReferenceMatcher:
    """The former implementation: find() over the text, hold back the longest stop prefix."""

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.text, self.emitted, self.stopped, self.matched = "", 0, False, ""

    def feed(self, delta):
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
            best = 0
            for stop in self.stops:
                for n in range(min(len(stop) - 1, len(self.text)), best, -1):
                    if self.text.endswith(stop[:n]):
                        best = n
                        break
            end = len(self.text) - best
        released = self.text[self.emitted : end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return released

    def flush(self):
        if self.stopped:
            return ""
        released = self.text[self.emitted :]
        self.emitted = len(self.text)
        return released


ALPHABET = st.sampled_from("abcAB é🚀")


@settings(max_examples=600, deadline=None)
@given(
    stops=st.lists(st.text(ALPHABET, min_size=1, max_size=6), max_size=4),
    deltas=st.lists(st.text(ALPHABET, max_size=8), max_size=12),
)
def test_same_releases_as_the_reference(stops, deltas):
    ours, reference = StopMatcher(stops), ReferenceMatcher(stops)
    for delta in deltas:
        assert ours.feed(delta) == reference.feed(delta)
        assert ours.stopped == reference.stopped
        if ours.stopped:
            assert ours.matched == reference.matched
            break
    assert ours.flush() == reference.flush()


def test_long_stop_strings_cost_linear_time():
    stops = [("x" * 99_999) + tail for tail in "abcd"]  # every delta extends a partial match
    matcher = StopMatcher(stops)
    started = time.process_time()
    released = [matcher.feed("x" * 5) for _ in range(1000)]
    elapsed = time.process_time() - started
    assert not matcher.stopped and "".join(released) == ""  # all held back: it may still become a stop
    assert elapsed < 0.5, f"{elapsed:.3f} s of CPU for 1000 deltas"  # the former matcher: seconds
    assert matcher.feed("y") == "x" * 5000 + "y" and matcher.flush() == ""
