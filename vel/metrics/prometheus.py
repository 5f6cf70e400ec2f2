"""A ``prometheus_client`` collector for apps that already serve ``/metrics`` (the
``prometheus`` extra)::

    from prometheus_client import REGISTRY
    from vel.metrics.prometheus import VelCollector

    REGISTRY.register(VelCollector())

It exports this process's vel counters (every store and flusher it created, summed) and the
latency histograms, under the same names as ``vel flusher --metrics-port``. The backlog
gauges describe the shared Redis, not a process: read them from the flusher's endpoint, or
pass ``gauges`` a function returning a recent ``await store.stats()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from vel.metrics.exposition import PREFIX, grouped
from vel.metrics.families import COUNTER, family_of
from vel.metrics.histograms import HISTOGRAMS
from vel.metrics.process import process_counters

__all__ = ["VelCollector"]


class VelCollector(Collector):
    """Collects vel's metrics at every scrape (no I/O: counters and histograms are in memory).

    Args:
        gauges: optional; returns figures by ``stats()`` key (for example the last
            ``await store.stats()`` a background task saved), exported beside the counters.
            Counters among them are ignored: the process totals already hold them.
        tier: the ``tier`` label of the unprefixed ``gauges`` keys.
    """

    def __init__(
        self,
        gauges: Callable[[], Mapping[str, float]] | None = None,
        *,
        tier: str | None = None,
    ) -> None:
        self.gauges = gauges
        self.tier = tier

    def collect(self) -> Iterator[Metric]:
        values = [(key, tier, value) for (key, tier), value in process_counters().items()]
        if self.gauges is not None:
            extra = [(key, self.tier, value) for key, value in self.gauges().items()]
            values += [v for v in extra if family_of(v[0], v[1])[0].kind != COUNTER]
        for family, samples in sorted(grouped(values).items(), key=lambda i: i[0].name):
            names = sorted({name for labels in samples for name, _ in labels})
            kind = CounterMetricFamily if family.kind == COUNTER else GaugeMetricFamily
            metric = kind(PREFIX + family.name, family.help, labels=names)
            for labels, value in sorted(samples.items()):
                given = dict(labels)
                metric.add_metric([given.get(name, "") for name in names], value)
            yield metric
        for histogram in HISTOGRAMS:
            buckets, total, _ = histogram.snapshot()
            yield HistogramMetricFamily(
                PREFIX + histogram.name,
                histogram.help,
                buckets=[("+Inf" if math.isinf(b) else repr(b), float(c)) for b, c in buckets],
                sum_value=total,
            )
