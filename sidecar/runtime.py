"""The running sidecar: policy -> proxy, admin plane and kernel data path, and their lifecycle.

This is the control plane's top: it owns the order of start (admin first so
probes answer, then the data path so no flow opens unregistered, then the
listeners), reload (SIGHUP or a change of the policy file, which Kubernetes
ConfigMaps make by swapping a symlink) and stop (drain, then remove every
kernel object we made).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sidecar.admin.metrics import KernelCollector, KernelSnapshot, ProxyMetrics
from sidecar.coloring import Colorer
from sidecar.errors import DatapathError, PolicyError
from sidecar.memtrim import give_back_free_memory
from sidecar.policy import Policy, check_pod_color, default_policy, parse_policy

if TYPE_CHECKING:
    from sidecar.datapath.capture import Ports

log = logging.getLogger(__name__)

WATCH_INTERVAL = 1.0  # seconds between checks of the policy file


def load_policy(path: str | None) -> Policy:
    """The policy at ``path``, or the built-in default when no path is given."""
    if not path:
        return default_policy()
    with open(path, encoding="utf-8") as fh:
        return parse_policy(fh.read(), path)


def capture_ports(policy: Policy) -> Ports | str:
    """The ports the capture rules name, or why the policy cannot be captured."""
    from sidecar.datapath.capture import Ports

    ports = Ports(policy.outbound_listen.port, policy.inbound.listen.port, policy.admin_listen.port)
    if 0 in (ports.outbound, ports.inbound, ports.admin):
        return "outbound, inbound and admin listen addresses need fixed ports (not 0)"
    return ports


def own_mark_settable(mark: int) -> bool:
    """Whether this process may put ``mark`` on its sockets (SO_MARK needs CAP_NET_ADMIN)."""
    import socket

    with socket.socket() as sock:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
        except OSError:
            return False
    return True


def _file_identity(path: str) -> tuple[int, int, int, int] | None:
    """What changes when a file is rewritten or a ConfigMap's symlink is swapped."""
    try:
        st = os.stat(path)  # follows the symlink: a swap shows as a new inode
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


async def watch_policy_file(path: str | None, reload: Callable[[str], Awaitable[bool]]) -> None:
    """Check the file every second; Kubernetes updates ConfigMaps by a symlink swap."""
    if not path:
        return
    seen = _file_identity(path)
    while True:
        await asyncio.sleep(WATCH_INTERVAL)
        now = _file_identity(path)
        if now != seen and now is not None:
            seen = now
            await reload("file changed")


@dataclass
class DatapathState:
    """What the operator needs to know about the kernel side, including why it is off."""

    enabled: bool = False
    required: bool = False
    error: str | None = None


class Sidecar:
    """One sidecar instance; tests run several in one process (own registry each)."""

    def __init__(self, policy: Policy, pod_color: str, policy_path: str | None = None) -> None:
        from sidecar.proxy import Proxy, ProxyContext

        self.policy = policy
        self.pod_color = pod_color
        self.policy_path = policy_path
        self.metrics = ProxyMetrics()
        self.metrics.registry.register(KernelCollector(self._kernel_snapshot))
        self.metrics.known_colors(policy.colors)
        self.ctx = ProxyContext(
            colorer=Colorer(policy, pod_color),
            metrics=self.metrics,
            timeouts=policy.timeouts,
            app=policy.inbound.app,
        )
        self._resolver = None  # the lanes' resolver cache, made with the first route
        self.ctx.lanes = self._lanes(policy)
        self.proxy = Proxy(self.ctx)
        self.datapath = None  # DatapathManager once attached
        self.dp_state = DatapathState(policy.datapath.enabled, policy.datapath.required)
        self.capture_ports: Ports | None = None  # set while our nftables table is installed
        self.started_at = time.time()
        self.ready_at: float | None = None
        self.listening = False
        self.stopping = False
        self._admin = None
        self._reload_lock = asyncio.Lock()
        # Set by SIGTERM/SIGINT (``serve``) or ``POST /quitquitquit``; ``serve`` then stops.
        self.stop_requested = asyncio.Event()
        self.skip_drain_accept = False  # /quitquitquit: the app that asked has finished

    def request_stop(self, skip_drain_accept: bool = False) -> None:
        """Ask ``serve`` to drain and stop; a Job's app calls it through /quitquitquit."""
        self.skip_drain_accept = self.skip_drain_accept or skip_drain_accept
        self.stop_requested.set()

    def _lanes(self, policy: Policy):
        """The lane router of ``policy``, or None when it defines no route (no lookups)."""
        if not policy.routes:
            return None
        from sidecar.proxy.lanerouter import LaneRouter
        from sidecar.proxy.resolver import ResolverCache

        if self._resolver is None:
            self._resolver = ResolverCache(on_lookup=self.metrics.lane_lookup)
        return LaneRouter(policy, self._resolver, self.metrics)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Raise ``DatapathError`` when a required data path cannot attach."""
        from sidecar.admin.app import AdminServer

        self._admin = AdminServer(self)
        await self._admin.start(self.policy.admin_listen)
        if self.policy.datapath.enabled:
            await self._start_datapath(self.policy)
        self._prepare_capture(self.policy)
        await self.proxy.start(self.policy.outbound_listen, self.policy.inbound.listen)
        self.listening = True
        if self.policy.capture.enabled:
            await self._install_capture(self.policy)
        self.ready_at = time.time()
        give_back_free_memory()  # what imports and the data path's hand-off left free
        log.info(
            "ready in %.2fs: color=%s outbound=%s inbound=%s admin=%s datapath=%s",
            self.ready_at - self.started_at,
            self.pod_color,
            self.proxy.addresses.get("outbound"),
            self.proxy.addresses.get("inbound"),
            self.admin_address,
            "attached" if self.datapath else "off",
        )

    async def _start_datapath(self, policy: Policy) -> None:
        from sidecar.datapath.manager import DatapathManager

        manager = DatapathManager(policy)
        try:
            # Compiling happens in a child process and netlink calls block: keep the loop free.
            await asyncio.to_thread(manager.start)
        except DatapathError as exc:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(manager.close)
            self.dp_state.error = str(exc)
            if policy.datapath.required:
                raise
            log.warning("kernel data path unavailable, colors stay in headers only: %s", exc)
            return
        self.dp_state.error = None
        self.datapath = manager
        self.ctx.hooks = manager

    def _prepare_capture(self, policy: Policy) -> None:
        """Keep our own upstream connections out of any capture table, then let the proxy
        look up original destinations.

        Also with ``capture.enabled: false``: an init container may have installed the
        table (``traffic-color capture install``), and a connection it redirected must be
        served as captured, and our sockets marked when we may. Raises ``DatapathError``
        when our own connections would loop back through a table we install.
        """
        cap = policy.capture
        if own_mark_settable(cap.own_mark):
            self.ctx.own_mark = cap.own_mark
        elif cap.enabled and os.geteuid() != cap.owner_uid:
            raise DatapathError(
                "capture",
                f"cannot mark our sockets (SO_MARK needs CAP_NET_ADMIN) and not running as "
                f"capture.owner_uid {cap.owner_uid} (uid {os.geteuid()}): our own upstream "
                "connections would be captured again",
            )
        else:
            self.ctx.own_mark = 0  # the uid rule keeps our connections out
        self.ctx.capture = cap

    async def _install_capture(self, policy: Policy) -> None:
        """Our nftables table for the ports we listen on (a crashed run's table is replaced)."""
        from sidecar.datapath import capture

        ports = capture.Ports(
            self.proxy.addresses["outbound"][1],
            self.proxy.addresses["inbound"][1],
            self.admin_address[1],  # type: ignore[index]
        )
        await asyncio.to_thread(capture.install, policy.capture, ports)
        self.capture_ports = ports

    async def _remove_capture(self) -> None:
        from sidecar.datapath import capture

        if self.capture_ports is None:
            return
        self.capture_ports = None
        try:
            await asyncio.to_thread(capture.remove)
        except DatapathError as exc:
            log.error("could not remove the capture table: %s", exc)

    async def stop(self) -> None:
        """Serve on for ``drain_accept``, drain in flight up to ``drain``, remove kernel objects.

        ``/quitquitquit`` skips the accept period: the app that asked has finished.
        """
        if self.stopping:
            return
        self.stopping = True  # /readyz fails from here on
        t = self.policy.timeouts
        accept = 0.0 if self.skip_drain_accept else t.drain_accept
        log.info(
            "stopping: serving %.1fs more with Connection: close, then draining for up to %.1fs",
            accept,
            t.drain,
        )
        if self.listening:
            await self.proxy.drain(t.drain, accept)
            self.listening = False
        await self._remove_capture()
        if self.datapath is not None:
            self.ctx.hooks = None
            manager, self.datapath = self.datapath, None
            await asyncio.to_thread(manager.close)
        if self._admin is not None:
            await self._admin.stop()
        log.info("stopped")

    # ------------------------------------------------------------ reload

    async def reload(self, why: str) -> bool:
        """Apply the policy file again; on any error keep the running policy and say why."""
        async with self._reload_lock:
            if not self.policy_path:
                log.info("reload (%s): no policy file, the built-in default stays", why)
                return True
            try:
                policy = await asyncio.to_thread(load_policy, self.policy_path)
                problem = check_pod_color(policy, self.pod_color)
                if problem:
                    raise PolicyError(self.policy_path, [_issue(problem)])
            except (PolicyError, OSError) as exc:
                self.metrics.reload(False)
                text = exc.format() if isinstance(exc, PolicyError) else str(exc)
                log.error("reload (%s) rejected, the running policy stays:\n%s", why, text)
                return False
            if policy.digest == self.policy.digest:
                return True
            await self._apply(policy)
            self.metrics.reload(True)
            log.info("reload (%s): policy %s applied", why, policy.digest)
            return True

    async def _apply(self, policy: Policy) -> None:
        old = self.policy
        for what, a, b in (
            ("outbound.listen", old.outbound_listen, policy.outbound_listen),
            ("inbound.listen", old.inbound.listen, policy.inbound.listen),
            ("admin.listen", old.admin_listen, policy.admin_listen),
        ):
            if a != b:
                log.warning("%s changed from %s to %s: takes effect at the next start", what, a, b)
        dp_old, dp_new = old.datapath, policy.datapath
        if self.datapath is not None and dp_new.enabled:
            try:
                # Off the loop (a recompile takes about a second); the manager writes flows
                # opened meanwhile to both the old and the new flow table.
                await asyncio.to_thread(self.datapath.apply, policy)
            except DatapathError as exc:
                self.dp_state.error = str(exc)
                log.error("data path reload failed, previous kernel state kept: %s", exc)
        elif self.datapath is not None:
            self.ctx.hooks = None
            manager, self.datapath = self.datapath, None
            await asyncio.to_thread(manager.close)
        elif dp_new.enabled and (not dp_old.enabled or dp_new != dp_old):
            try:
                await self._start_datapath(policy)
            except DatapathError as exc:
                log.error("data path required but unavailable after reload: %s", exc)
        self.dp_state = DatapathState(
            dp_new.enabled,
            dp_new.required,
            self.dp_state.error if dp_new.enabled and self.datapath is None else None,
        )
        if policy.capture != old.capture and self.listening:
            try:
                self._prepare_capture(policy)
                if policy.capture.enabled:
                    await self._install_capture(policy)
                else:
                    await self._remove_capture()
            except DatapathError as exc:
                log.error("capture reload failed, previous table kept: %s", exc)
        self.metrics.known_colors(policy.colors)
        self.ctx.colorer = Colorer(policy, self.pod_color)
        from sidecar.proxy.pool import dscp_changes

        changes = dscp_changes(old, policy)
        if changes:
            done = self.proxy.set_dscp(changes)
            log.info("reload: DSCP %s set on %d open upstream flow(s)", changes, done)
        self.ctx.lanes = self._lanes(policy)
        self.ctx.timeouts = policy.timeouts
        self.ctx.app = policy.inbound.app
        self.policy = policy

    async def watch_policy(self) -> None:
        await watch_policy_file(self.policy_path, self.reload)

    # ------------------------------------------------------------ views

    @property
    def admin_address(self) -> tuple[str, int] | None:
        return self._admin.address if self._admin is not None else None

    def readiness(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "stopping"
        if not self.listening:
            return False, "listeners not up"
        if self.policy.capture.enabled and self.capture_ports is None:
            return False, "capture table not installed"
        if self.dp_state.enabled and self.dp_state.required and self.datapath is None:
            return False, f"data path required but not attached: {self.dp_state.error}"
        return True, "ready"

    def _kernel_snapshot(self) -> KernelSnapshot | None:
        dp = self.datapath
        return dp.snapshot() if dp is not None and dp.attached else None

    def status(self) -> dict:
        """The JSON behind ``/status`` and ``traffic-color status``."""
        from sidecar.admin.status import process_info

        p = self.policy
        routing = p.datapath.routing.colors
        ready, why = self.readiness()
        out: dict = {
            "version": _version(),
            "pod_color": self.pod_color,
            "ready": ready,
            "ready_reason": why,
            "policy": {
                "source": p.source,
                "digest": p.digest,
                "header": p.header,
                "default_color": p.default_color,
                "mark_mask": p.mark_mask,
            },
            "colors": [
                {
                    "name": c.name,
                    "id": c.id,
                    "mark": c.mark,
                    "priority": c.priority,
                    "dscp": c.dscp,
                    "table": routing[c.name].table if c.name in routing else None,
                }
                for c in p.colors.values()
            ],
            "listeners": {
                name: f"{h}:{port}"
                for name, (h, port) in {
                    **self.proxy.addresses,
                    **({"admin": self.admin_address} if self.admin_address else {}),
                }.items()
            },
            "lanes": self.ctx.lanes.status() if self.ctx.lanes is not None else [],
            "open_flows": self.proxy.open_flows(),
            "parked_flows": self.proxy.parked_flows(),
            "datapath": {
                "enabled": self.dp_state.enabled,
                "required": self.dp_state.required,
                "attached": self.datapath is not None,
                "error": self.dp_state.error,
            },
            "process": process_info(self.started_at, self.ready_at),
            "capture": {
                "enabled": p.capture.enabled,
                "installed": self.capture_ports is not None,
            },
        }
        if self.datapath is not None:
            out["datapath"].update(self.datapath.status())
        return out


def _issue(message: str):
    from sidecar.errors import PolicyIssue

    return PolicyIssue(1, message)


def _version() -> str:
    from sidecar import __version__

    return __version__


def _forget_signal_wakeup_fd() -> None:
    """In a forked child: signals it gets must not be written to the parent's loop."""
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)


async def serve(sidecar: Sidecar) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP reloads. Returns the exit code."""
    loop = asyncio.get_running_loop()
    stop = sidecar.stop_requested
    # A forked child (pyroute2 opens netns sockets from one) shares the loop's signal
    # wakeup fd: a SIGTERM to that child would read as ours and stop the sidecar.
    os.register_at_fork(after_in_child=_forget_signal_wakeup_fd)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(sidecar.reload("SIGHUP")))
    try:
        await sidecar.start()
    except DatapathError as exc:
        if exc.step == "capture":
            log.error("capture is enabled and could not be set up: %s", exc)
        else:
            log.error("kernel data path is required (datapath.required: true) and failed: %s", exc)
        await sidecar.stop()
        return 1
    except OSError as exc:
        log.error("cannot start: %s", exc)
        await sidecar.stop()
        return 1
    watcher = loop.create_task(sidecar.watch_policy())
    await stop.wait()
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    await sidecar.stop()
    return 0


def run_sidecar(policy_path: str | None, color: str | None) -> int:
    """``traffic-color run``: validate inputs, then serve on uvloop."""
    import uvloop

    try:
        policy = load_policy(policy_path)
    except PolicyError as exc:
        log.error("policy rejected:\n%s", exc.format())
        return 1
    except OSError as exc:
        log.error("cannot read policy %s: %s", policy_path, exc)
        return 1
    pod_color = color or policy.default_color
    problem = check_pod_color(policy, pod_color)
    if problem:
        log.error("%s", problem)
        return 1
    return uvloop.run(serve(Sidecar(policy, pod_color, policy_path)))
