"""Network namespaces wired like pods on a node with two backends holding one address.

Two layouts. ``CLUSTER`` (what ``make demo`` shows): two pods, ``poda`` and
``podb``, whose host-side veths ``veth-a`` and ``veth-b`` sit in the node, where
the node agent runs, as on a Kubernetes node; pod addresses 198.18.1.2 /
fd00:1::2 and 198.18.4.2 / fd00:4::2. ``ROUTER`` (``demo --router``, the
e2e tests): one pod whose sidecar reaches into the node namespace itself:

    pod                     node (routes)                      stable / canary
    eth0 198.18.1.2/24 ---- to-pod    198.18.1.1/24
         fd00:1::2/64               fd00:1::1/64
                            to-stable 198.18.2.1/24 ---- eth0 198.18.2.2/24  lo 198.18.100.10/32
                                      fd00:2::1/64            fd00:2::2/64      fd00:96::10/128
                            to-canary 198.18.3.1/24 ---- eth0 198.18.3.2/24  lo 198.18.100.10/32
                                      fd00:3::1/64            fd00:3::2/64      fd00:96::10/128

The node's main table sends the service address to stable; a table the sidecar
fills (selected by ``ip rule fwmark``) sends it to canary. The classifier goes at
tc ingress of ``to-pod``: that is where the pod's packets enter the namespace that
routes them, so a mark set there drives the node's rules (DESIGN.md). Replies
from canary come back on another interface than the main table's route to the
service address, so the node runs with ``rp_filter`` off.

``Topology`` is a context manager: names are unique per instance, and teardown
(processes first, then namespaces, which takes their veths, rules and tc
filters with them) runs on errors and on Ctrl-C too. Everything goes through
the ``ip`` command so that each step is one a reader can retype.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

NETNS_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000
ROLES = ("pod", "node", "stable", "canary")  # the router layout
CLUSTER_ROLES = ("poda", "podb", "node", "stable", "canary")
ALL_ROLES = frozenset(ROLES + CLUSTER_ROLES)

SERVICE_V4 = "198.18.100.10"
SERVICE_V6 = "fd00:96::10"
POD_V4, POD_V6 = "198.18.1.2", "fd00:1::2"
STABLE_V4, STABLE_V6 = "198.18.2.2", "fd00:2::2"
CANARY_V4, CANARY_V6 = "198.18.3.2", "fd00:3::2"
# The node's side of the pod's veth: where the classifier attaches (ingress).
NODE_POD_IFACE = "to-pod"
NODE_IFACES = (NODE_POD_IFACE, "to-stable", "to-canary")
PODB_V4, PODB_V6 = "198.18.4.2", "fd00:4::2"
# The cluster layout's host-side pod interfaces, as a CNI names them (veth*).
CLUSTER_POD_IFACES = {"poda": "veth-a", "podb": "veth-b"}

# (node interface, far namespace role, node v4, far v4, node v6, far v6)
_LINKS = (
    (NODE_POD_IFACE, "pod", "198.18.1.1", POD_V4, "fd00:1::1", POD_V6),
    ("to-stable", "stable", "198.18.2.1", STABLE_V4, "fd00:2::1", STABLE_V6),
    ("to-canary", "canary", "198.18.3.1", CANARY_V4, "fd00:3::1", CANARY_V6),
)

_CLUSTER_LINKS = (
    ("veth-a", "poda", "198.18.1.1", POD_V4, "fd00:1::1", POD_V6),
    ("veth-b", "podb", "198.18.4.1", PODB_V4, "fd00:4::1", PODB_V6),
    *_LINKS[1:],
)


@dataclass(frozen=True)
class Layout:
    """Which namespaces, and which veth links from the node to each (see ``_LINKS``)."""

    name: str
    roles: tuple[str, ...]
    links: tuple[tuple[str, str, str, str, str, str], ...]


ROUTER = Layout("router", ROLES, _LINKS)
CLUSTER = Layout("cluster", CLUSTER_ROLES, _CLUSTER_LINKS)

_NAME_RE = re.compile(r"(?P<prefix>[a-z0-9]+)-(?P<pid>\d+)-[0-9a-f]{4}-(?P<role>[a-z]+)\Z")
_T = TypeVar("_T")


class TopologyError(RuntimeError):
    """A step of building the topology failed; the message names the command."""


def build_commands(names: dict[str, str], layout: Layout = ROUTER) -> list[list[str]]:
    """Every ``ip``/``sysctl`` command that builds the topology, in order. Pure.

    ``names`` maps each role of ``layout`` to its namespace name.
    """
    node = names["node"]
    cmds: list[list[str]] = [["ip", "netns", "add", names[r]] for r in layout.roles]
    cmds += [["ip", "-n", names[r], "link", "set", "lo", "up"] for r in layout.roles]
    for ifname, role, node4, far4, node6, far6 in layout.links:
        far = names[role]
        cmds += [
            [
                "ip",
                "-n",
                node,
                "link",
                "add",
                ifname,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                far,
            ],
            ["ip", "-n", node, "addr", "add", f"{node4}/24", "dev", ifname],
            ["ip", "-n", node, "-6", "addr", "add", f"{node6}/64", "dev", ifname, "nodad"],
            ["ip", "-n", far, "addr", "add", f"{far4}/24", "dev", "eth0"],
            ["ip", "-n", far, "-6", "addr", "add", f"{far6}/64", "dev", "eth0", "nodad"],
            ["ip", "-n", node, "link", "set", ifname, "up"],
            ["ip", "-n", far, "link", "set", "eth0", "up"],
            ["ip", "-n", far, "route", "add", "default", "via", node4],
            ["ip", "-n", far, "-6", "route", "add", "default", "via", node6],
        ]
    for role in ("stable", "canary"):
        ns = names[role]
        cmds += [
            ["ip", "-n", ns, "addr", "add", f"{SERVICE_V4}/32", "dev", "lo"],
            ["ip", "-n", ns, "-6", "addr", "add", f"{SERVICE_V6}/128", "dev", "lo", "nodad"],
        ]
    # The main table: the stable path, for every flow the classifier leaves unmarked.
    cmds += [
        ["ip", "-n", node, "route", "add", f"{SERVICE_V4}/32", "via", STABLE_V4],
        ["ip", "-n", node, "-6", "route", "add", f"{SERVICE_V6}/128", "via", STABLE_V6],
    ]
    sysctls = [
        "net.ipv4.ip_forward=1",
        "net.ipv6.conf.all.forwarding=1",
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.default.rp_filter=0",
    ]
    sysctls += [f"net.ipv4.conf.{link[0]}.rp_filter=0" for link in layout.links]
    cmds.append(["ip", "netns", "exec", node, "sysctl", "-q", "-w", *sysctls])
    return cmds


def stale_names(existing: Sequence[str], prefix: str, alive: Callable[[int], bool]) -> list[str]:
    """Namespaces named by ``prefix`` whose creating process is gone. Pure."""
    out = []
    for name in existing:
        m = _NAME_RE.match(name)
        if m and m["prefix"] == prefix and m["role"] in ALL_ROLES and not alive(int(m["pid"])):
            out.append(name)
    return sorted(out)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def netns_path(name: str) -> str:
    return str(NETNS_DIR / name)


def run(
    argv: Sequence[str],
    timeout: float = 10.0,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run one command, capturing text; raise ``TopologyError`` naming it on failure."""
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise TopologyError(f"timed out after {timeout:g}s: {' '.join(argv)}") from exc
    if check and proc.returncode != 0:
        raise TopologyError(f"failed ({proc.returncode}): {' '.join(argv)}: {proc.stderr.strip()}")
    return proc


def call_in_netns(name: str, fn: Callable[..., _T], *args: Any, timeout: float = 30.0) -> _T:
    """Call ``fn(*args)`` on a fresh thread that has joined namespace ``name``.

    A network namespace belongs to a thread, not the process, so sockets that
    ``fn`` opens live in ``name`` while the caller stays where it is. The thread
    is thrown away afterwards. Python 3.11 has no ``os.setns``, hence ctypes.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({name}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"call in netns {name} did not finish within {timeout:g}s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def stop_process(
    proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, grace: float = 5.0
) -> int | None:
    """Send ``sig`` to a child we started, wait ``grace`` seconds, then SIGKILL it."""
    if proc.poll() is not None:
        return proc.returncode
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        log.warning("pid %d ignored signal %d for %.1fs; killing it", proc.pid, sig, grace)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        try:
            return proc.wait(grace)
        except subprocess.TimeoutExpired:
            return None


class Topology:
    """The pod/node/stable/canary namespaces, built on enter and torn down on exit.

    ``spawn`` starts a process in one of them and remembers it, so that
    ``close`` can stop it before the namespace goes: a namespace with a process
    still in it outlives ``ip netns del``.
    """

    def __init__(self, prefix: str = "tcdemo", layout: Layout = ROUTER) -> None:
        if not re.fullmatch(r"[a-z0-9]+", prefix):
            raise ValueError(f"prefix {prefix!r}: lower-case letters and digits only")
        self.prefix = prefix
        self.layout = layout
        self.tag = f"{prefix}-{os.getpid()}-{secrets.token_hex(2)}"
        self.names = {role: f"{self.tag}-{role}" for role in layout.roles}
        self.processes: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []
        self._closed = False

    # names -------------------------------------------------------------------
    @property
    def pod(self) -> str:
        return self.names["pod"]

    @property
    def node(self) -> str:
        return self.names["node"]

    @property
    def stable(self) -> str:
        return self.names["stable"]

    @property
    def canary(self) -> str:
        return self.names["canary"]

    def path(self, role: str) -> str:
        """``/var/run/netns/NAME`` of a role: the form the policy's ``netns`` keys take."""
        return netns_path(self.names[role])

    # life cycle ----------------------------------------------------------------
    def __enter__(self) -> Topology:
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self) -> None:
        """Build everything (after removing this prefix's leftovers of dead runs)."""
        if shutil.which("ip") is None:
            raise TopologyError("the 'ip' command (iproute2) is not installed")
        remove_stale(self.prefix)
        for argv in build_commands(self.names, self.layout):
            if argv[1:3] == ["netns", "add"]:
                self._created.append(argv[3])
            run(argv)
        log.debug("topology %s is up", self.tag)

    def close(self) -> None:
        """Stop our processes, then delete our namespaces. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        with _signals_held():
            for proc in reversed(self.processes):
                stop_process(proc)
            for name in self._created:
                _kill_netns_pids(name)
                run(["ip", "netns", "del", name], check=False)
        log.debug("topology %s is gone", self.tag)

    def leftovers(self) -> list[str]:
        """Namespaces of this topology that still exist (empty after ``close``)."""
        return sorted(n for n in self.names.values() if (NETNS_DIR / n).exists())

    # working inside ----------------------------------------------------------
    def exec(
        self, role: str, argv: Sequence[str], timeout: float = 10.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command in a namespace and return its output."""
        return run(["ip", "netns", "exec", self.names[role], *argv], timeout, check)

    def spawn(self, role: str, argv: Sequence[str], **popen: Any) -> subprocess.Popen[Any]:
        """Start a long-lived process in a namespace; ``close`` stops it.

        It gets its own session, so a Ctrl-C at the terminal reaches only the
        parent, which then stops it in order (SIGTERM, so a sidecar can clean up).
        """
        if self._closed:
            raise TopologyError("topology is closed")
        popen.setdefault("start_new_session", True)
        proc = subprocess.Popen(["ip", "netns", "exec", self.names[role], *argv], **popen)
        self.processes.append(proc)
        return proc

    def call(self, role: str, fn: Callable[..., _T], *args: Any, timeout: float = 30.0) -> _T:
        """``fn(*args)`` with sockets in the role's namespace (see ``call_in_netns``)."""
        return call_in_netns(self.names[role], fn, *args, timeout=timeout)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM while tearing down: a second Ctrl-C must not strand namespaces.

    Teardown is bounded (each process gets a few seconds, then SIGKILL), so
    holding the signals cannot hang the program.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _kill_netns_pids(name: str) -> None:
    """SIGKILL whatever still runs in one of our namespaces (children of our children)."""
    proc = run(["ip", "netns", "pids", name], check=False)
    for word in proc.stdout.split():
        if word.isdigit():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(word), signal.SIGKILL)
    if proc.stdout.strip():
        time.sleep(0.1)


def remove_stale(prefix: str) -> list[str]:
    """Delete namespaces (and what runs in them) left by dead runs with this prefix."""
    existing = [p.name for p in NETNS_DIR.iterdir()] if NETNS_DIR.is_dir() else []
    stale = stale_names(existing, prefix, pid_alive)
    for name in stale:
        log.warning("removing namespace %s left by a run that is gone", name)
        _kill_netns_pids(name)
        run(["ip", "netns", "del", name], check=False)
    return stale
