"""``traffic-color node``: the node agent, which routes each pod's flows by their color.

In a cluster a pod cannot route by mark (tc egress of its ``eth0`` runs after
its routing decision, and the mark is cleared at the veth), but the DSCP its
sidecar writes on every upstream socket survives into the node. The agent
runs once per node (a DaemonSet on the host network), attaches the node
classifier at tc ingress of every host-side pod interface the policy's
``node.interfaces`` globs name, and installs the policy's ``ip rule fwmark``
rules and routes in the node's namespace, IPv4 and IPv6, the main table
being the fallback of every color without a table of its own.

Lifecycle, as the sidecar's (``sidecar.runtime``): the admin port first, so
probes answer; the link watcher and the kernel side; then link events until
SIGTERM, when every filter, rule and route of ours is removed. SIGHUP or a
change of the policy file reloads (colors flip in one step, rules are added
before old ones go); a rejected policy leaves the running one in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sidecar.errors import DatapathError, PolicyError, PolicyIssue
from sidecar.policy import Policy
from sidecar.runtime import load_policy, watch_policy_file

log = logging.getLogger(__name__)


def check_node_policy(policy: Policy) -> str | None:
    """Why the agent cannot run this policy, or None. Pure."""
    if not policy.node.interfaces:
        return "node.interfaces is empty: the agent would attach to nothing"
    if not any(c.dscp is not None for c in policy.colors.values()):
        return "no color has a dscp: the node reads colors from DSCP only"
    return None


class NodeMetrics(Collector):
    """Per (color, interface) counters of the node classifier, read at scrape time."""

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent
        self.registry = CollectorRegistry()
        self.reloads = {"ok": 0, "rejected": 0}
        self.registry.register(self)

    def describe(self) -> Iterable:
        return []

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        packets = CounterMetricFamily(
            "traffic_color_node_packets",
            "Packets the node classifier read a color from, by color and pod interface.",
            labels=["color", "interface"],
        )
        byts = CounterMetricFamily(
            "traffic_color_node_bytes",
            "Bytes (skb->len) of those packets, by color and pod interface.",
            labels=["color", "interface"],
        )
        attached = GaugeMetricFamily(
            "traffic_color_node_attached_interfaces",
            "Pod interfaces with the node classifier at tc ingress.",
        )
        reloads = CounterMetricFamily(
            "traffic_color_node_policy_reloads", "Policy reloads, by result.", labels=["result"]
        )
        errors = CounterMetricFamily(
            "traffic_color_node_attach_errors",
            "Interfaces the policy names that the classifier could not be attached to.",
        )
        dp = self.agent.datapath
        if dp is not None:
            for (color, iface), (p, b) in sorted(dp.snapshot().items()):
                packets.add_metric([color, iface], p)
                byts.add_metric([color, iface], b)
        attached.add_metric([], len(dp.interfaces) if dp is not None else 0)
        errors.add_metric([], dp.attach_errors if dp is not None else 0)
        for result, n in self.reloads.items():
            reloads.add_metric([result], n)
        return [packets, byts, attached, errors, reloads]


class NodeAgent:
    """One node agent: admin port, link watcher, and the node's kernel side."""

    def __init__(self, policy: Policy, policy_path: str | None = None) -> None:
        self.policy = policy
        self.policy_path = policy_path
        self.metrics = NodeMetrics(self)
        self.datapath = None  # NodeDatapath once started
        self.links: dict[int, str] = {}  # every link of the namespace, as events say
        self.error: str | None = None
        self.started_at = time.time()
        self.ready_at: float | None = None
        self.stopping = False
        self._admin = None
        self._watcher = None
        self._events: asyncio.Queue = asyncio.Queue()
        self._synced = asyncio.Event()
        self._lock = asyncio.Lock()  # link events and reloads take turns

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Raise ``DatapathError`` when the kernel side cannot start."""
        from sidecar.admin.app import AdminServer
        from sidecar.datapath.links import LinkWatcher
        from sidecar.datapath.node import NodeDatapath

        self._admin = AdminServer(self)
        await self._admin.start(self.policy.node.admin_listen)
        loop = asyncio.get_running_loop()
        self._watcher = LinkWatcher()
        self._watcher.sock.setblocking(False)
        loop.add_reader(self._watcher.fileno(), self._read_events)
        try:
            await asyncio.wait_for(self._synced.wait(), 30)
        except TimeoutError:
            raise DatapathError("links", "the link watcher sent no link list in 30 s") from None
        dp = NodeDatapath(self.policy)
        try:
            await asyncio.to_thread(dp.start, dict(self.links))
        except DatapathError as exc:
            self.error = str(exc)
            raise
        self.datapath = dp
        self.ready_at = time.time()
        log.info(
            "node agent ready in %.2fs: %d interface(s) attached, admin %s",
            self.ready_at - self.started_at,
            len(dp.interfaces),
            self.admin_address,
        )

    def _read_events(self) -> None:
        """The watcher's socket is readable: queue every event waiting there."""
        from sidecar.datapath.links import parse

        assert self._watcher is not None
        while True:
            try:
                msg = self._watcher.sock.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                msg = b""
            if not msg:
                asyncio.get_running_loop().remove_reader(self._watcher.fileno())
                if not self.stopping:
                    self.error = "the link watcher exited: new pods are not attached"
                    log.error("node agent: %s", self.error)
                return
            kind, ifindex, ifname = parse(msg)
            if kind == "synced":
                self._synced.set()
                continue
            if kind == "add":
                self.links[ifindex] = ifname
            else:
                self.links.pop(ifindex, None)
            if self._synced.is_set():
                self._events.put_nowait((kind, ifindex, ifname))

    async def follow_links(self) -> None:
        """Attach to interfaces that appear, forget those that vanish, in arrival order."""
        while True:
            kind, ifindex, ifname = await self._events.get()
            dp = self.datapath
            if dp is None or self.stopping:
                continue
            async with self._lock:
                if kind == "add":
                    await asyncio.to_thread(dp.link_added, ifindex, ifname)
                else:
                    await asyncio.to_thread(dp.link_removed, ifindex)

    async def stop(self) -> None:
        """Remove every filter, rule and route of ours; then stop the admin port."""
        if self.stopping:
            return
        self.stopping = True
        async with self._lock:
            if self.datapath is not None:
                dp, self.datapath = self.datapath, None
                await asyncio.to_thread(dp.close)
        if self._watcher is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self._watcher.fileno())
            await asyncio.to_thread(self._watcher.close)
        if self._admin is not None:
            await self._admin.stop()
        log.info("node agent stopped")

    # ------------------------------------------------------------ reload

    async def reload(self, why: str) -> bool:
        """Apply the policy file again; on any error keep the running policy and say why."""
        async with self._lock:
            if not self.policy_path or self.datapath is None:
                return True
            try:
                policy = await asyncio.to_thread(load_policy, self.policy_path)
                problem = check_node_policy(policy)
                if problem:
                    raise PolicyError(self.policy_path, [PolicyIssue(1, problem)])
            except (PolicyError, OSError) as exc:
                self.metrics.reloads["rejected"] += 1
                text = exc.format() if isinstance(exc, PolicyError) else str(exc)
                log.error("reload (%s) rejected, the running policy stays:\n%s", why, text)
                return False
            if policy.digest == self.policy.digest:
                return True
            if policy.node.admin_listen != self.policy.node.admin_listen:
                log.warning("node.admin_listen changed: takes effect at the next start")
            try:
                await asyncio.to_thread(self.datapath.apply, policy, dict(self.links))
            except DatapathError as exc:
                self.metrics.reloads["rejected"] += 1
                self.error = str(exc)
                log.error("reload (%s) failed, previous kernel state kept: %s", why, exc)
                return False
            self.policy = policy
            self.error = None
            self.metrics.reloads["ok"] += 1
            log.info("reload (%s): policy %s applied", why, policy.digest)
            return True

    async def watch_policy(self) -> None:
        await watch_policy_file(self.policy_path, self.reload)

    # ------------------------------------------------------------ views (admin port)

    @property
    def admin_address(self) -> tuple[str, int] | None:
        return self._admin.address if self._admin is not None else None

    @property
    def dp_state(self):  # the admin's route debugger reads .error when nothing is attached
        return self

    def readiness(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "stopping"
        if self.datapath is None:
            return False, f"node data path not started{f': {self.error}' if self.error else ''}"
        if self.error:
            return False, self.error
        return True, "ready"

    def status(self) -> dict:
        """The JSON behind ``/status`` and ``traffic-color status`` (``kind: node``)."""
        from sidecar import __version__
        from sidecar.admin.status import process_info

        p = self.policy
        ready, why = self.readiness()
        out: dict = {
            "kind": "node",
            "version": __version__,
            "ready": ready,
            "ready_reason": why,
            "policy": {"source": p.source, "digest": p.digest, "mark_mask": p.mark_mask},
            "listeners": (
                {"admin": "{}:{}".format(*self.admin_address)} if self.admin_address else {}
            ),
            "links_seen": len(self.links),
            "error": self.error,
            "process": process_info(self.started_at, self.ready_at),
        }
        if self.datapath is not None:
            out["datapath"] = self.datapath.status()
        return out


async def serve(agent: NodeAgent) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads. Returns the exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(agent.reload("SIGHUP")))
    try:
        await agent.start()
    except (DatapathError, OSError) as exc:
        log.error("node agent cannot start: %s", exc)
        await agent.stop()
        return 1
    tasks = [loop.create_task(agent.follow_links()), loop.create_task(agent.watch_policy())]
    await stop.wait()
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await agent.stop()
    return 0


def run_node(policy_path: str | None) -> int:
    """``traffic-color node``: validate the policy, then serve on uvloop."""
    import uvloop

    if not policy_path:
        log.error("the node agent needs --policy FILE (or TRAFFIC_COLOR_POLICY)")
        return 1
    try:
        policy = load_policy(policy_path)
    except PolicyError as exc:
        log.error("policy rejected:\n%s", exc.format())
        return 1
    except OSError as exc:
        log.error("cannot read policy %s: %s", policy_path, exc)
        return 1
    problem = check_node_policy(policy)
    if problem:
        log.error("%s: %s", policy_path, problem)
        return 1
    if policy.datapath.routing.netns:
        log.info(
            "datapath.routing.netns (%s) is a pod's setting: the agent routes in its own namespace",
            policy.datapath.routing.netns,
        )
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return uvloop.run(serve(NodeAgent(policy, policy_path)))
