"""The proxy's metrics as a scraper sees them: the text exposition, parsed back.

``ProxyMetrics`` keeps plain numbers and builds the families at scrape time, so
these tests check what Prometheus would read (names, types, labels, cumulative
buckets, ``_sum``/``_count``), and compare the histogram with prometheus_client's
own ``Histogram`` fed the same observations.
"""

from __future__ import annotations

import sys
import threading

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.admin.metrics import DURATION_BUCKETS, PROTOCOLS, ProxyMetrics
from sidecar.baggage import EVENTS
from sidecar.coloring import REASONS

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(registry: CollectorRegistry) -> tuple[dict[str, str], Samples]:
    """(family name -> type, (sample name, sorted labels) -> value) from the exposition."""
    text = generate_latest(registry).decode()
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return types, samples


def labels(**kw: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kw.items()))


def test_families_keep_their_names_and_types() -> None:
    m = ProxyMetrics()
    m.direction("outbound").request("stable", 200, 0.001)
    m.direction("outbound").rewrites["missing"] += 1
    m.flow_opened("stable")
    m.reload(True)
    types, _ = scrape(m.registry)
    assert types == {
        "traffic_color_requests": "counter",
        "traffic_color_request_duration_seconds": "histogram",
        "traffic_color_header_rewrites": "counter",
        "traffic_color_upstream_flows": "gauge",
        "traffic_color_policy_reloads": "counter",
        "traffic_color_lane_fallbacks": "counter",
        "traffic_color_lane_lookups": "counter",
        "traffic_color_baggage": "counter",
        "traffic_color_connections": "counter",
        "traffic_color_opaque_bytes": "counter",
        "traffic_color_grpc_requests": "counter",
    }


def test_grpc_series_count_by_their_labels() -> None:
    m = ProxyMetrics()
    m.grpc_request("inbound", "canary", "14")
    m.grpc_request("inbound", "canary", "14")
    _, s = scrape(m.registry)
    grpc = labels(direction="inbound", color="canary", grpc_status="14")
    assert s[("traffic_color_grpc_requests_total", grpc)] == 2


def test_request_series_appear_with_use_and_rewrite_reasons_read_zero_from_the_start() -> None:
    m = ProxyMetrics()
    m.known_colors(["stable", "canary"])
    _, samples = scrape(m.registry)
    rew = "traffic_color_header_rewrites_total"
    bag = "traffic_color_baggage_total"
    conns = "traffic_color_connections_total"
    opaque = "traffic_color_opaque_bytes_total"
    sides = ("outbound", "inbound")
    assert samples == {
        **{(rew, labels(direction=d, reason=r)): 0.0 for d in sides for r in REASONS},
        **{(bag, labels(direction=d, event=e)): 0.0 for d in sides for e in EVENTS},
        **{(conns, labels(direction=d, protocol=p)): 0.0 for d in sides for p in PROTOCOLS},
        **{
            (opaque, labels(direction=d, color=c)): 0.0 for d in sides for c in ("stable", "canary")
        },
    }


def test_connections_by_protocol_and_opaque_bytes_by_color() -> None:
    m = ProxyMetrics()
    m.direction("outbound").connections["opaque"] += 2
    m.direction("inbound").connections["http1"] += 1
    m.direction("outbound").opaque_bytes["canary"] = 1500
    _, samples = scrape(m.registry)
    assert (
        samples[
            ("traffic_color_connections_total", labels(direction="outbound", protocol="opaque"))
        ]
        == 2
    )
    assert (
        samples[("traffic_color_connections_total", labels(direction="inbound", protocol="http1"))]
        == 1
    )
    assert (
        samples[("traffic_color_opaque_bytes_total", labels(direction="outbound", color="canary"))]
        == 1500
    )


def test_request_counts_per_direction_color_and_code() -> None:
    m = ProxyMetrics()
    for _ in range(3):
        m.direction("outbound").request("canary", 200, 0.0002)
    m.direction("outbound").request("canary", 502, 0.03)
    m.direction("inbound").request("canary", 200, 0.0002)
    _, samples = scrape(m.registry)
    name = "traffic_color_requests_total"
    assert samples[(name, labels(direction="outbound", color="canary", code="200"))] == 3
    assert samples[(name, labels(direction="outbound", color="canary", code="502"))] == 1
    assert samples[(name, labels(direction="inbound", color="canary", code="200"))] == 1
    assert len([k for k in samples if k[0] == name]) == 3


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    m = ProxyMetrics()
    # A bound itself belongs to its bucket (le); 20 s lands only in +Inf.
    observed = [0.00005, 0.0001, 0.0003, 0.002, 0.002, 0.7, 20.0]
    for s in observed:
        m.direction("outbound").request("stable", 200, s)
    m.direction("outbound").request("stable", 503, 0.01)  # another code, same histogram
    observed.append(0.01)
    _, samples = scrape(m.registry)
    name = "traffic_color_request_duration_seconds"
    base = {"direction": "outbound", "color": "stable"}
    buckets = {
        le: samples[(f"{name}_bucket", labels(**base, le=le))]
        for le in ("0.0001", "0.00025", "0.0005", "0.0025", "0.01", "0.5", "1.0", "10.0", "+Inf")
    }
    assert buckets == {
        "0.0001": 2,
        "0.00025": 2,
        "0.0005": 3,
        "0.0025": 5,
        "0.01": 6,
        "0.5": 6,
        "1.0": 7,
        "10.0": 7,
        "+Inf": 8,
    }
    assert samples[(f"{name}_count", labels(**base))] == 8
    assert samples[(f"{name}_sum", labels(**base))] == pytest.approx(sum(observed))
    series = [k for k in samples if k[0] == f"{name}_bucket"]
    assert len(series) == len(DURATION_BUCKETS) + 1


def test_histogram_matches_prometheus_client_histogram() -> None:
    """The same observations give the same series as the library's own Histogram."""
    m = ProxyMetrics()
    ref_registry = CollectorRegistry()
    ref = Histogram(
        "traffic_color_request_duration_seconds",
        "reference",
        ("direction", "color"),
        buckets=DURATION_BUCKETS,
        registry=ref_registry,
    )
    values = [i * 0.00007 for i in range(300)] + list(DURATION_BUCKETS) + [0.0, 11.0]
    for i, v in enumerate(values):
        color = "canary" if i % 3 else "stable"
        m.direction("inbound").request(color, 200, v)
        ref.labels("inbound", color).observe(v)
    _, ours = scrape(m.registry)
    _, theirs = scrape(ref_registry)
    ours = {k: v for k, v in ours.items() if k[0].startswith("traffic_color_request_duration")}
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value), key


def test_rewrites_flows_and_reloads() -> None:
    m = ProxyMetrics()
    m.direction("outbound").rewrites["missing"] += 2
    m.direction("inbound").rewrites["untrusted"] += 1
    m.flow_opened("canary")
    m.flow_opened("canary")
    m.flow_closed("canary")
    m.flow_opened("stable")
    m.flow_closed("stable")
    m.reload(True)
    m.reload(False)
    m.reload(True)
    _, s = scrape(m.registry)
    rew = "traffic_color_header_rewrites_total"
    assert s[(rew, labels(direction="outbound", reason="missing"))] == 2
    assert s[(rew, labels(direction="inbound", reason="untrusted"))] == 1
    assert s[(rew, labels(direction="inbound", reason="missing"))] == 0
    assert s[("traffic_color_upstream_flows", labels(color="canary"))] == 1
    assert s[("traffic_color_upstream_flows", labels(color="stable"))] == 0
    assert s[("traffic_color_policy_reloads_total", labels(result="success"))] == 2
    assert s[("traffic_color_policy_reloads_total", labels(result="failure"))] == 1


def test_registry_get_sample_value_sees_the_counts() -> None:
    """What the proxy tests and the runtime read: the registry's own lookup."""
    m = ProxyMetrics()
    m.direction("outbound").request("stable", 200, 0.001)
    m.direction("outbound").request("stable", 200, 0.001)
    value = m.registry.get_sample_value(
        "traffic_color_requests_total", {"direction": "outbound", "color": "stable", "code": "200"}
    )
    assert value == 2.0


def test_second_registration_of_the_same_names_is_refused() -> None:
    m = ProxyMetrics()
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        ProxyMetrics(m.registry)


def test_scrape_in_another_thread_while_the_loop_adds_series() -> None:
    """/metrics runs generate_latest in a worker thread while the loop keeps counting.

    New label sets keep appearing while the scraper reads; many series and a tiny
    switch interval make the threads interleave inside the scrape's loops (reading
    the live dicts instead of copies fails here with "dictionary changed size").
    """
    m = ProxyMetrics()
    for i in range(2000):
        m.direction("outbound").request(f"p{i}", 200, 0.001)
        m.flow_opened(f"p{i}")
    errors: list[BaseException] = []
    stop = threading.Event()

    def scraper() -> None:
        try:
            while not stop.is_set():
                for _ in m.collect():
                    pass
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    t = threading.Thread(target=scraper)
    t.start()
    try:
        for i in range(2000):
            m.direction("outbound").request(f"c{i}", 200, 0.001)
            m.direction("inbound").rewrites[REASONS[i % len(REASONS)]] += 1
            m.flow_opened(f"c{i}")
            m.reload(i % 2 == 0)
    finally:
        stop.set()
        t.join(10)
        sys.setswitchinterval(interval)
    assert not errors, errors[0]
    _, s = scrape(m.registry)
    total = sum(v for k, v in s.items() if k[0] == "traffic_color_requests_total")
    assert total == 4000
