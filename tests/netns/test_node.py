"""The node agent (``traffic-color node``) on a cluster-shaped topology, real TCP and UDP.

    pod-a ns              node ns (the agent runs here)                 stable ns
    eth0 198.18.11.2 ---- veth-a 198.18.11.1    n-s 198.18.2.1 ---- s0 198.18.2.2, lo SVC
         fd00:11::2          fd00:11::1            fd00:2::1            fd00:2::2
    pod-b ns                                    n-k 198.18.3.1 ---- canary ns
    eth0 198.18.12.2 ---- veth-b 198.18.12.1       fd00:3::1        k0 198.18.3.2, lo SVC
         fd00:12::2          fd00:12::1                                 fd00:3::2

Both service hosts hold the same service address (198.18.100.1, fd00:100::1).
The node's main table sends it to stable; the canary color's table 102 sends
it to canary. Pods only set DSCP on their sockets, as a sidecar without
capabilities does (IP_TOS / IPV6_TCLASS); a flow reaches canary only if the
agent's classifier at tc ingress of the pod's host-side interface read the
canary DSCP and set the mark that ``ip rule fwmark`` routes. The answering
host's name is the proof.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns.netnsutil import Lab, ip, ns_http_get, ns_socket, servers, sysctl, tc

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]
SVC4, SVC6, PORT, UDP_PORT = "198.18.100.1", "fd00:100::1", 8080, 9090
ADMIN = 16091
ADMIN_URL = f"http://127.0.0.1:{ADMIN}"
SIDECAR = (sys.executable, "-m", "sidecar")
NO_CAPS = ("setpriv", "--bounding-set", "-all", "--inh-caps", "-all", "--ambient-caps", "-all")
STABLE_DSCP, CANARY_DSCP, DARK_DSCP, FOREIGN_DSCP = 8, 10, 14, 12
PODS = {"a": 11, "b": 12, "c": 13}  # pod name -> its /24 and /64 number


def nsexec(netns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv]


def policy_text(*, canary_mark: int = 0x2, restore: int | None = None) -> str:
    restore_line = f"  restore_dscp: {restore}\n" if restore is not None else ""
    return (
        textwrap.dedent(f"""\
        version: 1
        mark_mask: 0xff
        colors:
          stable: {{mark: 0x1, dscp: {STABLE_DSCP}}}
          canary: {{mark: {canary_mark:#x}, dscp: {CANARY_DSCP}}}
          dark: {{mark: 0x4, dscp: {DARK_DSCP}}}
        datapath:
          routing:
            colors:
              canary:
                table: 102
                routes:
                  - {{dst: 198.18.100.0/24, via: 198.18.3.2}}
                  - {{dst: "fd00:100::/64", via: "fd00:3::2"}}
        node:
          interfaces: ["veth*"]
          admin_listen: "127.0.0.1:{ADMIN}"
        """)
        + restore_line
    )


class Topo:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.node = lab.netns("i15n")
        self.stable, self.canary = lab.netns("i15s"), lab.netns("i15k")
        self.pods: dict[str, str] = {}
        n = self.node
        lab.veth(n, "n-s", self.stable, "s0")
        lab.veth(n, "n-k", self.canary, "k0")
        for dev, v4, v6 in (
            ("n-s", "198.18.2.1/24", "fd00:2::1/64"),
            ("n-k", "198.18.3.1/24", "fd00:3::1/64"),
        ):
            ip("addr", "add", v4, "dev", dev, netns=n)
            ip("addr", "add", v6, "dev", dev, "nodad", netns=n)
        for key, value in (
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ):
            sysctl(n, key, value)
        ip("route", "add", f"{SVC4}/32", "via", "198.18.2.2", netns=n)
        ip("-6", "route", "add", f"{SVC6}/128", "via", "fd00:2::2", netns=n)
        for host, dev, net in ((self.stable, "s0", "2"), (self.canary, "k0", "3")):
            ip("addr", "add", f"198.18.{net}.2/24", "dev", dev, netns=host)
            ip("addr", "add", f"fd00:{net}::2/64", "dev", dev, "nodad", netns=host)
            ip("addr", "add", f"{SVC4}/32", "dev", "lo", netns=host)
            ip("addr", "add", f"{SVC6}/128", "dev", "lo", netns=host)
            ip("route", "add", "default", "via", f"198.18.{net}.1", netns=host)
            ip("-6", "route", "add", "default", "via", f"fd00:{net}::1", netns=host)
        self.add_pod("a")
        self.add_pod("b")

    def add_pod(self, name: str) -> str:
        """A pod namespace and its veth; the host side is ``veth-NAME`` in the node."""
        pod, net, n = self.lab.netns(f"i15p{name}"), PODS[name], self.node
        self.lab.veth(pod, "eth0", n, f"veth-{name}")
        ip("addr", "add", f"198.18.{net}.1/24", "dev", f"veth-{name}", netns=n)
        ip("addr", "add", f"fd00:{net}::1/64", "dev", f"veth-{name}", "nodad", netns=n)
        sysctl(n, f"net.ipv4.conf.veth-{name}.rp_filter", "0")
        ip("addr", "add", f"198.18.{net}.2/24", "dev", "eth0", netns=pod)
        ip("addr", "add", f"fd00:{net}::2/64", "dev", "eth0", "nodad", netns=pod)
        ip("route", "add", "default", "via", f"198.18.{net}.1", netns=pod)
        ip("-6", "route", "add", "default", "via", f"fd00:{net}::1", netns=pod)
        self.pods[name] = pod
        return pod

    def ours(self) -> dict[str, list[str]]:
        """Every kernel object of ours in the node: filters, rules, routes."""
        out: dict[str, list[str]] = {"filters": [], "rules": [], "routes": []}
        for line in ip("-o", "link", netns=self.node).splitlines():
            dev = line.split(":")[1].strip().split("@")[0]
            shown = tc("filter", "show", "dev", dev, "ingress", netns=self.node, check=False)
            out["filters"] += [f"{dev}: {x}" for x in shown.splitlines() if "traffic-color" in x]
        for fam in ("-4", "-6"):
            rules = ip(fam, "rule", netns=self.node)
            out["rules"] += [x.strip() for x in rules.splitlines() if "proto 165" in x]
            routes = ip(fam, "route", "show", "table", "all", netns=self.node)
            out["routes"] += [x for x in routes.splitlines() if "proto 165" in x]
        return out

    def clsact(self, dev: str) -> bool:
        return "clsact" in tc("qdisc", "show", "dev", dev, netns=self.node, check=False)


class Agent:
    """``traffic-color node`` as a process inside the node namespace."""

    def __init__(self, topo: Topo, policy: Path, *argv: str) -> None:
        self.topo = topo
        self.log = policy.with_suffix(f".{time.monotonic_ns()}.log")
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        cmd = ["ip", "netns", "exec", topo.node, *argv, sys.executable, "-m", "sidecar"]
        cmd += ["node", "--policy", str(policy)]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=out, env=env, cwd=ROOT)

    def get(self, path: str) -> tuple[int, str]:
        """GET the admin port from inside the node namespace."""
        return ns_http_get(self.topo.node, ADMIN, path)

    def status(self) -> dict:
        return json.loads(self.get("/status")[1])

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(OSError, ValueError, IndexError):
                if self.get("/readyz")[0] == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"agent not ready in {timeout} s:\n{self.tail()}")

    def attached(self) -> set[str]:
        return {i["interface"] for i in self.status()["datapath"]["interfaces"]}

    def signal(self, sig: int) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(30)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def ds_socket(netns: str, family: int, kind: int, dscp: int) -> socket.socket:
    """A socket in a pod that carries ``dscp``, as the sidecar's upstream sockets do."""
    s = ns_socket(netns, family, kind)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS, dscp << 2)
    else:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, dscp << 2)
    return s


def ask(netns: str, dst: str, dscp: int, timeout: float = 5.0) -> str:
    """Connect from a pod with ``dscp``; return the name of the host that answered."""
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with ds_socket(netns, family, socket.SOCK_STREAM, dscp) as s:
        s.settimeout(timeout)
        s.connect((dst, PORT))
        s.sendall(b"who?\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(256)
            if not chunk:
                raise ConnectionError("closed by the peer")
            buf += chunk
        return buf.decode().strip()


class UdpSink:
    """Receives datagrams on the service address of a host and records (payload, TOS)."""

    def __init__(self, netns: str, address: str) -> None:
        self.v6 = ":" in address
        self.sock = ns_socket(
            netns, socket.AF_INET6 if self.v6 else socket.AF_INET, socket.SOCK_DGRAM
        )
        if self.v6:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVTCLASS, 1)
        else:
            self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_RECVTOS, 1)
        self.sock.bind((address, UDP_PORT))
        self.sock.settimeout(0.2)
        self.got: list[tuple[bytes, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, anc, _, _ = self.sock.recvmsg(256, 64)
            except (TimeoutError, OSError):
                continue
            tos = next((c[2][0] for c in anc if c[1] in (socket.IP_TOS, socket.IPV6_TCLASS)), -1)
            self.got.append((data, tos))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def send_udp(netns: str, dst: str, dscp: int, payload: bytes) -> None:
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with ds_socket(netns, family, socket.SOCK_DGRAM, dscp) as s:
        s.sendto(payload, (dst, UDP_PORT))


def received(sinks: dict[str, UdpSink], payload: bytes, timeout: float = 3.0) -> tuple[str, int]:
    """(which host, TOS it arrived with) for a datagram sent before."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, sink in sinks.items():
            for data, tos in sink.got:
                if data == payload:
                    return name, tos
        time.sleep(0.02)
    raise AssertionError(f"{payload!r} arrived nowhere")


@pytest.fixture(scope="module")
def topo() -> Iterator[Topo]:
    with Lab() as lab:
        t = Topo(lab)
        with servers(
            (t.stable, SVC4, PORT, "stable"),
            (t.canary, SVC4, PORT, "canary"),
            (t.stable, SVC6, PORT, "stable"),
            (t.canary, SVC6, PORT, "canary"),
        ):
            yield t


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(policy_text())
    return path


@pytest.fixture
def agent(topo: Topo, policy_file: Path) -> Iterator[Agent]:
    a = Agent(topo, policy_file)
    try:
        a.wait_ready()
        yield a
    finally:
        a.stop()
        assert topo.ours() == {"filters": [], "rules": [], "routes": []}, a.tail()


# ------------------------------------------------------------------ routing by color


@pytest.mark.parametrize("svc", [SVC4, SVC6], ids=["ipv4", "ipv6"])
def test_two_pods_routed_apart_by_the_node(topo, agent, svc):
    a, b = topo.pods["a"], topo.pods["b"]
    assert ask(b, svc, CANARY_DSCP) == "canary", "the canary pod's flow is routed by the node"
    assert ask(a, svc, STABLE_DSCP) == "stable", "stable has no table: main"
    assert ask(a, svc, DARK_DSCP) == "stable", "a color without a table falls back to main"
    assert ask(a, svc, 0) == "stable", "no DSCP at all: main"
    assert ask(a, svc, CANARY_DSCP) == "canary", "the color, not the pod, decides"
    st = agent.status()
    assert st["kind"] == "node" and st["ready"]
    counters = st["datapath"]["counters"]
    assert counters["canary"]["veth-b"]["packets"] >= 3, counters
    assert counters["canary"]["veth-a"]["packets"] >= 3
    assert counters["stable"]["veth-a"]["packets"] >= 3
    assert "veth-b" not in counters.get("stable", {})
    assert agent.attached() == {"veth-a", "veth-b"}, "n-s and n-k match no glob"


def test_metrics_and_status_command(topo, agent):
    assert ask(topo.pods["b"], SVC4, CANARY_DSCP) == "canary"
    code, text = agent.get("/metrics")
    assert code == 200
    lines = [x for x in text.splitlines() if x.startswith("traffic_color_node_")]
    canary = [x for x in lines if x.startswith('traffic_color_node_packets_total{color="canary"')]
    assert any('interface="veth-b"' in x and float(x.split()[-1]) >= 3 for x in canary), lines
    assert any(x.startswith("traffic_color_node_bytes_total{") for x in lines)
    assert "traffic_color_node_attached_interfaces 2.0" in lines
    assert "traffic_color_node_attach_errors_total 0.0" in lines
    assert 'traffic_color_node_policy_reloads_total{result="ok"} 0.0' in lines
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        nsexec(topo.node, sys.executable, "-m", "sidecar", "status", "--admin", ADMIN_URL),
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert "node agent" in out.stdout and "tc ingress on veth-b" in out.stdout
    assert "fwmark 0x2/0xff lookup 102" in out.stdout
    route = json.loads(agent.get(f"/debug/route?color=canary&dst={SVC4}")[1])
    assert route["kernel"]["table"] == 102 and route["agrees"], route


def test_doctor_against_the_node(topo, agent, policy_file):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = ["ip", "netns", "exec", topo.node, sys.executable, "-m", "sidecar", "doctor"]
    out = subprocess.run(
        [*cmd, "--node", "--policy", str(policy_file)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert "[ ok ] node_filters" in out.stdout, out.stdout
    assert "2 interface(s) matching veth*" in out.stdout


# ------------------------------------------------------------------ DSCP on the wire


@pytest.mark.parametrize("svc", [SVC4, SVC6], ids=["ipv4", "ipv6"])
def test_foreign_dscp_passes_untouched_and_restore_rewrites_colors(topo, policy_file, svc):
    """UDP shows the DS field as it arrives: a color's is restored, any other kept."""
    policy_file.write_text(policy_text(restore=0))
    sinks = {"stable": UdpSink(topo.stable, svc), "canary": UdpSink(topo.canary, svc)}
    a = Agent(topo, policy_file)
    try:
        a.wait_ready()
        pod = topo.pods["a"]
        send_udp(pod, svc, FOREIGN_DSCP, b"foreign")
        send_udp(pod, svc, CANARY_DSCP, b"canary")
        send_udp(pod, svc, 46, b"ef")
        assert received(sinks, b"foreign") == ("stable", FOREIGN_DSCP << 2)
        assert received(sinks, b"ef") == ("stable", 46 << 2)
        assert received(sinks, b"canary") == ("canary", 0), "routed as canary, DSCP restored"
    finally:
        a.stop()
        for s in sinks.values():
            s.close()
    assert topo.ours() == {"filters": [], "rules": [], "routes": []}


# ------------------------------------------------------------------ pods come and go


def test_a_pod_added_while_the_agent_runs_is_attached_within_a_second(topo, agent):
    pod = topo.add_pod("c")
    appeared = time.monotonic()
    while "veth-c" not in agent.attached():
        assert time.monotonic() - appeared < 5, agent.tail()
        time.sleep(0.02)
    took = time.monotonic() - appeared
    assert took < 1.0, f"attached after {took:.2f} s"
    assert ask(pod, SVC4, CANARY_DSCP) == "canary"
    assert ask(pod, SVC6, STABLE_DSCP) == "stable"

    # Its interface vanishes while a flow of it is open: forgotten, no error, others go on.
    family = socket.AF_INET
    flow = ds_socket(pod, family, socket.SOCK_STREAM, CANARY_DSCP)
    flow.settimeout(5)
    flow.connect((SVC4, PORT))
    flow.sendall(b"who?\n")
    assert flow.recv(64) == b"canary\n"
    ip("link", "del", "veth-c", netns=topo.node)
    topo.lab.namespaces.remove(pod)
    ip("netns", "del", pod)
    deadline = time.monotonic() + 5
    while "veth-c" in agent.attached():
        assert time.monotonic() < deadline, agent.tail()
        time.sleep(0.02)
    flow.close()
    assert agent.get("/readyz")[0] == 200, agent.tail()
    assert ask(topo.pods["b"], SVC4, CANARY_DSCP) == "canary"
    assert "Traceback" not in agent.log.read_text() and " ERROR " not in agent.log.read_text()
    # Its counts stay exported under its name: counters never go backwards.
    st = agent.status()
    assert st["datapath"]["counters"]["canary"]["veth-c"]["packets"] >= 3
    # Attach, detach and link events were the children's work: the agent holds none of it.
    assert st["process"]["modules_of_note"] == dict.fromkeys(
        ("bcc", "pyroute2", "nftables", "sidecar.datapath.child"), False
    )
    assert st["process"]["llvm_mapped"] is False


# ------------------------------------------------------------------ reload


def test_reload_moves_a_color_without_unmarked_packets(topo, agent, policy_file):
    """New connections keep reaching canary while the canary mark changes under them."""
    b = topo.pods["b"]
    stop = threading.Event()
    answers: list[str] = []

    def keep_asking() -> None:
        deadline = time.monotonic() + 20
        while not stop.is_set() and time.monotonic() < deadline and len(answers) < 2000:
            answers.append(ask(b, SVC4, CANARY_DSCP))

    worker = threading.Thread(target=keep_asking)
    worker.start()
    try:
        time.sleep(0.3)
        before = agent.status()["policy"]["digest"]
        policy_file.write_text(policy_text(canary_mark=0x6))
        agent.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while agent.status()["policy"]["digest"] == before:
            assert time.monotonic() < deadline, agent.tail()
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        stop.set()
        worker.join(30)
    assert len(answers) > 10
    assert set(answers) == {"canary"}, f"{answers.count('stable')} of {len(answers)} went stable"
    assert topo.ours()["rules"] == ["10002:\tfrom all fwmark 0x6/0xff lookup 102 proto 165"] * 2

    policy_file.write_text("version: 1\nnode: {interfaces: [veth*]\n")  # broken: rejected
    agent.proc.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    assert "reload (SIGHUP) rejected" in agent.log.read_text()
    assert ask(b, SVC6, CANARY_DSCP) == "canary", "the running policy stays"
    reloads = {
        line.split('"')[1]: float(line.split()[-1])
        for line in agent.get("/metrics")[1].splitlines()
        if line.startswith("traffic_color_node_policy_reloads_total{")
    }
    # SIGHUP and the file watcher may both have read each version of the file.
    assert reloads["ok"] == 1 and reloads["rejected"] >= 1, reloads


# ------------------------------------------------------------------ cleanup


def test_sigterm_removes_everything_and_sigkill_leftovers_are_replaced(topo, policy_file):
    first = Agent(topo, policy_file)
    try:
        first.wait_ready()
        assert first.signal(signal.SIGKILL) == -signal.SIGKILL
        left = topo.ours()
        assert len(left["filters"]) == 2 and len(left["rules"]) == 2 and left["routes"], left
        second = Agent(topo, policy_file)
        second.wait_ready()
        now = topo.ours()
        assert len(now["filters"]) == 2, f"leftovers doubled: {now['filters']}"
        assert sorted(now["rules"]) == sorted(left["rules"])
        assert sorted(now["routes"]) == sorted(left["routes"])
        assert ask(topo.pods["b"], SVC4, CANARY_DSCP) == "canary"
        assert second.signal(signal.SIGTERM) == 0, second.tail()
    finally:
        first.stop()
        with contextlib.suppress(NameError):
            second.stop()
    assert topo.ours() == {"filters": [], "rules": [], "routes": []}
    assert not topo.clsact("veth-a") and not topo.clsact("veth-b"), "our clsact qdiscs go too"
    assert ask(topo.pods["b"], SVC4, CANARY_DSCP) == "stable", "unrouted once the agent is gone"


# ------------------------------------------------------------------ a sidecar without capabilities


POD_PORTS = 'outbound: {listen: "127.0.0.1:15001"}\nadmin: {listen: "127.0.0.1:15090"}\n'
POD_PORTS += 'inbound: {listen: "127.0.0.1:15006"}\n'


@contextlib.contextmanager
def http_backends(topo: Topo) -> Iterator[None]:
    """``stable-host`` and ``canary-host`` HTTP backends on the service address, port 8081."""
    procs = [
        subprocess.Popen(
            nsexec(
                host, sys.executable, "-m", "sidecar.demo.backend", "--name", name, "--port", "8081"
            ),
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for host, name in ((topo.stable, "stable-host"), (topo.canary, "canary-host"))
    ]
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def pod_curl(pod: str, *args: str) -> str:
    got = subprocess.run(
        nsexec(pod, "curl", "-s", *args), capture_output=True, text=True, timeout=10
    )
    return got.stdout


@contextlib.contextmanager
def pod_sidecar(pod: str, policy: Path, log: Path, *prefix: str) -> Iterator[subprocess.Popen]:
    """``traffic-color run`` in ``pod`` (color canary, after ``prefix``), until ready."""
    with open(log, "wb") as out:
        sidecar = subprocess.Popen(
            nsexec(pod, *prefix, *SIDECAR, "run", "--policy", str(policy), "--color", "canary"),
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            stdout=out,
            stderr=out,
        )
    try:
        deadline = time.monotonic() + 30
        while pod_curl(pod, "http://127.0.0.1:15090/readyz").strip() != "ready":
            assert sidecar.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield sidecar
    finally:
        sidecar.send_signal(signal.SIGTERM)
        sidecar.wait(30)


def test_a_sidecar_without_capabilities_gets_its_canary_flow_routed(topo, agent, tmp_path):
    if shutil.which("setpriv") is None or shutil.which("curl") is None:
        pytest.fail("setpriv (util-linux) and curl are needed")
    pod = topo.pods["b"]
    sidecar_policy = tmp_path / "pod.yaml"
    sidecar_policy.write_text(policy_text().split("datapath:")[0] + POD_PORTS)
    log = tmp_path / "sidecar.log"
    with http_backends(topo), pod_sidecar(pod, sidecar_policy, log, *NO_CAPS) as sidecar:
        # ip netns exec and setpriv both exec: the pid is the sidecar's
        caps = Path(f"/proc/{sidecar.pid}/status").read_text()
        assert "CapEff:\t0000000000000000" in caps, "the sidecar must run with no capability"
        for svc in (SVC4, f"[{SVC6}]"):
            got = pod_curl(pod, "-x", "http://127.0.0.1:15001", f"http://{svc}:8081/")
            body = json.loads(got)
            assert body["host"] == "canary-host", (svc, got, log.read_text()[-2000:])
            assert body["color"] == "canary"
    counters = agent.status()["datapath"]["counters"]["canary"]["veth-b"]
    assert counters["packets"] >= 6


def test_a_reload_puts_the_new_dscp_on_a_flow_opened_before_it(topo, agent, tmp_path):
    """The pod's canary flows carry the node's ``dark`` DSCP, then, after a reload of the
    sidecar, ``stable``'s: both routed by the main table, so the pooled keep-alive flow
    lives on, and the node's per-color counters show which DSCP its packets carried."""
    pod = topo.pods["b"]
    colors = (
        "version: 1\ncolors:\n  stable: {mark: 0x1, dscp: %d}\n  canary: {mark: 0x2, dscp: %d}\n"
    )
    policy = tmp_path / "pod.yaml"
    policy.write_text(colors % (FOREIGN_DSCP, DARK_DSCP) + POD_PORTS)

    def packets(color: str) -> int:
        """Packets from pod b the node counted under ``color``, once the flow is quiet."""
        counts = agent.status()["datapath"]["counters"]
        seen = [-1, counts.get(color, {}).get("veth-b", {}).get("packets", 0)]
        while seen[-1] != seen[-2]:  # a delayed ACK may still be on its way
            time.sleep(0.3)
            counts = agent.status()["datapath"]["counters"]
            seen.append(counts.get(color, {}).get("veth-b", {}).get("packets", 0))
        return seen[-1]

    def ask() -> tuple[str, list[str]]:
        """Who answered through the sidecar, and the sidecar's flows to the service."""
        body = json.loads(pod_curl(pod, "-x", "http://127.0.0.1:15001", f"http://{SVC4}:8081/"))
        ss = subprocess.run(
            nsexec(pod, "ss", "-Htn", "state", "established", "dst", f"{SVC4}:8081"),
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        return body["host"], sorted(line.split()[2] for line in ss.stdout.splitlines())

    def digest() -> str:
        return json.loads(pod_curl(pod, "http://127.0.0.1:15090/status"))["policy"]["digest"]

    with http_backends(topo), pod_sidecar(pod, policy, tmp_path / "sidecar.log") as sidecar:
        dark, stable = packets("dark"), packets("stable")
        host, flows = ask()
        assert host == "stable-host" and len(flows) == 1, (host, flows)
        assert packets("dark") > dark and packets("stable") == stable
        dark = packets("dark")
        before = digest()
        policy.write_text(colors % (FOREIGN_DSCP, STABLE_DSCP) + POD_PORTS)
        sidecar.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while digest() == before:
            assert time.monotonic() < deadline, "the sidecar did not reload"
            time.sleep(0.1)
        assert ask() == ("stable-host", flows), "the flow opened before the reload served"
        assert packets("stable") > stable, "its packets now carry the new DSCP"
        assert packets("dark") == dark, "and none of them the old one"


def test_reload_of_interfaces_and_color_order_keeps_counts_under_their_names(
    topo, agent, policy_file
):
    """Globs that no longer name an interface take our filter off it; ids that move keep counts."""
    b = topo.pods["b"]
    assert ask(b, SVC4, CANARY_DSCP) == "canary"
    before = agent.status()["datapath"]["counters"]["canary"]["veth-b"]["packets"]
    text = policy_text().replace('["veth*"]', '["veth-a"]')
    # canary first: color ids change (canary 1, stable 2), the node's table follows by name.
    stable = f"  stable: {{mark: 0x1, dscp: {STABLE_DSCP}}}\n"
    canary = f"  canary: {{mark: 0x2, dscp: {CANARY_DSCP}}}\n"
    text = text.replace(stable + canary, canary + stable)
    assert text.index("canary:") < text.index("stable:")
    digest = agent.status()["policy"]["digest"]
    policy_file.write_text(text)
    agent.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while agent.status()["policy"]["digest"] == digest:
        assert time.monotonic() < deadline, agent.tail()
        time.sleep(0.05)
    assert agent.attached() == {"veth-a"}
    assert not [f for f in topo.ours()["filters"] if f.startswith("veth-b")]
    assert ask(b, SVC4, CANARY_DSCP) == "stable", "veth-b is no longer read"
    assert ask(topo.pods["a"], SVC4, CANARY_DSCP) == "canary"
    counters = agent.status()["datapath"]["counters"]
    assert counters["canary"]["veth-b"]["packets"] == before, "kept, not lost or re-labelled"
    assert "veth-b" not in counters.get("stable", {})
