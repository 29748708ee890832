"""``make demo``: the same service address answered by stable or canary, chosen by color.

The kernel demo builds the namespaces of ``topology.py``, starts a backend in
the stable and the canary namespace, runs ``python -m sidecar run`` in the pod
(classifier at tc ingress of the node's ``to-pod``, rules and table in the
node), then plays the app: requests from the pod through the outbound port,
with and without a color header, over IPv4 and IPv6, plus one that bypasses
the sidecar. It prints who answered each, the kernel counters, the node's
rules, and checks that SIGTERM left nothing behind.

Without root or BCC it says why and shows header coloring on loopback
instead, so ``make demo`` works on any machine. Ctrl-C (or SIGTERM) at any
point stops the sidecar with SIGTERM and removes the namespaces.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sidecar.demo import backend, chain
from sidecar.demo.topology import (
    CANARY_V4,
    CANARY_V6,
    NODE_POD_IFACE,
    SERVICE_V4,
    SERVICE_V6,
    Topology,
    TopologyError,
    call_in_netns,
    stop_process,
)

COLOR_HEADER = "x-traffic-color"
OUTBOUND_PORT = 15001
ADMIN_PORT = 15090
CANARY_TABLE = 102
READY_TIMEOUT = 40.0  # the first start compiles the classifier (BCC) in a child
REQUEST_TIMEOUT = 3.0
STABLE_HOST, CANARY_HOST = "stable-host", "canary-host"
# Header values the "app" sends: none, a routed color, a color without a table, garbage.
HEADERS_SENT: tuple[str | None, ...] = (None, "canary", "blue", "purple")
POD_COLOR = "stable"


class DemoError(RuntimeError):
    """A step of the demo failed; ``detail`` holds what helps to see why (a log tail)."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


# ------------------------------------------------------------------ policies (pure)


def kernel_policy(node_netns: str) -> str:
    """The demo's policy: canary routed by table 102 in the node; ``blue`` has no table.

    Pooled upstream flows stay open for the whole run: an idle one closing in
    the middle would send packets through the classifier and move counters
    that the end-to-end tests expect to stand still.
    """
    return f"""\
version: 1
header: {COLOR_HEADER}
default_color: stable
mark_mask: 0xff
colors:
  stable: {{mark: 0x1}}
  canary: {{mark: 0x2}}
  blue: {{mark: 0x3}}
inbound:
  listen: "0.0.0.0:15006"
  app: "127.0.0.1:8080"
outbound:
  listen: "127.0.0.1:{OUTBOUND_PORT}"
admin:
  listen: "0.0.0.0:{ADMIN_PORT}"
timeouts:
  drain: 2
  upstream_idle: 600
datapath:
  enabled: true
  required: true
  flow_table_size: 4096
  attach:
    - {{interface: {NODE_POD_IFACE}, direction: ingress, netns: {node_netns}}}
  routing:
    netns: {node_netns}
    colors:
      canary:
        table: {CANARY_TABLE}
        routes:
          - {{dst: "{SERVICE_V4}/32", via: "{CANARY_V4}"}}
          - {{dst: "{SERVICE_V6}/128", via: "{CANARY_V6}"}}
"""


def loopback_policy(outbound: int, inbound: int, admin: int) -> str:
    """Header coloring only: every listener on 127.0.0.1, data path off."""
    return f"""\
version: 1
header: {COLOR_HEADER}
default_color: stable
colors:
  stable: {{mark: 0x1}}
  canary: {{mark: 0x2}}
  blue: {{mark: 0x3}}
inbound:
  listen: "127.0.0.1:{inbound}"
  app: "127.0.0.1:9"
outbound:
  listen: "127.0.0.1:{outbound}"
admin:
  listen: "127.0.0.1:{admin}"
timeouts:
  drain: 2
datapath:
  enabled: false
"""


def expected_color(sent: str | None, known: tuple[str, ...], pod_color: str) -> str:
    """The sidecar keeps a known color header and sets the pod's color otherwise."""
    return sent if sent in known else pod_color


def expected_host(color: str, routed: dict[str, str], fallback: str) -> str:
    """A color with a route table goes its own way; any other takes the main table."""
    return routed.get(color, fallback)


# ------------------------------------------------------------------ HTTP from a place


@dataclass(frozen=True)
class Answer:
    """One request as the app saw it."""

    status: int | None
    host: str | None  # which backend answered
    color: str | None  # the color header the backend received
    error: str | None = None


def fetch(
    url: str, proxy: tuple[str, int] | None, color: str | None, timeout: float = REQUEST_TIMEOUT
) -> Answer:
    """GET ``url`` directly, or through an HTTP proxy in absolute form (as HTTP_PROXY does)."""
    if proxy is not None:
        host, port, target = proxy[0], proxy[1], url
    else:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or 80
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    headers = {COLOR_HEADER: color} if color is not None else {}
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", target, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        return Answer(None, None, None, f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()
    try:
        data = json.loads(body)
    except ValueError:
        return Answer(resp.status, None, None, body[:80].decode(errors="replace"))
    return Answer(resp.status, data.get("host"), data.get("color"))


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """(status, body) of a plain GET; (0, reason) when nothing answers."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=timeout)
    try:
        conn.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as exc:
        return 0, str(exc)
    finally:
        conn.close()


class Place:
    """Where the app's sockets live: a network namespace, or this one (loopback demo)."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 30.0) -> Any:
        if self.netns is None:
            return fn(*args)
        return call_in_netns(self.netns, fn, *args, timeout=timeout)


# ------------------------------------------------------------------ the sidecar child


class SidecarProcess:
    """``python -m sidecar run`` as a child: started, awaited, stopped with SIGTERM."""

    def __init__(
        self, proc: subprocess.Popen[Any], log_path: Path, place: Place, admin: tuple[str, int]
    ) -> None:
        self.proc = proc
        self.log_path = log_path
        self.place = place
        self.admin = admin
        self.exit_code: int | None = None

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin[0]}:{self.admin[1]}"

    def get(self, path: str) -> tuple[int, str]:
        return self.place.call(http_get, self.admin_url + path)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Poll ``/readyz`` until 200; raise with the log tail if it exits or never gets there."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DemoError(
                    f"the sidecar exited with code {self.proc.returncode} before it was ready",
                    self.log_tail(),
                )
            status, body = self.get("/readyz")
            if status == 200:
                return
            last = f"{status} {body.strip()}"
            time.sleep(0.2)
        raise DemoError(
            f"the sidecar was not ready within {timeout:g}s (last /readyz: {last})", self.log_tail()
        )

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM: the sidecar drains and removes its kernel objects, then exits 0."""
        if self.exit_code is None:
            self.exit_code = stop_process(self.proc, signal.SIGTERM, grace)
        return self.exit_code

    def log_tail(self, lines: int = 15) -> str:
        """The sidecar's ERROR lines (shortened), then its last ``lines`` lines."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        all_lines = text.splitlines()
        errors = [ln[:300] for ln in all_lines if " ERROR " in ln][-5:]
        tail = all_lines[-lines:]
        return "\n".join([*errors, "...", *tail] if errors else tail)


def sidecar_argv(policy_path: Path, color: str) -> list[str]:
    return [sys.executable, "-m", "sidecar", "run", "--policy", str(policy_path), "--color", color]


def _child_env() -> dict[str, str]:
    """Our environment without anything that would steer the child's policy or proxying."""
    drop = {
        "TRAFFIC_COLOR",
        "TRAFFIC_COLOR_POLICY",
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    }
    return {k: v for k, v in os.environ.items() if k not in drop}


def start_sidecar(
    spawn: Callable[..., subprocess.Popen[Any]],
    policy_path: Path,
    color: str,
    log_path: Path,
    place: Place,
    admin: tuple[str, int],
) -> SidecarProcess:
    log_file = log_path.open("wb")
    try:
        proc = spawn(
            sidecar_argv(policy_path, color),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_child_env(),
        )
    finally:
        log_file.close()
    return SidecarProcess(proc, log_path, place, admin)


def mapped_libraries(
    pid: int,
    needles: tuple[str, ...] = ("libbcc", "libLLVM", "libclang"),
) -> list[str]:
    """Shared objects of ``pid`` whose path contains one of ``needles``."""
    found: set[str] = set()
    try:
        with open(f"/proc/{pid}/maps", encoding="ascii", errors="replace") as fh:
            for line in fh:
                fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
                path = fields[5].strip() if len(fields) == 6 else ""
                if any(n in path for n in needles):
                    found.add(path)
    except OSError:
        pass
    return sorted(found)


# ------------------------------------------------------------------ kernel state readers


def metric_lines(text: str, names: tuple[str, ...]) -> list[str]:
    """Exposition lines of the named samples, without comments. Pure."""
    return [
        ln
        for ln in text.splitlines()
        if not ln.startswith("#") and ln.split("{", 1)[0].split(" ", 1)[0] in names
    ]


def metric_value(text: str, name: str, labels: dict[str, str]) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``. Pure."""
    total = 0.0
    for line in metric_lines(text, (name,)):
        m = re.match(r"[^{\s]+(?:\{(.*)\})?\s+(\S+)", line)
        if not m:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m[1] or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m[2])
    return total


def node_rules(topo: Topology) -> list[str]:
    """The node's ``ip rule`` lines that carry a fwmark, IPv4 then IPv6."""
    out = []
    for fam, label in (("-4", "ipv4"), ("-6", "ipv6")):
        text = topo.exec("node", ["ip", fam, "rule", "show"], check=False).stdout
        out += [f"{label}  {' '.join(ln.split())}" for ln in text.splitlines() if "fwmark" in ln]
    return out


def node_filters(topo: Topology, iface: str = NODE_POD_IFACE) -> list[str]:
    """The tc filter lines on the node's ``to-pod`` (both hooks); empty means none."""
    out = []
    for hook in ("ingress", "egress"):
        proc = topo.exec("node", ["tc", "filter", "show", "dev", iface, hook], check=False)
        out += [f"{hook}  {ln.strip()}" for ln in proc.stdout.splitlines() if ln.strip()]
    return out


def node_table_routes(topo: Topology, table: int) -> list[str]:
    out = []
    for fam in ("-4", "-6"):
        proc = topo.exec("node", ["ip", fam, "route", "show", "table", str(table)], check=False)
        out += [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]
    return out


def bpffs_entries(root: str = "/sys/fs/bpf") -> set[str]:
    """Every path under the BPF filesystem, to compare before and after a run."""
    found: set[str] = set()
    with contextlib.suppress(OSError):
        for dirpath, dirnames, filenames in os.walk(root):
            found.update(os.path.join(dirpath, n) for n in dirnames + filenames)
    return found


# ------------------------------------------------------------------ printing


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join("  " + ln.rstrip() for ln in lines)


def say(text: str = "") -> None:
    print(text, flush=True)


def section(title: str) -> None:
    say()
    say(f"== {title}")


@dataclass
class Row:
    path: str  # "sidecar" or "bypass"
    family: str
    sent: str | None
    answer: Answer
    want_color: str
    want_host: str | None

    @property
    def ok(self) -> bool:
        a = self.answer
        return (
            a.status == 200
            and a.color == self.want_color
            and (self.want_host is None or a.host == self.want_host)
        )

    def cells(self) -> list[str]:
        a = self.answer
        got = a.host or f"ERROR {a.error or a.status}"[:60]
        return [
            self.path,
            self.family,
            self.sent or "(none)",
            a.color or "-",
            got,
            "ok"
            if self.ok
            else f"UNEXPECTED (want {self.want_color} from {self.want_host or 'any'})",
        ]


ROW_HEADERS = ["path", "family", "header sent", "color given", "answered by", "check"]


# ------------------------------------------------------------------ the kernel demo


def kernel_unavailable_reason() -> str | None:
    """Why the namespace demo cannot run here, or None when it can (checked, not tried)."""
    if os.geteuid() != 0:
        return "not running as root (network namespaces, tc and BPF need root)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the '{tool}' command (iproute2) is not installed"
    if importlib.util.find_spec("bcc") is None:
        return "BCC's Python module is not importable (Debian: apt install python3-bpfcc)"
    build = Path("/lib/modules") / platform.release() / "build"
    if not (build / "include").exists():
        return f"no kernel headers at {build} (run `make install` as root)"
    return None


@contextlib.contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGINT unwind as KeyboardInterrupt, so every ``with`` tears down in order.

    SIGINT is set explicitly: a process started in the background may inherit
    it ignored, and the demo must still stop cleanly on it.
    """

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def wait_for_backends(place: Place, urls: list[str], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    for url in urls:
        while True:
            answer = place.call(fetch, url, None, None, 1.0)
            if answer.status == 200:
                break
            if time.monotonic() > deadline:
                raise DemoError(
                    f"backend at {url} did not answer within {timeout:g}s: {answer.error}"
                )
            time.sleep(0.1)


def kernel_demo(keep: bool) -> list[str]:
    """The namespace demo. Returns what went wrong: empty when every check passed."""
    failures: list[str] = []
    before_bpffs = bpffs_entries()
    with (
        tempfile.TemporaryDirectory(prefix="traffic-color-demo-") as tmp,
        Topology("tcdemo") as topo,
    ):
        say(
            f"topology {topo.tag}: namespaces "
            + ", ".join(f"{r}={n}" for r, n in topo.names.items())
        )
        say(f"  service {SERVICE_V4} and {SERVICE_V6} live on both stable and canary;")
        say(f"  the node's main table sends them to stable, table {CANARY_TABLE} to canary")
        for role, name in (("stable", STABLE_HOST), ("canary", CANARY_HOST)):
            topo.spawn(
                role,
                [sys.executable, "-m", "sidecar.demo.backend", "--name", name, "--port", "80"],
                stdout=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
            )
        pod = Place(topo.pod)
        urls = [f"http://{SERVICE_V4}/", f"http://[{SERVICE_V6}]/"]
        wait_for_backends(pod, urls)

        policy_path = Path(tmp) / "policy.yaml"
        policy_path.write_text(kernel_policy(topo.path("node")))
        say(
            f"starting the sidecar in {topo.pod} (color {POD_COLOR}); classifier on "
            f"{topo.node}/{NODE_POD_IFACE} ingress"
        )
        t0 = time.monotonic()
        sc = start_sidecar(
            lambda argv, **kw: topo.spawn("pod", argv, **kw),
            policy_path,
            POD_COLOR,
            Path(tmp) / "sidecar.log",
            pod,
            ("127.0.0.1", ADMIN_PORT),
        )
        try:
            sc.wait_ready()
            say(f"  ready in {time.monotonic() - t0:.1f}s")
            failures += _kernel_requests(topo, pod, urls)
            failures += _kernel_state(topo, sc)
            if keep:
                _hold(topo)
        finally:
            code = sc.stop()
        section("after SIGTERM")
        say(f"  sidecar exit code: {code}")
        if code != 0:
            failures.append(f"sidecar exit code {code} after SIGTERM")
            say(_indent(sc.log_tail()))
        left = node_filters(topo) + node_rules(topo) + node_table_routes(topo, CANARY_TABLE)
        new_pins = sorted(bpffs_entries() - before_bpffs)
        if left or new_pins:
            failures.append("kernel objects left after SIGTERM")
            say("  cleanup: LEFT BEHIND:")
            say(_indent("\n".join(left + new_pins)))
        else:
            say("  cleanup: no filters, rules or routes left (and nothing pinned in bpffs)")
    gone = not any(Path("/var/run/netns", n).exists() for n in topo.names.values())
    say(f"  namespaces removed: {'yes' if gone else 'NO'}")
    if not gone:
        failures.append("namespaces left")
    return failures


def _kernel_requests(topo: Topology, pod: Place, urls: list[str]) -> list[str]:
    colors = ("stable", "canary", "blue")
    routed = {"canary": CANARY_HOST}
    rows = []
    for family, url in zip(("IPv4", "IPv6"), urls, strict=True):
        for sent in HEADERS_SENT:
            color = expected_color(sent, colors, POD_COLOR)
            answer = pod.call(fetch, url, ("127.0.0.1", OUTBOUND_PORT), sent)
            rows.append(
                Row(
                    "sidecar",
                    family,
                    sent,
                    answer,
                    color,
                    expected_host(color, routed, STABLE_HOST),
                )
            )
        # The app talks to the service directly: its header says canary, the kernel
        # never heard of the flow, so the main table (stable) answers.
        answer = pod.call(fetch, url, None, "canary")
        rows.append(Row("bypass", family, "canary", answer, "canary", STABLE_HOST))
    section("requests from the pod: header sent -> color given -> host that answered")
    say(table(ROW_HEADERS, [r.cells() for r in rows]))
    return [f"{r.path} {r.family} {r.sent}: {r.cells()[-1]}" for r in rows if not r.ok]


def _kernel_state(topo: Topology, sc: SidecarProcess) -> list[str]:
    failures = []
    section(f"ip rule in the node namespace ({topo.node})")
    rules = node_rules(topo)
    say(_indent("\n".join(rules)) if rules else "  (no fwmark rules!)")
    if not rules:
        failures.append("no fwmark rules in the node while the sidecar runs")
    section(f"table {CANARY_TABLE} and tc filters on {NODE_POD_IFACE}")
    say(_indent("\n".join(node_table_routes(topo, CANARY_TABLE) + node_filters(topo))))

    section("kernel counters (/metrics)")
    status, text = sc.get("/metrics")
    if status != 200:
        failures.append(f"/metrics answered {status}")
    shown = metric_lines(
        text,
        (
            "traffic_color_kernel_packets_total",
            "traffic_color_kernel_bytes_total",
            "traffic_color_datapath_attached",
        ),
    )
    shown += [
        ln
        for ln in metric_lines(text, ("traffic_color_requests_total",))
        if 'direction="outbound"' in ln
    ]
    say(_indent("\n".join(shown)) if shown else "  (no kernel series!)")
    for color in ("stable", "canary", "blue"):
        if metric_value(text, "traffic_color_kernel_packets_total", {"color": color}) <= 0:
            failures.append(f"kernel packet counter for {color} did not move")

    libs = mapped_libraries(sc.proc.pid)
    say(
        f"\n  libbcc/LLVM mapped in the long-lived sidecar (pid {sc.proc.pid}): "
        + (", ".join(libs) if libs else "none")
    )
    if libs:
        failures.append("BCC/LLVM mapped in the sidecar process")
    return failures


def _hold(topo: Topology) -> None:
    section("kept running (--keep); try, then press Enter (or Ctrl-C) to tear down:")
    say(
        f"  ip netns exec {topo.pod} curl -s -x http://127.0.0.1:{OUTBOUND_PORT} "
        f"-H '{COLOR_HEADER}: canary' http://{SERVICE_V4}/"
    )
    say(f"  ip netns exec {topo.pod} curl -s http://127.0.0.1:{ADMIN_PORT}/status")
    say(f"  ip -n {topo.node} rule; tc -n {topo.node} -s filter show dev {NODE_POD_IFACE} ingress")
    with contextlib.suppress(EOFError):
        input()


# ------------------------------------------------------------------ the loopback demo


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def loopback_demo() -> list[str]:
    """Header coloring without the kernel: sidecar and backend on 127.0.0.1."""
    failures: list[str] = []
    outbound, inbound, admin = free_ports(3)
    server = backend.start_in_thread(STABLE_HOST, "127.0.0.1", 0)
    here = Place(None)
    try:
        with tempfile.TemporaryDirectory(prefix="traffic-color-demo-") as tmp:
            policy_path = Path(tmp) / "policy.yaml"
            policy_path.write_text(loopback_policy(outbound, inbound, admin))

            def spawn(argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
                return subprocess.Popen(argv, start_new_session=True, **kw)

            say(
                f"starting the sidecar on 127.0.0.1 (outbound {outbound}, admin {admin}), "
                f"backend on 127.0.0.1:{server.port}"
            )
            sc = start_sidecar(
                spawn, policy_path, POD_COLOR, Path(tmp) / "sidecar.log", here, ("127.0.0.1", admin)
            )
            try:
                sc.wait_ready()
                url = f"http://127.0.0.1:{server.port}/"
                rows = []
                for sent in HEADERS_SENT:
                    answer = fetch(url, ("127.0.0.1", outbound), sent)
                    want = expected_color(sent, ("stable", "canary", "blue"), POD_COLOR)
                    rows.append(Row("sidecar", "IPv4", sent, answer, want, STABLE_HOST))
                section("requests through the sidecar: header sent -> color given")
                say(table(ROW_HEADERS, [r.cells() for r in rows]))
                failures += [f"{r.sent}: {r.cells()[-1]}" for r in rows if not r.ok]
                section("request counters (/metrics)")
                _, text = sc.get("/metrics")
                say(
                    _indent(
                        "\n".join(
                            ln
                            for ln in metric_lines(text, ("traffic_color_requests_total",))
                            if 'direction="outbound"' in ln
                        )
                    )
                )
            finally:
                code = sc.stop()
            say(f"\n  sidecar exit code after SIGTERM: {code}")
            if code != 0:
                failures.append(f"sidecar exit code {code}")
                say(_indent(sc.log_tail()))
    finally:
        server.shutdown()
        server.server_close()
    return failures


# ------------------------------------------------------------------ entry point


def _indent(text: str) -> str:
    return "\n".join("  " + ln for ln in text.splitlines())


def _verdict(failures: list[str]) -> int:
    say()
    if failures:
        say("demo FAILED:")
        say(_indent("\n".join(failures)))
        return 1
    say("demo OK")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """``traffic-color demo [--keep] [--loopback]``; exit 0 when everything behaved."""
    keep = bool(getattr(args, "keep", False))
    started = time.monotonic()
    with _signals_as_interrupt():
        try:
            code = _run(keep, bool(getattr(args, "loopback", False)))
            code = max(code, chain.second_act())
        except KeyboardInterrupt:
            say("\ninterrupted: what the demo started is stopped, its namespaces are removed")
            return 130
    say(f"(took {time.monotonic() - started:.1f}s)")
    return code


def _run(keep: bool, loopback: bool) -> int:
    if loopback:
        say("traffic-color demo, loopback mode (--loopback): header coloring only.")
        return _verdict(_loopback_or_reason())
    why = kernel_unavailable_reason()
    if why is None:
        say("traffic-color demo: kernel data path (namespaces, tc classifier, ip rule fwmark)")
        try:
            return _verdict(kernel_demo(keep))
        except (DemoError, TopologyError, OSError) as exc:
            # Everything was there to run it, so this is a failure, not a fallback.
            failures = [f"kernel demo: {exc}"]
            _explain(exc)
            say("\nshowing header coloring on loopback instead:")
            return _verdict(failures + _loopback_or_reason())
    say(f"traffic-color demo: kernel data path unavailable here: {why}.")
    say("Showing header coloring on loopback instead (no kernel routing: one backend).")
    return _verdict(_loopback_or_reason())


def _loopback_or_reason() -> list[str]:
    try:
        return loopback_demo()
    except (DemoError, OSError) as exc:
        _explain(exc)
        return [f"loopback demo: {exc}"]


def _explain(exc: BaseException) -> None:
    say(f"\nfailed: {exc}")
    detail = getattr(exc, "detail", "")
    if detail:
        say("sidecar log (last lines):")
        say(_indent(detail))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.demo.run")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--loopback", action="store_true")
    return run_demo(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
