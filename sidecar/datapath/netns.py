"""Run pyroute2 against a network namespace, and turn its failures into ``DatapathError``.

Every kernel object the data path makes lives in a namespace the policy names
(an attach point's ``netns``, the routing ``netns``) or in our own. pyroute2
0.9 opens a netlink socket inside a namespace from a short-lived child and
hands the fd back, so this process never changes namespace. We open with
``flags=0``: a typo in the policy must fail with "no such namespace", never
create an empty namespace that silently swallows our rules.

pyroute2's synchronous ``IPRoute`` runs its own event loop and therefore
cannot be used from a thread whose asyncio loop is running. The sidecar calls
most of the facade from worker threads, but a few calls (``apply`` on reload,
``route_debug`` from the admin port) may arrive on the loop thread:
``off_loop`` runs such work on a helper thread and waits for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

from sidecar.errors import DatapathError

if TYPE_CHECKING:  # pyroute2 is imported where netlink is used: the helper child (ctl.py)
    from pyroute2 import IPRoute

T = TypeVar("T")

NETNS_RUN_DIR = "/var/run/netns"

# errno -> what an operator can do about it; used in every DatapathError hint.
_HINTS = {
    errno.EPERM: "needs CAP_NET_ADMIN in that network namespace (run as root or add the "
    "NET_ADMIN capability to the container)",
    errno.EACCES: "needs CAP_NET_ADMIN in that network namespace",
    errno.ENOENT: "the object does not exist",
    errno.EOPNOTSUPP: "the kernel lacks the feature (clsact needs sch_ingress, the filter "
    "needs cls_bpf)",
    errno.EINVAL: "the kernel rejected the request as malformed",
}


def label(netns: str | None) -> str:
    """How a namespace is named in logs and status: its path/name, or ``host``."""
    return netns if netns else "host"


def path(netns: str | None) -> str | None:
    """The file behind a namespace: a bare name is under /var/run/netns, as for ``ip netns``."""
    if netns is None:
        return None
    return netns if os.path.dirname(netns) else os.path.join(NETNS_RUN_DIR, netns)


def hint_for(code: int | None) -> str:
    return _HINTS.get(code or 0, "")


def open_ipr(netns: str | None) -> IPRoute:
    """An ``IPRoute`` inside ``netns`` (None: our own namespace). Never creates one."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    if netns is not None and not os.path.exists(path(netns) or ""):
        raise DatapathError(
            "netns",
            f"network namespace {netns!r} not found (looked for {path(netns)})",
            errno.ENOENT,
            "create it first or fix the policy's netns (a name under /var/run/netns or a path "
            "such as /proc/PID/ns/net)",
        )
    try:
        return IPRoute(netns=netns, flags=0) if netns is not None else IPRoute()
    except NetlinkError as exc:
        raise DatapathError(
            "netns", f"cannot open netlink in {label(netns)}: {exc}", exc.code, hint_for(exc.code)
        ) from exc
    except OSError as exc:
        raise DatapathError(
            "netns",
            f"cannot enter network namespace {label(netns)}: {exc}",
            exc.errno,
            "entering another namespace needs CAP_SYS_ADMIN and CAP_NET_ADMIN",
        ) from exc


@contextlib.contextmanager
def ipr_in(netns: str | None) -> Iterator[IPRoute]:
    ipr = open_ipr(netns)
    try:
        yield ipr
    finally:
        ipr.close()


@contextlib.contextmanager
def step(name: str, what: str) -> Iterator[None]:
    """Translate netlink/OS errors raised inside into ``DatapathError(name, ...)``."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        yield
    except DatapathError:
        raise
    except NetlinkError as exc:
        raise DatapathError(
            name,
            f"{what}: {os.strerror(exc.code) if exc.code else exc}",
            exc.code,
            hint_for(exc.code),
        ) from exc
    except OSError as exc:
        raise DatapathError(name, f"{what}: {exc}", exc.errno, hint_for(exc.errno)) from exc


def off_loop(fn: Callable[..., T], *args: object, timeout: float = 120.0) -> T:
    """Call ``fn(*args)``; from a thread running an asyncio loop, call it on a helper thread.

    The loop is blocked for the duration either way (the caller asked for a
    synchronous answer); this only keeps pyroute2 from tripping over it.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        loop_here = False  # the usual case; call below, outside this handler's context
    else:
        loop_here = True
    if not loop_here:
        return fn(*args)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tc-netlink") as pool:
        return pool.submit(fn, *args).result(timeout=timeout)
