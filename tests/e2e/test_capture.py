"""Transparent capture end to end: an app that knows nothing of proxies, in the demo's pod.

The sidecar runs as root in the pod namespace with ``capture.enabled`` and the
kernel data path of the demo (canary routed by table 102 in the node). The app
is another uid (``setpriv --reuid 65534``) with no proxy variables: plain curl
calls to the service address, raw TCP, and a server-first protocol. Inbound,
the node namespace calls the app's own port on the pod address. Tables are
read back with ``nft``, independently of the sidecar.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.demo import run as demo
from sidecar.demo.topology import POD_V4, POD_V6, SERVICE_V4, SERVICE_V6, STABLE_V4, Topology
from tests.e2e import kernel_packets, require_kernel, start_sidecar, world
from tests.netns.netnsutil import Lab

pytestmark = pytest.mark.root

STABLE, CANARY = demo.STABLE_HOST, demo.CANARY_HOST
APP_PORT = 8080
ECHO_PORT = 7007  # client-first raw TCP: detected as opaque
BANNER_PORT = 5432  # server-first (PostgreSQL's port): detection skipped
EXCLUDED_PORT = 8081
NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
CLEAN_ENV = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]  # no proxy variables
APP_PYTHON = "/usr/bin/python3"  # the app's interpreter: uid 65534 cannot enter the test's venv
BACKEND = Path(__file__).resolve().parents[2] / "sidecar" / "demo" / "backend.py"  # stdlib only

CAPTURE = f"""\
capture:
  enabled: true
  detect_timeout: 3
  outbound:
    exclude_ports: [{EXCLUDED_PORT}]
    exclude_cidrs: ["198.18.2.0/24", "fd00:2::/64"]
"""

# Echo, and a server that speaks first then echoes: both byte for byte.
RAW_SERVER = r"""
import socket, sys, threading
host, port, banner = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode()
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
srv = socket.socket(fam); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port)); srv.listen(16)
def serve(c):
    with c:
        if banner:
            c.sendall(banner)
        while (data := c.recv(65536)):
            c.sendall(data)
for _ in range(200):
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

# A raw client as the app: connect, optionally read a banner first, send, read back.
RAW_CLIENT = r"""
import random, socket, sys
host, port, nbanner = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seed, size = sys.argv[4].split(":")
payload = random.Random(seed).randbytes(int(size))
s = socket.create_connection((host, port), timeout=2.5)
got = b""
while len(got) < nbanner:
    got += s.recv(nbanner - len(got)) or b"!"
s.sendall(payload); s.shutdown(socket.SHUT_WR)
back = b""
while (chunk := s.recv(65536)):
    back += chunk
print(got.decode().strip() or "-", back == payload, len(back))
"""


def _policy(node_netns: str) -> str:
    text = demo.kernel_policy(node_netns)
    rules = (
        '  app: "127.0.0.1:8080"\n  rules:\n'
        "    - match: {header: {name: x-user, value: beta}}\n      color: canary\n"
    )
    text = text.replace('  app: "127.0.0.1:8080"\n', rules)
    return text + CAPTURE


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    require_kernel()
    with world("tci12") as topo:
        for port, banner in ((ECHO_PORT, ""), (BANNER_PORT, "HELLO-SERVER-FIRST\n")):
            for host in (SERVICE_V4, SERVICE_V6):
                topo.spawn("stable", [sys.executable, "-c", RAW_SERVER, host, str(port), banner])
        topo.spawn(
            "stable",
            [sys.executable, "-m", "sidecar.demo.backend", "--name", "excluded-port",
             "--port", str(EXCLUDED_PORT)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        # The app: a backend that says which color header reached it, as another uid.
        topo.spawn(
            "pod",
            [*NOBODY, APP_PYTHON, str(BACKEND), "--name", "app", "--port", str(APP_PORT)],
            stdout=subprocess.DEVNULL,
        )
        sc = start_sidecar(topo, tmp_path_factory.mktemp("capture"), policy_text=_policy(
            topo.path("node")))  # fmt: skip
        try:
            yield topo, sc
        finally:
            sc.stop()


def app_curl(topo: Topology, url: str, *headers: str) -> dict:
    """A plain curl from the app (uid 65534, no proxy variables); the backend's JSON."""
    argv = [*NOBODY, *CLEAN_ENV, "curl", "-sg", "-m", "5"]
    for h in headers:
        argv += ["-H", h]
    out = topo.exec("pod", [*argv, url], timeout=15, check=False)
    try:
        return json.loads(out.stdout)
    except ValueError:
        return {"error": out.stdout[:200] + out.stderr[:200]}


def app_raw(topo: Topology, host: str, port: int, size: int, banner: int = 0) -> tuple:
    """(banner read first, whether the echo matched byte for byte, bytes echoed)."""
    argv = [*NOBODY, *CLEAN_ENV, APP_PYTHON, "-c", RAW_CLIENT]
    payload = f"{os.urandom(4).hex()}:{size}"  # the same bytes, made from a seed on both ends
    out = topo.exec("pod", [*argv, host, str(port), str(banner), payload], timeout=15)
    got, same, n = out.stdout.split()
    return got, same == "True", int(n)


def metric(sc, name: str, **labels: str) -> float:
    status, text = sc.get("/metrics")
    assert status == 200
    return demo.metric_value(text, name, labels)


def _nft_tables(netns: str) -> list[str]:
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-j", "list", "tables"],
        capture_output=True, text=True, check=True, timeout=20,
    ).stdout  # fmt: skip
    return [e["table"]["name"] for e in json.loads(out)["nftables"] if "table" in e]


@pytest.mark.parametrize("svc", [SERVICE_V4, f"[{SERVICE_V6}]"], ids=["ipv4", "ipv6"])
def test_plain_calls_get_the_pods_color(captured, svc):
    topo, sc = captured
    before = metric(sc, "traffic_color_connections_total", direction="outbound", protocol="http1")
    answer = app_curl(topo, f"http://{svc}/")
    assert (answer.get("host"), answer.get("color")) == (STABLE, "stable"), answer
    after = metric(sc, "traffic_color_connections_total", direction="outbound", protocol="http1")
    assert after == before + 1, "the call went through the sidecar's front door"


@pytest.mark.parametrize("svc", [SERVICE_V4, f"[{SERVICE_V6}]"], ids=["ipv4", "ipv6"])
def test_a_propagated_color_is_kept_and_routed_by_the_kernel(captured, svc):
    """canary reaches the canary host only through table 102, chosen by the flow's mark."""
    topo, sc = captured
    before = kernel_packets(sc, color="canary", hook="ingress")
    answer = app_curl(topo, f"http://{svc}/", "x-traffic-color: canary")
    assert (answer.get("host"), answer.get("color")) == (CANARY, "canary"), answer
    assert kernel_packets(sc, color="canary", hook="ingress") > before
    # An unknown color is replaced by the pod's, as in HTTP_PROXY mode.
    answer = app_curl(topo, f"http://{svc}/", "x-traffic-color: purple")
    assert (answer.get("host"), answer.get("color")) == (STABLE, "stable"), answer


@pytest.mark.parametrize("host", [SERVICE_V4, SERVICE_V6], ids=["ipv4", "ipv6"])
def test_raw_tcp_is_relayed_byte_for_byte_with_the_pods_color(captured, host):
    topo, sc = captured
    size = 300_000
    opaque = ("traffic_color_connections_total", {"direction": "outbound", "protocol": "opaque"})
    n0 = metric(sc, opaque[0], **opaque[1])
    b0 = metric(sc, "traffic_color_opaque_bytes_total", direction="outbound", color="stable")
    k0 = kernel_packets(sc, color="stable", hook="ingress")
    _, same, n = app_raw(topo, host, ECHO_PORT, size)
    assert (same, n) == (True, size)
    assert metric(sc, opaque[0], **opaque[1]) == n0 + 1
    moved = metric(sc, "traffic_color_opaque_bytes_total", direction="outbound", color="stable")
    assert moved - b0 == 2 * size
    assert kernel_packets(sc, color="stable", hook="ingress") > k0, "the relay's flow was marked"


@pytest.mark.parametrize("host", [SERVICE_V4, SERVICE_V6], ids=["ipv4", "ipv6"])
def test_a_server_first_protocol_on_an_opaque_port_does_not_stall(captured, host):
    """The client waits for the banner: detection would wait for it (3 s) and time out first."""
    topo, _ = captured
    banner = "HELLO-SERVER-FIRST\n"
    t0 = time.monotonic()
    assert app_raw(topo, host, BANNER_PORT, 5000, banner=len(banner)) == (
        banner.strip(),
        True,
        5000,
    )
    assert time.monotonic() - t0 < 2.5


def test_excluded_ports_and_cidrs_are_not_captured(captured):
    topo, sc = captured
    before = metric(sc, "traffic_color_connections_total", direction="outbound", protocol="http1")
    answer = app_curl(topo, f"http://{SERVICE_V4}:{EXCLUDED_PORT}/")
    assert (answer.get("host"), answer.get("color")) == ("excluded-port", None), answer
    answer = app_curl(topo, f"http://{STABLE_V4}/")  # inside exclude_cidrs
    assert (answer.get("host"), answer.get("color")) == (STABLE, None), answer
    after = metric(sc, "traffic_color_connections_total", direction="outbound", protocol="http1")
    assert after == before


@pytest.mark.parametrize("pod", [POD_V4, f"[{POD_V6}]"], ids=["ipv4", "ipv6"])
def test_inbound_calls_reach_the_app_on_its_port_colored_by_the_rules(captured, pod):
    topo, sc = captured
    url = f"http://{pod}:{APP_PORT}/"
    before = metric(sc, "traffic_color_connections_total", direction="inbound", protocol="http1")
    for headers, color in (((), "stable"), (("x-user: beta",), "canary")):
        argv = ["curl", "-sg", "--noproxy", "*", "-m", "5"]
        for h in headers:
            argv += ["-H", h]
        out = topo.exec("node", [*argv, url], timeout=15, check=False).stdout
        answer = json.loads(out) if out.startswith("{") else {"error": out}
        assert (answer.get("host"), answer.get("color")) == ("app", color), answer
    after = metric(sc, "traffic_color_connections_total", direction="inbound", protocol="http1")
    assert after == before + 2


def test_the_admin_port_is_never_captured(captured):
    topo, _ = captured
    out = topo.exec(
        "node", ["curl", "-s", "--noproxy", "*", "-m", "5", f"http://{POD_V4}:{demo.ADMIN_PORT}/readyz"],
        timeout=15, check=False,
    ).stdout  # fmt: skip
    assert out.strip().startswith("ready"), out


def test_one_table_of_ours_while_running(captured):
    topo, _ = captured
    assert _nft_tables(topo.names["pod"]).count("traffic_color") == 1


# ------------------------------------------------------------------ lifecycle


LIFECYCLE_POLICY = """\
version: 1
inbound: {listen: "0.0.0.0:15006", app: "127.0.0.1:8080"}
outbound: {listen: "127.0.0.1:15001"}
admin: {listen: "127.0.0.1:15090"}
timeouts: {drain: 1}
capture: {enabled: true}
"""


def _start(ns: str, policy: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "sidecar", "run", "--policy",
             str(policy)],
            stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip


def _wait_ready(ns: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until ``/readyz`` answers ready: only once the table is in (bounded)."""
    deadline = time.monotonic() + 30
    probe = ["ip", "netns", "exec", ns, "curl", "-s", "-m", "1", "http://127.0.0.1:15090/readyz"]
    while not subprocess.run(probe, capture_output=True, text=True, timeout=10).stdout.startswith(
        "ready"
    ):
        assert proc.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.1)


def test_sigterm_removes_the_table_and_a_restart_after_sigkill_leaves_one(tmp_path):
    require_kernel()
    policy = tmp_path / "policy.yaml"
    policy.write_text(LIFECYCLE_POLICY)
    log = tmp_path / "sidecar.log"
    with Lab() as lab:
        ns = lab.netns("tcapl")
        proc = _start(ns, policy, log)
        _wait_ready(ns, proc, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-2000:]
        assert _nft_tables(ns) == [], "SIGTERM left our table behind"
        proc = _start(ns, policy, log)
        _wait_ready(ns, proc, log)
        proc.kill()
        proc.wait(10)
        assert _nft_tables(ns) == ["traffic_color"], "a crash leaves the table (replaced later)"
        proc = _start(ns, policy, log)
        try:
            _wait_ready(ns, proc, log)
            ruleset = subprocess.run(
                ["ip", "netns", "exec", ns, "nft", "list", "ruleset"],
                capture_output=True, text=True, check=True, timeout=20,
            ).stdout  # fmt: skip
            assert _nft_tables(ns) == ["traffic_color"]
            assert ruleset.count("chain output") == 1 and ruleset.count("chain prerouting") == 1
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        assert _nft_tables(ns) == []


def test_a_table_installed_by_an_init_container_is_served_with_capture_disabled(tmp_path):
    """Kubernetes' shape: ``capture install`` first (init container), then the sidecar with
    ``enabled: false``; the app's plain call is colored all the same, and the sidecar's
    own connection, marked, does not loop back (it runs as root here)."""
    require_kernel()
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        LIFECYCLE_POLICY.replace("capture: {enabled: true}", "capture: {enabled: false}")
    )
    log = tmp_path / "sidecar.log"
    with Lab() as lab:
        pod, srv = lab.netns("tcapk"), lab.netns("tcaps")
        lab.veth(pod, "eth0", srv, "eth0")
        for ns, addr in ((pod, "198.18.60.1/24"), (srv, "198.18.60.2/24")):
            subprocess.run(
                ["ip", "-n", ns, "addr", "add", addr, "dev", "eth0"], check=True, timeout=20
            )
        backend = subprocess.Popen(
            ["ip", "netns", "exec", srv, APP_PYTHON, str(BACKEND), "--name", "svc", "--port", "80"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        install = subprocess.run(
            ["ip", "netns", "exec", pod, sys.executable, "-m", "sidecar", "capture", "install",
             "--policy", str(policy)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert install.returncode == 0, install.stderr
        proc = _start(pod, policy, log)
        try:
            _wait_ready(pod, proc, log)
            argv = [*NOBODY, *CLEAN_ENV, "curl", "-s", "-m", "5", "http://198.18.60.2/"]
            deadline = time.monotonic() + 10
            while True:
                out = subprocess.run(["ip", "netns", "exec", pod, *argv], capture_output=True,
                                     text=True, timeout=15).stdout  # fmt: skip
                if out.startswith("{") or time.monotonic() > deadline:
                    break
                time.sleep(0.2)  # the backend may still be starting
            answer = json.loads(out) if out.startswith("{") else {"error": out}
            assert (answer.get("host"), answer.get("color")) == ("svc", "stable"), answer
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            backend.terminate()
            backend.wait(10)
        # The sidecar did not install the table, so it leaves it to whoever did.
        assert _nft_tables(pod) == ["traffic_color"]
