"""Lanes in capture mode: an app that knows nothing of proxies calls a service by name.

Two namespaces (``LaneLab``): the pod, where the sidecar runs as root with
``capture.enabled`` and the app is plain curl as another uid with no proxy
variables, and the services' side, one veth away (capture leaves loopback alone).
The pod's ``/etc/netns/NAME/hosts`` gives each service name its address there, as
cluster DNS gives a Service its ClusterIP; the lab's dnsmasq answers NXDOMAIN for
every other name. The app resolves ``reviews`` itself and connects to that
address; the sidecar gets the connection through the nftables redirect, with the
address as its original destination and the name only in the Host header.

    reviews          198.18.71.2:9080   stable version
    reviews-canary   198.18.71.3:9080   canary lane
    details          198.18.71.4:9080   stable version; its lane does not resolve
    ratings          198.18.71.5:9080   stable version; its lane refuses
    ratings-canary   198.18.71.9        an address with nothing listening
    details-b        198.18.71.6:9080   another instance of details, not in the answer for details

Each service also speaks HTTP/2 on port 50080 (``nghttpd -v``, whose log shows the
headers it received), for the same calls made by curl with ``--http2-prior-knowledge``.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.demo.lanelab import LaneLab
from sidecar.demo.run import metric_value

pytestmark = pytest.mark.root

PORT = 9080
H2_PORT = 50080
H2_SERVICES = ("reviews", "reviews-canary", "details", "details-b")
POD_ADDR, NET = "198.18.71.1", "198.18.71.0/24"
ADDRS = {
    "reviews": "198.18.71.2",
    "reviews-canary": "198.18.71.3",
    "details": "198.18.71.4",
    "ratings": "198.18.71.5",
    "ratings-canary": "198.18.71.9",
    "details-b": "198.18.71.6",
}
EMPTY_LANES = {"details": "unresolved", "ratings": "refused"}  # route host -> reason
ADMIN = "127.0.0.1:15090"
NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
CLEAN_ENV = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]  # no proxy variables

# The defaults (colors stable and canary, the usual ports) plus routes and capture.
POLICY = """\
version: 1
outbound:
  routes:
    - host: reviews
      lanes: {canary: reviews-canary}
    - host: details
      lanes: {canary: details-canary}
    - host: ratings
      lanes: {canary: ratings-canary}
timeouts:
  lane_connect: 0.5
capture:
  enabled: true
"""


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LaneLab]:
    work: Path = tmp_path_factory.mktemp("lanes-capture")
    (work / "pod").mkdir()
    (work / "services").mkdir()
    with LaneLab("tclcp", work / "pod") as pod, LaneLab("tclcs", work / "services") as srv:
        for args in (
            ["-n", pod.name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
             "netns", srv.name],
            ["-n", pod.name, "addr", "add", f"{POD_ADDR}/24", "dev", "eth0"],
            ["-n", pod.name, "link", "set", "eth0", "up"],
            ["-n", srv.name, "link", "set", "eth0", "up"],
            *(["-n", srv.name, "addr", "add", f"{a}/32", "dev", "eth0"] for a in ADDRS.values()),
            ["-n", srv.name, "route", "add", NET, "dev", "eth0"],
        ):  # fmt: skip
            subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)
        for name in ("reviews", "reviews-canary", "details", "ratings", "details-b"):
            srv.service(name, f"{ADDRS[name]}:{PORT}")
        for name in H2_SERVICES:
            root = srv.workdir / f"www-{name}"
            root.mkdir()
            (root / "who").write_text(name)
            argv = ["nghttpd", "--no-tls", "-v", "-a", ADDRS[name], "-d", str(root), str(H2_PORT)]
            srv.spawn(argv, srv.workdir / f"{name}-h2.log")
            url = f"http://{ADDRS[name]}:{H2_PORT}/who"
            deadline = time.monotonic() + 10
            while srv.curl("--http2-prior-knowledge", url).stdout != name:
                assert time.monotonic() < deadline, f"nghttpd for {name} did not start"
                time.sleep(0.05)
        pod.names(ADDRS)  # details-canary is in neither: NXDOMAIN
        pod.sidecar("sidecar", POLICY, "stable", ADMIN)
        yield pod


def app_get(pod: LaneLab, host: str, *headers: str, dial: str = "") -> dict:
    """The app's plain call (uid 65534, no proxy variables): what the service saw.
    ``dial``: the address the app picked for ``host`` itself, instead of the hosts file's."""
    argv = [*NOBODY, *CLEAN_ENV, "curl", "-sS", "--max-time", "5"]
    if dial:
        argv += ["--resolve", f"{host}:{PORT}:{dial}"]
    for h in headers:
        argv += ["-H", h]
    out = subprocess.run(
        pod.argv([*argv, f"http://{host}:{PORT}/"]), capture_output=True, text=True, timeout=15
    )
    try:
        return json.loads(out.stdout)
    except ValueError:
        return {"error": (out.stdout + out.stderr)[-300:]}


def metric(pod: LaneLab, name: str, **labels: str) -> float:
    return metric_value(pod.metrics(ADMIN), name, labels)


def captured(pod: LaneLab) -> float:
    """Outbound HTTP/1 connections the front door took: the app's calls were captured."""
    return metric(pod, "traffic_color_connections_total", direction="outbound", protocol="http1")


def test_a_captured_canary_call_reaches_its_lane_with_host_and_color_kept(pod: LaneLab) -> None:
    before = captured(pod)
    got = app_get(pod, "reviews", "x-traffic-color: canary")
    assert (got.get("name"), got.get("color"), got.get("host")) == (
        "reviews-canary",
        "canary",
        f"reviews:{PORT}",
    ), got
    assert captured(pod) == before + 1


def test_a_captured_stable_call_never_enters_the_lane(pod: LaneLab) -> None:
    for headers in ((), ("x-traffic-color: stable",)):
        got = app_get(pod, "reviews", *headers)
        assert (got.get("name"), got.get("color")) == ("reviews", "stable"), got


@pytest.mark.parametrize("host", list(EMPTY_LANES))
def test_an_empty_lane_falls_back_to_the_captured_destination(pod: LaneLab, host: str) -> None:
    labels = {"host": host, "color": "canary", "reason": EMPTY_LANES[host]}
    before = metric(pod, "traffic_color_lane_fallbacks_total", **labels)
    got = app_get(pod, host, "x-traffic-color: canary")
    assert (got.get("name"), got.get("color"), got.get("host")) == (
        host,
        "canary",
        f"{host}:{PORT}",
    ), got
    assert metric(pod, "traffic_color_lane_fallbacks_total", **labels) == before + 1


def test_the_fallback_is_the_address_the_app_dialled_not_the_hosts_answer(pod: LaneLab) -> None:
    """An app that picks an instance itself (client-side balancing over a headless
    Service) gets that instance back when the lane is empty, not the name's answer."""
    labels = {"host": "details", "color": "canary", "reason": "unresolved"}
    before = metric(pod, "traffic_color_lane_fallbacks_total", **labels)
    got = app_get(pod, "details", "x-traffic-color: canary", dial=ADDRS["details-b"])
    assert (got.get("name"), got.get("color"), got.get("host")) == (
        "details-b",
        "canary",
        f"details:{PORT}",
    ), got
    assert metric(pod, "traffic_color_lane_fallbacks_total", **labels) == before + 1


def app_get_h2(pod: LaneLab, host: str, *headers: str, dial: str = "") -> tuple[str, str]:
    """The app's plain HTTP/2 call (prior knowledge, as gRPC clients make): which service
    answered, and the headers that service's log shows for it."""
    argv = [*NOBODY, *CLEAN_ENV, "curl", "-sS", "--max-time", "5", "--http2-prior-knowledge"]
    if dial:
        argv += ["--resolve", f"{host}:{H2_PORT}:{dial}"]
    for h in headers:
        argv += ["-H", h]
    out = subprocess.run(
        pod.argv([*argv, f"http://{host}:{H2_PORT}/who"]),
        capture_output=True,
        text=True,
        timeout=15,
    )
    name = out.stdout
    if name not in H2_SERVICES:
        return name + out.stderr, ""
    log = pod.workdir.parent / "services" / f"{name}-h2.log"
    time.sleep(0.1)  # nghttpd writes its log as it goes
    return name, log.read_text(errors="replace").rsplit(":method: GET", 1)[-1]


def test_a_captured_http2_canary_call_reaches_its_lane(pod: LaneLab) -> None:
    def h2() -> float:
        return metric(
            pod, "traffic_color_connections_total", direction="outbound", protocol="http2"
        )

    before = h2()
    name, seen = app_get_h2(pod, "reviews", "x-traffic-color: canary")
    assert name == "reviews-canary", name
    assert f":authority: reviews:{H2_PORT}" in seen  # the app's name, not the lane's
    assert "x-traffic-color: canary" in seen
    assert h2() == before + 1  # captured, through the HTTP/2 side
    name, seen = app_get_h2(pod, "reviews")
    assert (name, "x-traffic-color: stable" in seen) == ("reviews", True)


def test_a_captured_http2_call_falls_back_to_the_address_the_app_dialled(pod: LaneLab) -> None:
    labels = {"host": "details", "color": "canary", "reason": "unresolved"}
    before = metric(pod, "traffic_color_lane_fallbacks_total", **labels)
    name, seen = app_get_h2(pod, "details", "x-traffic-color: canary", dial=ADDRS["details-b"])
    assert name == "details-b", name
    assert f":authority: details:{H2_PORT}" in seen
    assert "x-traffic-color: canary" in seen
    assert metric(pod, "traffic_color_lane_fallbacks_total", **labels) == before + 1
