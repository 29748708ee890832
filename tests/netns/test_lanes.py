"""Lanes and baggage through a real sidecar process, in a namespace with names of its own.

One namespace (``LaneLab``) serves the module: ``/etc/netns/NAME/hosts`` names the
services, the lab's dnsmasq answers everything else (NXDOMAIN, NODATA, TTLs) and
logs each query. The sidecar runs under ``ip netns exec`` like every process
there, so it resolves exactly those names; requests are curl through its outbound
port (HTTP_PROXY mode), services are ``sidecar.demo.chainapp``, which report the
Host, color and baggage they received.

    reviews        127.0.0.10:9080   stable version     (hosts file)
    reviews-canary 127.0.0.11:9080   canary lane        (hosts file)
    reviews-down   127.0.0.12        nothing listens: refused
    reviews-slow   198.18.14.99      on a veth nobody answers on: timeout
    reviews-empty                    DNS NODATA: no address
    reviews-multi  198.18.14.98, 127.0.0.13, 127.0.0.14:9080
                   no answer, refused, then a second canary instance
    (anything else)                  DNS NXDOMAIN: unresolved
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.demo.lanelab import LaneLab

pytestmark = pytest.mark.root

PROXY = "http://127.0.0.1:15001"
REVIEWS = "http://reviews:9080/"
NAMESPACE_FORMS = ("", ".default", ".default.svc.cluster.local")
ADMIN = "127.0.0.1:15090"
STABLE_ADDR, CANARY_ADDR, CANARY2_ADDR = "127.0.0.10", "127.0.0.11", "127.0.0.14"
# route host -> lane host for canary; each route host itself is the stable service
EMPTY_LANES = {
    "svc-unresolved": ("nosuch-canary", "unresolved"),
    "svc-noaddr": ("reviews-empty", "no-address"),
    "svc-refused": ("reviews-down", "refused"),
    "svc-timeout": ("reviews-slow", "timeout"),
}

POLICY = """\
version: 1
colors:
  stable: {mark: 0x1}
  canary: {mark: 0x2}
  blue: {mark: 0x3}
inbound:
  listen: "127.0.0.1:15006"
  app: "127.0.0.1:8080"
outbound:
  listen: "127.0.0.1:15001"
  routes:
    - host: reviews
      lanes: {canary: reviews-canary}
%(empty)s
    - host: svc-multi
      lanes: {canary: reviews-multi}
    - host: svc-fail
      lanes: {canary: nosuch-fail}
      fallback: fail
    - host: svc-cache
      lanes: {canary: nosuch-cache}
admin:
  listen: "127.0.0.1:15090"
timeouts:
  lane_connect: 0.3
baggage:
  key: traffic-color
"""


def lanes_policy() -> str:
    empty = "\n".join(
        f"    - host: {host}\n      lanes: {{canary: {lane}}}"
        for host, (lane, _) in EMPTY_LANES.items()
    )
    return POLICY % {"empty": empty}


def name_services(lab: LaneLab) -> None:
    """The names of the module docstring, in ``lab`` (``test_lanes_h2.py`` uses them too)."""
    # A veth whose far end holds no address: nobody answers ARP for hosts on its
    # subnet, so a SYN to one is never answered (a lane that hangs).
    lab_ip = ["ip", "-n", lab.name]
    for args in (
        ["link", "add", "hole", "type", "veth", "peer", "name", "hole-far"],
        ["link", "set", "hole", "up"],
        ["link", "set", "hole-far", "up"],
        ["addr", "add", "198.18.14.1/24", "dev", "hole"],
    ):
        subprocess.run([*lab_ip, *args], check=True, capture_output=True, timeout=20)
    hosts = {
        # the names a cluster's search path would resolve, each version in namespace
        # default (a bare lane name takes the namespace the request named)
        **{f"reviews{ns}": STABLE_ADDR for ns in NAMESPACE_FORMS},
        **{f"reviews-canary{ns}": CANARY_ADDR for ns in NAMESPACE_FORMS},
        "reviews-down": "127.0.0.12",
        "reviews-slow": "198.18.14.99",
        **dict.fromkeys(EMPTY_LANES, STABLE_ADDR),
        "svc-fail": STABLE_ADDR,
        # several addresses, tried in order (a headless Service, a dual-stack name);
        # none named twice: c-ares (before its fix of issue 1049) keeps only the first
        # address of a name whose second one an earlier line gave another name
        "reviews-multi": ("198.18.14.98", "127.0.0.13", CANARY2_ADDR),
        "svc-multi": STABLE_ADDR,
        "svc-cache": STABLE_ADDR,
    }
    lab.names(hosts, empty=("reviews-empty",))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LaneLab]:
    work: Path = tmp_path_factory.mktemp("lanes")
    with LaneLab("tcl14", work) as lab:
        name_services(lab)
        lab.service("reviews-stable", f"{STABLE_ADDR}:9080")
        lab.service("reviews-canary", f"{CANARY_ADDR}:9080")
        lab.service("reviews-canary-2", f"{CANARY2_ADDR}:9080")
        # The pod's app behind the sidecar's inbound side: instrumented with the
        # OpenTelemetry SDK, it copies nothing from its request onto its call to reviews.
        lab.service("otel-app", "127.0.0.1:8080", next_url=REVIEWS, how="otel", proxy=PROXY)
        # The same app without OpenTelemetry, for contrast.
        lab.service("plain-app", "127.0.0.21:8080", next_url=REVIEWS, proxy=PROXY)
        lab.sidecar("sidecar", lanes_policy(), "stable", ADMIN)
        yield lab


def get(lab: LaneLab, host: str, *headers: str) -> tuple[int, dict]:
    return lab.get_json(f"http://{host}:9080/", *headers, proxy=PROXY)


def metric(lab: LaneLab, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(lab.metrics(ADMIN)):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_canary_reaches_its_lane_and_keeps_host_and_color(lab: LaneLab) -> None:
    for host in (f"reviews{ns}" for ns in NAMESPACE_FORMS):
        code, got = get(lab, host, "x-traffic-color: canary")
        assert code == 200, got
        assert got["name"] == "reviews-canary", (host, got)
        assert got["color"] == "canary"
        assert got["host"] == f"{host}:9080"  # the Host the app sent, not the lane's name
        assert got["baggage"] == "traffic-color=canary"


def test_stable_and_uncolored_never_enter_a_lane(lab: LaneLab) -> None:
    for headers in ((), ("x-traffic-color: stable",)):
        code, got = get(lab, "reviews", *headers)
        assert (code, got["name"], got["color"]) == (200, "reviews-stable", "stable"), got
    # a color without a lane for this host goes where the app sent it, keeping its color
    code, got = get(lab, "reviews", "x-traffic-color: blue")
    assert (code, got["name"], got["color"]) == (200, "reviews-stable", "blue"), got


@pytest.mark.parametrize("host", list(EMPTY_LANES))
def test_an_empty_lane_falls_back_keeping_the_color(lab: LaneLab, host: str) -> None:
    _, reason = EMPTY_LANES[host]
    before = metric(
        lab, "traffic_color_lane_fallbacks_total", host=host, color="canary", reason=reason
    )
    t0 = time.monotonic()
    code, got = get(lab, host, "x-traffic-color: canary")
    took = time.monotonic() - t0
    assert (code, got["name"], got["color"]) == (200, "reviews-stable", "canary"), got
    assert got["host"] == f"{host}:9080"
    after = metric(
        lab, "traffic_color_lane_fallbacks_total", host=host, color="canary", reason=reason
    )
    assert after == before + 1
    if reason == "timeout":
        assert 0.25 < took < 3.0, took  # timeouts.lane_connect, then the stable answer


def test_a_lane_reaches_a_live_address_after_dead_ones(lab: LaneLab) -> None:
    """A silent address, a refusing one, then a live one: it serves, within lane_connect."""
    host = "svc-multi"
    t0 = time.monotonic()
    code, got = get(lab, host, "x-traffic-color: canary")
    took = time.monotonic() - t0
    assert (code, got["name"], got["color"]) == (200, "reviews-canary-2", "canary"), got
    assert got["host"] == f"{host}:9080"
    assert took < 2.0, took  # a third of lane_connect (0.3 s), curl's start, machine noise
    for reason in ("refused", "timeout"):
        labels = {"host": host, "color": "canary", "reason": reason}
        assert metric(lab, "traffic_color_lane_fallbacks_total", **labels) == 0


def test_fallback_fail_answers_503(lab: LaneLab) -> None:
    code, got = get(lab, "svc-fail", "x-traffic-color: canary")
    assert code == 503, got
    reason = "unresolved"
    labels = {"host": "svc-fail", "color": "canary", "reason": reason}
    assert metric(lab, "traffic_color_lane_fallbacks_total", **labels) >= 1
    # stable traffic to the same host is untouched by the lane
    code, got = get(lab, "svc-fail")
    assert (code, got["name"]) == (200, "reviews-stable")


def test_an_empty_lane_costs_one_lookup_per_ttl(lab: LaneLab) -> None:
    # A route of its own: no other test looks its lane up.
    host, lane = "svc-cache", "nosuch-cache"

    def lookups() -> float:
        return metric(lab, "traffic_color_lane_lookups_total", result="unresolved")

    before = lookups()
    t0 = time.monotonic()
    for _ in range(20):
        code, got = get(lab, host, "x-traffic-color: canary")
        assert (code, got["name"], got["color"]) == (200, "reviews-stable", "canary")
    within_ttl = time.monotonic() - t0 < 4.5  # DEFAULT_TTL is 5 s (no negative TTL from c-ares)
    if within_ttl:
        assert lookups() == before + 1
        assert lab.dns_queries(lane) == 1  # and one query reached the DNS server
    time.sleep(max(0.0, 5.2 - (time.monotonic() - t0)))
    get(lab, host, "x-traffic-color: canary")
    if within_ttl:
        assert lookups() == before + 2
    assert 1 <= lab.dns_queries(lane) <= 2
    fallbacks = metric(
        lab, "traffic_color_lane_fallbacks_total", host=host, color="canary", reason="unresolved"
    )
    assert fallbacks == 21  # every request fell back, counted


def test_baggage_carries_the_color_without_the_header(lab: LaneLab) -> None:
    code, got = get(lab, "reviews", "baggage: userId=alice, traffic-color=canary;p=1 ,x=%20y")
    assert (code, got["name"], got["color"]) == (200, "reviews-canary", "canary"), got
    assert got["baggage"] == "userId=alice,traffic-color=canary,x=%20y"
    assert metric(lab, "traffic_color_baggage_total", direction="outbound", event="used") >= 1


def test_header_wins_over_baggage_and_the_disagreement_is_counted(lab: LaneLab) -> None:
    before = metric(lab, "traffic_color_baggage_total", direction="outbound", event="disagree")
    code, got = get(lab, "reviews", "x-traffic-color: stable", "baggage: traffic-color=canary")
    assert (code, got["name"], got["color"]) == (200, "reviews-stable", "stable"), got
    assert got["baggage"] == "traffic-color=stable"
    after = metric(lab, "traffic_color_baggage_total", direction="outbound", event="disagree")
    assert after == before + 1


def test_malformed_and_oversized_baggage_pass_untouched_and_are_not_read(lab: LaneLab) -> None:
    bad = "traffic-color=canary, not a member"
    code, got = get(lab, "reviews", f"baggage: {bad}")
    assert (code, got["name"], got["color"], got["baggage"]) == (
        200,
        "reviews-stable",
        "stable",
        bad,
    )
    full = ",".join(f"k{i}=v" for i in range(64))
    code, got = get(lab, "reviews", "x-traffic-color: canary", f"baggage: {full}")
    assert (got["name"], got["color"], got["baggage"]) == ("reviews-canary", "canary", full)
    assert metric(lab, "traffic_color_baggage_total", direction="outbound", event="malformed") >= 1
    assert metric(lab, "traffic_color_baggage_total", direction="outbound", event="over_limit") >= 1


def test_debug_route_and_status_show_lanes(lab: LaneLab) -> None:
    import json

    out = lab.curl(f"http://{ADMIN}/debug/route?color=canary&host=reviews.default").stdout
    route = json.loads(out)
    assert route["why"] == "lane" and route["destination"] == "reviews-canary.default:80"
    out = lab.curl(f"http://{ADMIN}/debug/route?color=stable&host=reviews").stdout
    assert json.loads(out)["why"] == "stable"
    get(lab, "svc-refused", "x-traffic-color: canary")
    get(lab, "reviews", "x-traffic-color: canary")
    out = lab.curl(f"http://{ADMIN}/debug/route?color=canary&host=svc-refused:9080").stdout
    route = json.loads(out)
    assert (route["why"], route["reason"], route["destination"]) == (
        "fallback",
        "refused",
        "svc-refused:9080",
    )
    status = json.loads(lab.curl(f"http://{ADMIN}/status").stdout)
    routes = {r["host"]: r for r in status["lanes"]}
    assert routes["reviews"]["lanes"]["canary"]["state"] == "ready"
    get(lab, "reviews.default", "x-traffic-color: canary")
    status = json.loads(lab.curl(f"http://{ADMIN}/status").stdout)
    names = {r["host"]: r for r in status["lanes"]}["reviews"]["lanes"]["canary"]["names"]
    assert names["reviews-canary.default"]["state"] == "ready"
    assert routes["svc-refused"]["lanes"]["canary"]["state"] == "empty"
    # what an operator types
    argv = [sys.executable, "-m", "sidecar", "status", "--admin", f"http://{ADMIN}"]
    out = subprocess.run(lab.argv(argv), capture_output=True, text=True, timeout=30).stdout
    # ROUTE COLOR LANE FALLBACK STATE, keyed by (route, lane)
    rows = [ln.split() for ln in out.splitlines() if ln.startswith(("reviews ", "svc-"))]
    lanes = {(r[0], r[2]): r for r in rows}
    assert lanes["reviews", "reviews-canary"][3:6] == ["stable", "ready", "127.0.0.11,"], out
    assert lanes["reviews", "reviews-canary.default"][4] == "ready", out
    lines = {r[0]: r for r in rows}
    assert lines["svc-refused"][4:6] == ["empty", "(refused),"], out
    assert lines["svc-fail"][3] == "fail", out


def test_an_opentelemetry_app_carries_the_color_in_baggage(lab: LaneLab) -> None:
    # Inbound: the sidecar hands the app the color in the header and in baggage.
    code, got = lab.get_json("http://127.0.0.1:15006/", "x-traffic-color: canary", "baggage: a=1")
    assert code == 200, got
    assert (got["name"], got["color"], got["baggage"]) == (
        "otel-app",
        "canary",
        "a=1,traffic-color=canary",
    )
    # The app's call left without a color header; its SDK propagated the baggage,
    # from which the outbound side took the color: the canary lane answered.
    assert got["next"]["name"] == "reviews-canary", got
    assert got["next"]["color"] == "canary"
    assert got["next"]["baggage"] == "a=1,traffic-color=canary"
    # Stable stays stable along the same path.
    code, got = lab.get_json("http://127.0.0.1:15006/")
    assert (got["next"]["name"], got["next"]["color"]) == ("reviews-stable", "stable"), got


def test_without_opentelemetry_an_app_that_copies_nothing_loses_the_color(lab: LaneLab) -> None:
    code, got = lab.get_json("http://127.0.0.21:8080/", "x-traffic-color: canary")
    assert code == 200, got
    assert (got["next"]["name"], got["next"]["color"]) == ("reviews-stable", "stable"), got


def test_the_demos_second_act(capsys: pytest.CaptureFixture[str]) -> None:
    """edge -> A -> B -> C: canary served by b-canary only, still canary at C."""
    from sidecar.demo import chain

    assert chain.second_act() == 0
    out = capsys.readouterr().out
    rows = [ln.split() for ln in out.splitlines() if ln.strip().startswith(("x-user-group", "("))]
    assert ["x-user-group:", "beta", "a", "b-canary", "c", "canary", "ok"] in rows, out
    assert ["(none)", "a", "b", "c", "stable", "ok"] in rows, out
    assert 'reason="unresolved"' in out and "act two OK" in out
