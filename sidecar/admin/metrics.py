"""Prometheus metrics of the proxy and the data path.

Each sidecar owns a registry (tests run several in one process). Label
children are cached by their label tuple, so a request costs two dict lookups
and two increments rather than a ``labels()`` call each time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# ``*_created`` series double every scrape and no dashboard reads them.
disable_created_metrics()

# Sub-millisecond buckets: a sidecar hop should cost tens of microseconds.
DURATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class ProxyMetrics:
    """The proxy's counters, with cached children for the hot path."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests_total = Counter(
            "traffic_color_requests_total",
            "Requests proxied, by direction, color and status.",
            ("direction", "color", "code"),
            registry=r,
        )
        self.request_duration = Histogram(
            "traffic_color_request_duration_seconds",
            "Time from a request's first byte to its response's last byte.",
            ("direction", "color"),
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.header_rewrites = Counter(
            "traffic_color_header_rewrites_total",
            "Color headers set or replaced, by why the request's own header was not kept.",
            ("direction", "reason"),
            registry=r,
        )
        self.upstream_flows = Gauge(
            "traffic_color_upstream_flows",
            "Upstream TCP connections open, by color.",
            ("color",),
            registry=r,
        )
        self.policy_reloads = Counter(
            "traffic_color_policy_reloads_total",
            "Policy reloads, by result.",
            ("result",),
            registry=r,
        )
        self._req: dict[tuple[str, str, int], tuple[Callable[[], None], Callable[[float], None]]]
        self._req = {}
        self._rew: dict[tuple[str, str], Callable[[], None]] = {}
        self._flows: dict[str, Gauge] = {}

    def request(self, direction: str, color: str, code: int, seconds: float) -> None:
        key = (direction, color, code)
        pair = self._req.get(key)
        if pair is None:
            pair = (
                self.requests_total.labels(direction, color, str(code)).inc,
                self.request_duration.labels(direction, color).observe,
            )
            self._req[key] = pair
        pair[0]()
        pair[1](seconds)

    def rewrite(self, direction: str, reason: str) -> None:
        inc = self._rew.get((direction, reason))
        if inc is None:
            inc = self._rew[(direction, reason)] = self.header_rewrites.labels(
                direction, reason
            ).inc
        inc()

    def flow_opened(self, color: str) -> None:
        self._flow(color).inc()

    def flow_closed(self, color: str) -> None:
        self._flow(color).dec()

    def _flow(self, color: str) -> Gauge:
        child = self._flows.get(color)
        if child is None:
            child = self._flows[color] = self.upstream_flows.labels(color)
        return child

    def reload(self, ok: bool) -> None:
        self.policy_reloads.labels("success" if ok else "failure").inc()


class KernelCollector(Collector):
    """Reads the data path's per-CPU counters at scrape time, never on the hot path.

    ``source`` returns None while no data path is attached; the attached gauge
    then reads 0 and no kernel series are exported.
    """

    def __init__(self, source: Callable[[], KernelSnapshot | None]) -> None:
        self._source = source

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        snap = self._source()
        attached = GaugeMetricFamily(
            "traffic_color_datapath_attached",
            "1 when the tc classifier is loaded and attached, else 0.",
        )
        attached.add_metric([], 1.0 if snap is not None else 0.0)
        yield attached
        if snap is None:
            return
        packets = CounterMetricFamily(
            "traffic_color_kernel_packets",
            "Packets the classifier marked, by color and hook.",
            labels=("color", "hook"),
        )
        nbytes = CounterMetricFamily(
            "traffic_color_kernel_bytes",
            "Bytes the classifier marked, by color and hook.",
            labels=("color", "hook"),
        )
        for (color, hook), (pkts, byts) in sorted(snap.counters.items()):
            packets.add_metric([color, hook], pkts)
            nbytes.add_metric([color, hook], byts)
        yield packets
        yield nbytes
        evictions = CounterMetricFamily(
            "traffic_color_flow_evictions",
            "Open flows whose entry the kernel's LRU flow table evicted.",
        )
        evictions.add_metric([], snap.evictions)
        yield evictions


class KernelSnapshot:
    """What the data path reports at one scrape."""

    __slots__ = ("counters", "evictions")

    def __init__(self, counters: dict[tuple[str, str], tuple[int, int]], evictions: int) -> None:
        self.counters = counters
        self.evictions = evictions
