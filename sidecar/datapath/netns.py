"""Network namespaces as the policy names them, and netlink work kept off the event loop.

Every kernel object the data path makes lives in a namespace the policy names
(an attach point's ``netns``, the routing ``netns``) or in our own: ``path``
and ``label`` say where and how to name it, ``hint_for`` what an operator can
do about an errno there. Opening netlink inside one is the children's
(``sidecar.datapath.child.netlink``).

pyroute2's synchronous ``IPRoute`` runs its own event loop and therefore
cannot be used from a thread whose asyncio loop is running. The sidecar calls
most of the facade from worker threads, but a few calls (``apply`` on reload,
``route_debug`` from the admin port) may arrive on the loop thread:
``off_loop`` runs such work on a helper thread and waits for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import os
from collections.abc import Callable
from typing import TypeVar

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
