"""Lanes and baggage for HTTP/2 and gRPC through a real sidecar, in a namespace with names
of its own (``LaneLab``, as ``test_lanes.py`` for HTTP/1).

The clients are grpcio (``grpcwho.py call``: several calls at once on one channel,
so they are streams of one HTTP/2 connection) and curl with
``--http2-prior-knowledge``; the services are grpcio servers that report the color
and baggage each call carried (``grpcwho.py serve``) and ``nghttpd -v``, whose log
shows the headers it received. The sidecar runs in HTTP_PROXY mode: clients
connect to its outbound port and name the service in ``:authority``. Names, routes
and policy are ``test_lanes.py``'s.

    reviews          127.0.0.10   stable version (gRPC on 50051, nghttpd on 50080)
    reviews-canary   127.0.0.11   canary lane    (the same)
    reviews-down     127.0.0.12   nothing listens: refused
    reviews-slow     198.18.14.99 on a veth nobody answers on: timeout
    reviews-empty                 DNS NODATA: no address
    (anything else)               DNS NXDOMAIN: unresolved
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.demo.lanelab import LabError, LaneLab
from tests.netns.test_lanes import (
    ADMIN,
    CANARY_ADDR,
    EMPTY_LANES,
    NAMESPACE_FORMS,
    STABLE_ADDR,
    lanes_policy,
    metric,
    name_services,
)

pytestmark = pytest.mark.root

PROXY = "127.0.0.1:15001"
GRPC, WEB = 50051, 50080
WHO = str(Path(__file__).with_name("grpcwho.py"))
STREAMS = 4  # calls at once on one client connection


def _wait_log(lab: LaneLab, name: str, proc: subprocess.Popen, needle: str) -> None:
    deadline = time.monotonic() + 20
    while needle not in lab.log(name):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise LabError(f"{name} did not start", lab.log(name))
        time.sleep(0.05)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LaneLab]:
    work: Path = tmp_path_factory.mktemp("lanes-h2")
    with LaneLab("tcl2h", work) as lab:
        name_services(lab)
        for name, addr in (("reviews-stable", STABLE_ADDR), ("reviews-canary", CANARY_ADDR)):
            grpc_name = f"{name}-grpc"
            proc = lab.spawn(
                [sys.executable, WHO, "serve", name, f"{addr}:{GRPC}"], work / f"{grpc_name}.log"
            )
            _wait_log(lab, grpc_name, proc, "serving")
            root = work / f"www-{name}"
            root.mkdir()
            (root / "who").write_text(name)
            web = f"{name}-web"
            argv = ["nghttpd", "--no-tls", "-v", "-a", addr, "-d", str(root), str(WEB)]
            proc = lab.spawn(argv, work / f"{web}.log")
            deadline = time.monotonic() + 10
            while lab.curl("--http2-prior-knowledge", f"http://{addr}:{WEB}/who").stdout != name:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise LabError("nghttpd did not start", lab.log(web))
                time.sleep(0.05)
        lab.sidecar("sidecar", lanes_policy(), "stable", ADMIN)
        yield lab


def grpc_calls(lab: LaneLab, host: str, *metadata: str, count: int = STREAMS) -> list[dict]:
    """``count`` calls at once on one channel to ``host``'s gRPC port, via the sidecar."""
    argv = [sys.executable, WHO, "call", PROXY, f"{host}:{GRPC}", "--count", str(count)]
    for m in metadata:
        argv += ["-m", m]
    proc = subprocess.run(lab.argv(argv), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def replies(lab: LaneLab, host: str, *metadata: str, count: int = STREAMS) -> set[tuple]:
    """The distinct (code, server, color, baggage) the calls got."""
    out = set()
    for r in grpc_calls(lab, host, *metadata, count=count):
        reply = r.get("reply", {})
        out.add((r["code"], reply.get("name"), reply.get("color"), reply.get("baggage")))
    return out


def fallbacks(lab: LaneLab, host: str, reason: str) -> float:
    labels = {"host": host, "color": "canary", "reason": reason}
    return metric(lab, "traffic_color_lane_fallbacks_total", **labels)


def test_every_canary_stream_reaches_the_lane_with_color_and_baggage(lab: LaneLab) -> None:
    for ns in NAMESPACE_FORMS:
        got = replies(lab, f"reviews{ns}", "x-traffic-color=canary")
        assert got == {("OK", "reviews-canary", "canary", "traffic-color=canary")}, ns


def test_stable_and_uncolored_streams_never_enter_a_lane(lab: LaneLab) -> None:
    stable = ("OK", "reviews-stable", "stable", "traffic-color=stable")
    assert replies(lab, "reviews") == {stable}
    assert replies(lab, "reviews", "x-traffic-color=stable") == {stable}
    # a color with no lane for this host goes where the call was sent, keeping its color
    blue = ("OK", "reviews-stable", "blue", "traffic-color=blue")
    assert replies(lab, "reviews", "x-traffic-color=blue") == {blue}


@pytest.mark.parametrize("host", list(EMPTY_LANES))
def test_streams_waiting_on_an_empty_lane_each_fall_back_keeping_the_color(
    lab: LaneLab, host: str
) -> None:
    _, reason = EMPTY_LANES[host]
    before = fallbacks(lab, host, reason)
    t0 = time.monotonic()
    got = replies(lab, host, "x-traffic-color=canary")
    took = time.monotonic() - t0
    assert got == {("OK", "reviews-stable", "canary", "traffic-color=canary")}
    assert fallbacks(lab, host, reason) == before + STREAMS  # counted per stream
    if reason == "timeout":
        assert took < 5.0, took  # timeouts.lane_connect (0.3 s), not the connect timeout


def test_fallback_fail_answers_unavailable_and_503(lab: LaneLab) -> None:
    calls = grpc_calls(lab, "svc-fail", "x-traffic-color=canary")
    assert {c["code"] for c in calls} == {"UNAVAILABLE"}, calls
    assert "fallback: fail" in calls[0]["details"]
    assert fallbacks(lab, "svc-fail", "unresolved") >= STREAMS
    # Plain HTTP/2 (nghttp, two streams on one connection): each stream gets its 503, and
    # the connection is not closed for it (no GOAWAY from the sidecar).
    argv = ["nghttp", "-v", "-H", f":authority: svc-fail:{WEB}", "-H", "x-traffic-color: canary"]
    url = f"http://{PROXY}/who"
    proc = subprocess.run(
        lab.argv([*argv, url, url + "?again"]), capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert proc.stdout.count(":status: 503") == 2, proc.stdout[-2000:]
    assert "recv GOAWAY" not in proc.stdout
    # stable calls to the same host are untouched by the lane
    assert replies(lab, "svc-fail") == {("OK", "reviews-stable", "stable", "traffic-color=stable")}


def test_an_empty_lane_costs_one_lookup_per_ttl_across_streams(lab: LaneLab) -> None:
    host, lane = "svc-cache", "nosuch-cache"  # no other test looks this lane up

    def lookups() -> float:
        return metric(lab, "traffic_color_lane_lookups_total", result="unresolved")

    before = lookups()
    t0 = time.monotonic()
    got = replies(lab, host, "x-traffic-color=canary", count=10)
    got |= replies(lab, host, "x-traffic-color=canary", count=10)
    assert got == {("OK", "reviews-stable", "canary", "traffic-color=canary")}
    if time.monotonic() - t0 < 4.5:  # within the 5 s negative TTL
        assert lookups() == before + 1
        assert lab.dns_queries(lane) == 1
    assert fallbacks(lab, host, "unresolved") == 20


def test_baggage_carries_the_color_of_a_call_without_the_header(lab: LaneLab) -> None:
    got = replies(lab, "reviews", "baggage=userId=alice,traffic-color=canary;p=1")
    assert got == {("OK", "reviews-canary", "canary", "userId=alice,traffic-color=canary")}
    assert metric(lab, "traffic_color_baggage_total", direction="outbound", event="used") >= 1


def test_the_header_wins_over_baggage_and_malformed_baggage_passes_untouched(
    lab: LaneLab,
) -> None:
    before = metric(lab, "traffic_color_baggage_total", direction="outbound", event="disagree")
    got = replies(lab, "reviews", "x-traffic-color=stable", "baggage=traffic-color=canary")
    assert got == {("OK", "reviews-stable", "stable", "traffic-color=stable")}
    after = metric(lab, "traffic_color_baggage_total", direction="outbound", event="disagree")
    assert after == before + STREAMS
    bad = "traffic-color=canary, not a member"
    assert replies(lab, "reviews", f"baggage={bad}") == {("OK", "reviews-stable", "stable", bad)}


def test_plain_http2_keeps_its_authority_in_the_lane(lab: LaneLab) -> None:
    proc = lab.curl(
        "--http2-prior-knowledge",
        "--connect-to",
        f"reviews:{WEB}:{PROXY}",
        "-H",
        "x-traffic-color: canary",
        f"http://reviews:{WEB}/who",
    )
    assert proc.stdout == "reviews-canary", (proc.stdout, proc.stderr)
    log = lab.log("reviews-canary-web")
    assert f":authority: reviews:{WEB}" in log  # the app's name, not the lane's
    assert "x-traffic-color: canary" in log
    assert "baggage: traffic-color=canary" in log
