"""The demo's main act: what a cluster has, a node agent routing two pods' flows by color.

Two pods (``poda`` stable, ``podb`` canary) each run a sidecar inside their own
namespace, with the data path off and, where ``setpriv`` exists, every
capability dropped: all a sidecar does for routing is put its color's DSCP on
each upstream socket. The node namespace runs ``traffic-color node``, which
attaches its classifier at tc ingress of ``veth-a`` and ``veth-b`` (the pods'
host-side interfaces) and routes the canary color's mark to table 102, where
the service address leads to the canary host; the main table leads to stable.
One policy file serves all three processes, as one ConfigMap would.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from sidecar.demo.run import (
    CANARY_HOST,
    CANARY_TABLE,
    COLOR_HEADER,
    HEADERS_SENT,
    OUTBOUND_PORT,
    ROW_HEADERS,
    STABLE_HOST,
    Place,
    Row,
    SidecarProcess,
    expected_color,
    expected_host,
    fetch,
    metric_lines,
    metric_value,
    node_filters,
    node_rules,
    node_table_routes,
    say,
    section,
    start_backends,
    start_sidecar,
    table,
)
from sidecar.demo.topology import (
    CANARY_V4,
    CANARY_V6,
    CLUSTER,
    CLUSTER_POD_IFACES,
    SERVICE_V4,
    SERVICE_V6,
    Topology,
)

NODE_ADMIN_PORT = 15091
POD_ADMIN_PORT = 15090
POD_COLORS = {"poda": "stable", "podb": "canary"}
COLORS = ("stable", "canary", "blue")
NO_CAPS = ("setpriv", "--bounding-set", "-all", "--inh-caps", "-all", "--ambient-caps", "-all")


def cluster_policy() -> str:
    """One policy for the sidecars and the node agent: colors carry DSCPs; canary has a table."""
    return f"""\
version: 1
header: {COLOR_HEADER}
default_color: stable
mark_mask: 0xff
colors:
  stable: {{mark: 0x1, dscp: 8}}
  canary: {{mark: 0x2, dscp: 10}}
  blue: {{mark: 0x3, dscp: 12}}
inbound:
  listen: "127.0.0.1:15006"
  app: "127.0.0.1:8080"
outbound:
  listen: "127.0.0.1:{OUTBOUND_PORT}"
admin:
  listen: "127.0.0.1:{POD_ADMIN_PORT}"
timeouts:
  drain: 2
  upstream_idle: 600
datapath:
  enabled: false
  routing:
    colors:
      canary:
        table: {CANARY_TABLE}
        routes:
          - {{dst: "{SERVICE_V4}/32", via: "{CANARY_V4}"}}
          - {{dst: "{SERVICE_V6}/128", via: "{CANARY_V6}"}}
node:
  interfaces: ["veth-*"]
  admin_listen: "127.0.0.1:{NODE_ADMIN_PORT}"
"""


def cluster_demo(keep: bool) -> list[str]:
    """The act: returns what went wrong, empty when every check passed."""
    failures: list[str] = []
    with (
        tempfile.TemporaryDirectory(prefix="traffic-color-demo-") as tmp,
        Topology("tcdemo", CLUSTER) as topo,
    ):
        say(f"topology {topo.tag}: namespaces " + ", ".join(topo.names.values()))
        say("  pods poda (stable) and podb (canary) reach the node over veth-a and veth-b;")
        urls = start_backends(topo, Place(topo.names["poda"]))
        policy = Path(tmp) / "policy.yaml"
        policy.write_text(cluster_policy())

        say(f"starting the node agent in {topo.node}: traffic-color node --policy {policy.name}")
        agent = start_node_agent(topo, policy, Path(tmp) / "node.log")
        sidecars: dict[str, SidecarProcess] = {}
        try:
            agent.wait_ready()
            drop = NO_CAPS if shutil.which("setpriv") else ()
            for pod, color in POD_COLORS.items():
                say(
                    f"starting the sidecar in {pod} (color {color}, data path off"
                    + (", every capability dropped with setpriv)" if drop else ")")
                )
                sidecars[pod] = start_sidecar(
                    lambda argv, pod=pod, **kw: topo.spawn(pod, [*drop, *argv], **kw),
                    policy,
                    color,
                    Path(tmp) / f"{pod}.log",
                    Place(topo.names[pod]),
                    ("127.0.0.1", POD_ADMIN_PORT),
                )
            for sc in sidecars.values():
                sc.wait_ready()
            failures += _requests(topo, urls)
            failures += _capabilities(sidecars)
            failures += _node_state(topo, agent)
            if keep:
                _hold(topo)
        finally:
            for sc in sidecars.values():
                sc.stop()
            code = agent.stop()
        section("after SIGTERM to the node agent")
        say(f"  node agent exit code: {code}")
        if code != 0:
            failures.append(f"node agent exit code {code} after SIGTERM")
            say("\n".join("  " + ln for ln in agent.log_tail().splitlines()))
        left = node_rules(topo) + node_table_routes(topo, CANARY_TABLE)
        for iface in CLUSTER_POD_IFACES.values():
            left += node_filters(topo, iface)
        if left:
            failures.append("kernel objects left after SIGTERM")
            say("  cleanup: LEFT BEHIND:\n" + "\n".join("    " + x for x in left))
        else:
            say("  cleanup: no filters, rules or routes left")
    gone = not topo.leftovers()
    say(f"  namespaces removed: {'yes' if gone else 'NO'}")
    if not gone:
        failures.append("namespaces left")
    return failures


def start_node_agent(topo: Topology, policy: Path, log_path: Path) -> SidecarProcess:
    """``python -m sidecar node`` in the node namespace; stopped with SIGTERM like a sidecar."""
    with log_path.open("wb") as log:
        proc = topo.spawn(
            "node",
            [sys.executable, "-m", "sidecar", "node", "--policy", str(policy)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    admin = ("127.0.0.1", NODE_ADMIN_PORT)
    return SidecarProcess(proc, log_path, Place(topo.node), admin, "the node agent")


def _requests(topo: Topology, urls: list[str]) -> list[str]:
    routed = {"canary": CANARY_HOST}
    rows: list[tuple[str, Row]] = []
    for pod, pod_color in POD_COLORS.items():
        place = Place(topo.names[pod])
        for family, url in zip(("IPv4", "IPv6"), urls, strict=True):
            for sent in HEADERS_SENT:
                color = expected_color(sent, COLORS, pod_color)
                answer = place.call(fetch, url, ("127.0.0.1", OUTBOUND_PORT), sent)
                want = expected_host(color, routed, STABLE_HOST)
                rows.append((pod, Row("sidecar", family, sent, answer, color, want)))
            # The app talks to the service directly: no sidecar, no DSCP, main table.
            answer = place.call(fetch, url, None, "canary")
            rows.append((pod, Row("bypass", family, "canary", answer, "canary", STABLE_HOST)))
    section("requests from the pods: header sent -> color given -> host that answered")
    say(table(["pod", *ROW_HEADERS], [[pod, *r.cells()] for pod, r in rows]))
    return [f"{pod} {r.path} {r.family} {r.sent}: {r.cells()[-1]}" for pod, r in rows if not r.ok]


def _capabilities(sidecars: dict[str, SidecarProcess]) -> list[str]:
    section("what the sidecars hold (CapEff from /proc)")
    failures = []
    for pod, sc in sidecars.items():
        caps = "?"
        try:
            for line in Path(f"/proc/{sc.proc.pid}/status").read_text().splitlines():
                if line.startswith("CapEff:"):
                    caps = line.split()[1]
        except OSError:
            pass
        say(f"  {pod}: pid {sc.proc.pid} CapEff {caps}")
        if shutil.which("setpriv") and caps.strip("0") != "":
            failures.append(f"the sidecar in {pod} holds capabilities {caps}")
    return failures


def _node_state(topo: Topology, agent: SidecarProcess) -> list[str]:
    failures = []
    section(f"the node agent's view: traffic-color status --admin :{NODE_ADMIN_PORT}")
    proc = topo.exec(
        "node",
        [
            sys.executable,
            "-m",
            "sidecar",
            "status",
            "--admin",
            f"http://127.0.0.1:{NODE_ADMIN_PORT}",
        ],
        timeout=30,
        check=False,
    )
    say("\n".join("  " + ln for ln in proc.stdout.splitlines()))
    if proc.returncode != 0:
        failures.append(f"traffic-color status against the node failed: {proc.stderr.strip()}")
    section("ip rule and tc filters in the node namespace")
    say("\n".join("  " + ln for ln in node_rules(topo)))
    for iface in CLUSTER_POD_IFACES.values():
        say("\n".join(f"  {iface} {ln}" for ln in node_filters(topo, iface)))
    section("node counters (/metrics of the node agent)")
    status, text = agent.get("/metrics")
    if status != 200:
        failures.append(f"the node agent's /metrics answered {status}")
    names = (
        "traffic_color_node_packets_total",
        "traffic_color_node_attached_interfaces",
    )
    say("\n".join("  " + ln for ln in metric_lines(text, names)))
    for color, iface in (("stable", "veth-a"), ("canary", "veth-a"), ("canary", "veth-b")):
        labels = {"color": color, "interface": iface}
        if metric_value(text, "traffic_color_node_packets_total", labels) <= 0:
            failures.append(f"node counter for {color} on {iface} did not move")
    return failures


def _hold(topo: Topology) -> None:
    section("kept running (--keep); try, then press Enter (or Ctrl-C) to tear down:")
    say(
        f"  ip netns exec {topo.names['podb']} curl -s -x http://127.0.0.1:{OUTBOUND_PORT} "
        f"http://{SERVICE_V4}/"
    )
    say(
        f"  ip netns exec {topo.node} {sys.executable} -m sidecar status "
        f"--admin http://127.0.0.1:{NODE_ADMIN_PORT}"
    )
    say(f"  ip -n {topo.node} rule; tc -n {topo.node} -s filter show dev veth-b ingress")
    with contextlib.suppress(EOFError):
        input()
