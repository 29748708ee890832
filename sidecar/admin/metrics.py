"""Prometheus metrics of the proxy and the data path.

Each sidecar owns a registry (tests run several in one process). The proxy's
series are plain Python numbers, kept per direction (``DirectionCounts``, which
each side of the proxy holds) and keyed by color, then code, and turned into
metric families only at scrape time, by ``ProxyMetrics.collect``: a request then
costs two dict lookups, two integer increments, a ``bisect`` and a float add,
with no label tuple built or hashed, where prometheus_client's
``Histogram.observe`` walks the buckets in Python and takes a lock per
increment. The event loop is the only writer; the scrape may run in another
thread, so it reads copies (a dict or list copy is one step under the GIL), and
at worst a scrape sees a request counted but not yet timed, which the next
scrape sets right.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from sidecar.baggage import EVENTS
from sidecar.coloring import REASONS

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
# ``le`` label values as prometheus_client spells them, "+Inf" last.
_LE = (*(floatToGoString(b) for b in DURATION_BUCKETS), "+Inf")
_SUM = len(DURATION_BUCKETS) + 1  # a histogram cell: per-bucket counts, then the sum

REQUESTS = ("traffic_color_requests_total", "Requests proxied, by direction, color and status.")
DURATION = (
    "traffic_color_request_duration_seconds",
    "Time from a request's first byte to its response's last byte.",
)
REWRITES = (
    "traffic_color_header_rewrites_total",
    "Color headers set or replaced, by why the request's own header was not kept.",
)
FLOWS = ("traffic_color_upstream_flows", "Upstream TCP connections open, by color.")
RELOADS = ("traffic_color_policy_reloads_total", "Policy reloads, by result.")
GRPC = (
    "traffic_color_grpc_requests_total",
    "gRPC calls proxied, by direction, color and the grpc-status the client got.",
)
LANE_FALLBACKS = (
    "traffic_color_lane_fallbacks_total",
    "Requests whose lane was empty, by route host, color and why (then fallback or 503).",
)
LANE_LOOKUPS = ("traffic_color_lane_lookups_total", "Lookups of lane host names, by result.")
BAGGAGE = (
    "traffic_color_baggage_total",
    "Requests whose W3C Baggage color member was used, disagreed with the header, or not read.",
)
CONNECTIONS = (
    "traffic_color_connections_total",
    "Client connections accepted, by direction and the protocol detected on them.",
)
OPAQUE_BYTES = (
    "traffic_color_opaque_bytes_total",
    "Bytes relayed as opaque TCP (both ways), by direction and the flow's color.",
)
PROTOCOLS = ("http1", "http2", "opaque")


class DirectionCounts:
    """The request and rewrite counts of one direction, written by that side's hot path."""

    __slots__ = ("baggage", "connections", "histograms", "opaque_bytes", "requests", "rewrites")

    def __init__(self) -> None:
        # color -> code -> [count, the color's histogram]
        self.requests: dict[str, dict[int, list]] = {}
        # color -> [count per bucket (not cumulative; +Inf last), sum]
        self.histograms: dict[str, list] = {}
        # Every reason the colorer gives, from the start: the proxy adds to
        # ``rewrites[reason]`` in place (no call), and each series reads 0 before
        # its first rewrite, as Prometheus advises for label values known up front.
        self.rewrites: dict[str, int] = dict.fromkeys(REASONS, 0)
        self.baggage: dict[str, int] = dict.fromkeys(EVENTS, 0)  # the same, for baggage
        # Protocol -> connections (the front door adds in place); color -> opaque bytes,
        # seeded with the policy's colors by ``ProxyMetrics.known_colors``.
        self.connections: dict[str, int] = dict.fromkeys(PROTOCOLS, 0)
        self.opaque_bytes: dict[str, int] = {}

    def request(self, color: str, code: int, seconds: float) -> None:
        try:
            cell = self.requests[color][code]
        except KeyError:  # costs nothing (Python 3.11) until a new label set comes
            cell = self._new_request(color, code)
        cell[0] += 1
        hist = cell[1]
        hist[bisect_left(DURATION_BUCKETS, seconds)] += 1  # le: the first bound >= seconds
        hist[_SUM] += seconds

    def _new_request(self, color: str, code: int) -> list:
        hist = self.histograms.get(color)
        if hist is None:
            hist = self.histograms[color] = [0] * _SUM + [0.0]
        cell = self.requests.setdefault(color, {})[code] = [0, hist]
        return cell


class ProxyMetrics(Collector):
    """The proxy's counters as plain numbers, exported by ``collect`` at scrape time.

    Request series appear once their label set is first used, as prometheus_client's
    labelled metrics do. Only the event loop writes; see the module docstring.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.directions = {"outbound": DirectionCounts(), "inbound": DirectionCounts()}
        self._flows: dict[str, int] = {}
        self._reloads: dict[str, int] = {}
        self._grpc: dict[tuple[str, str, str], int] = {}
        self._lane_fallbacks: dict[tuple[str, str, str], int] = {}
        self._lane_lookups: dict[str, int] = {}
        self.registry.register(self)

    def direction(self, name: str) -> DirectionCounts:
        """The counts one side of the proxy writes (``outbound`` or ``inbound``)."""
        return self.directions[name]

    def flow_opened(self, color: str) -> None:
        self._flows[color] = self._flows.get(color, 0) + 1

    def flow_closed(self, color: str) -> None:
        self._flows[color] = self._flows.get(color, 0) - 1

    def grpc_request(self, direction: str, color: str, grpc_status: str) -> None:
        key = (direction, color, grpc_status)
        self._grpc[key] = self._grpc.get(key, 0) + 1

    def lane_fallback(self, host: str, color: str, reason: str) -> None:
        key = (host, color, reason)
        self._lane_fallbacks[key] = self._lane_fallbacks.get(key, 0) + 1

    def lane_lookup(self, result: str) -> None:
        self._lane_lookups[result] = self._lane_lookups.get(result, 0) + 1

    def known_colors(self, names: Iterable[str]) -> None:
        """Colors whose opaque byte series read 0 before their first byte."""
        for counts in self.directions.values():
            for name in names:
                counts.opaque_bytes.setdefault(name, 0)

    def reload(self, ok: bool) -> None:
        result = "success" if ok else "failure"
        self._reloads[result] = self._reloads.get(result, 0) + 1

    # ------------------------------------------------------------ scrape time

    def describe(self) -> Iterator[Metric]:
        """The families without samples: lets the registry refuse a duplicate name."""
        yield from self._families({}, {}, {}, {}, {}, {}, {})
        yield self._grpc_family({})
        yield from self._lane_families({}, {}, {})

    def collect(self) -> Iterator[Metric]:
        # Copies first: the loop thread may add a label set while this runs.
        req: dict[tuple[str, str, int], int] = {}
        hist: dict[tuple[str, str], list] = {}
        rew: dict[tuple[str, str], int] = {}
        conns: dict[tuple[str, str], int] = {}
        opaque: dict[tuple[str, str], int] = {}
        for direction, counts in self.directions.items():
            for proto, n in counts.connections.copy().items():
                conns[(direction, proto)] = n
            for color, n in counts.opaque_bytes.copy().items():
                opaque[(direction, color)] = n
            for color, codes in counts.requests.copy().items():
                for code, cell in codes.copy().items():
                    req[(direction, color, code)] = cell[0]
            for color, cells in counts.histograms.copy().items():
                hist[(direction, color)] = cells[:]
            for reason, n in counts.rewrites.copy().items():
                rew[(direction, reason)] = n
        yield from self._families(
            req, hist, rew, self._flows.copy(), self._reloads.copy(), conns, opaque
        )
        bag = {
            (direction, event): n
            for direction, counts in self.directions.items()
            for event, n in counts.baggage.copy().items()
        }
        yield from self._lane_families(self._lane_fallbacks.copy(), self._lane_lookups.copy(), bag)
        yield self._grpc_family(self._grpc.copy())

    @staticmethod
    def _lane_families(
        fallbacks: dict[tuple[str, str, str], int],
        lookups: dict[str, int],
        bag: dict[tuple[str, str], int],
    ) -> Iterator[Metric]:
        family = CounterMetricFamily(*LANE_FALLBACKS, labels=("host", "color", "reason"))
        for labels, n in fallbacks.items():
            family.add_metric(labels, float(n))
        yield family
        family = CounterMetricFamily(*LANE_LOOKUPS, labels=("result",))
        for result, n in lookups.items():
            family.add_metric((result,), float(n))
        yield family
        family = CounterMetricFamily(*BAGGAGE, labels=("direction", "event"))
        for labels, n in bag.items():
            family.add_metric(labels, float(n))
        yield family

    @staticmethod
    def _grpc_family(grpc: dict[tuple[str, str, str], int]) -> Metric:
        family = CounterMetricFamily(*GRPC, labels=("direction", "color", "grpc_status"))
        for labels, n in grpc.items():
            family.add_metric(labels, float(n))
        return family

    @staticmethod
    def _families(
        req: dict[tuple[str, str, int], int],
        hist: dict[tuple[str, str], list],
        rew: dict[tuple[str, str], int],
        flows: dict[str, int],
        reloads: dict[str, int],
        conns: dict[tuple[str, str], int],
        opaque: dict[tuple[str, str], int],
    ) -> Iterator[Metric]:
        requests = CounterMetricFamily(*REQUESTS, labels=("direction", "color", "code"))
        for (direction, color, code), n in req.items():
            requests.add_metric((direction, color, str(code)), float(n))
        yield requests
        duration = HistogramMetricFamily(*DURATION, labels=("direction", "color"))
        for labels, cell in hist.items():
            buckets = []
            total = 0
            for le, n in zip(_LE, cell, strict=False):
                total += n
                buckets.append((le, float(total)))
            duration.add_metric(labels, buckets, cell[_SUM])
        yield duration
        rewrites = CounterMetricFamily(*REWRITES, labels=("direction", "reason"))
        for labels, n in rew.items():
            rewrites.add_metric(labels, float(n))
        yield rewrites
        gauge = GaugeMetricFamily(*FLOWS, labels=("color",))
        for color, n in flows.items():
            gauge.add_metric((color,), float(n))
        yield gauge
        reload_family = CounterMetricFamily(*RELOADS, labels=("result",))
        for result, n in reloads.items():
            reload_family.add_metric((result,), float(n))
        yield reload_family
        connections = CounterMetricFamily(*CONNECTIONS, labels=("direction", "protocol"))
        for labels, n in conns.items():
            connections.add_metric(labels, float(n))
        yield connections
        opaque_bytes = CounterMetricFamily(*OPAQUE_BYTES, labels=("direction", "color"))
        for labels, n in opaque.items():
            opaque_bytes.add_metric(labels, float(n))
        yield opaque_bytes


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
