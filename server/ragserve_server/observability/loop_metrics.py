"""Counters, gauges and histograms written by one thread (the event loop) without locks.

prometheus_client's metrics take a lock per update (a histogram observation two: its sum
and its bucket), about 1 us each; a call updates about a dozen. These keep plain Python
numbers that only the event loop writes, and hand them to prometheus_client as metric
families when a scrape collects them (on the metrics server's thread: it only reads, and
reading a number under the GIL sees a whole value). The counts stay exact; the exposition
is prometheus_client's, with the same names, labels and `le` bounds as its own metrics.

Same constructor and `labels(...)` as prometheus_client's Counter, Gauge and Histogram
(what metrics.py uses of them): `labels(*values)` returns a child with `inc` / `dec` /
`set` / `observe`, cached per label values.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

_DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


class _Value:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.value += amount


class _GaugeValue(_Value):
    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class _Observations:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket (not cumulative); the last is +Inf
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1  # the first bound >= amount: `le`
        self.sum += amount


class _Metric(Collector):
    _kind = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *, registry: CollectorRegistry | None = None) -> None:
        self.name = name.removesuffix("_total") if self._kind == "counter" else name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], object] = {}
        if registry is not None:
            registry.register(self)

    def labels(self, *values: str):
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            child = self._children[values] = self._new_child()
        return child

    def _new_child(self):
        return _Value()

    def _family(self):
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self):
        family = self._family()
        for values, child in list(self._children.items()):
            family.add_metric(list(values), child.value)
        yield family

    def describe(self):
        yield self._family()


class Counter(_Metric):
    pass


class Gauge(_Metric):
    _kind = "gauge"

    def _new_child(self):
        return _GaugeValue()

    def _family(self):
        return GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)


class Histogram(_Metric):
    _kind = "histogram"

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str] = (), *, buckets: Sequence[float] = _DEFAULT_BUCKETS,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.bounds = tuple(float(b) for b in buckets if b != float("inf"))
        self._le = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        super().__init__(name, documentation, labelnames, registry=registry)

    def _new_child(self):
        return _Observations(self.bounds)

    def _family(self):
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self):
        family = self._family()
        for values, child in list(self._children.items()):
            counts, total = list(child.counts), child.sum
            cumulative, buckets = 0, []
            for le, count in zip(self._le, counts):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(list(values), buckets, sum_value=total)
        yield family
