"""pyroute2 inside a network namespace, and its failures as ``DatapathError``.

pyroute2 0.9 opens a netlink socket inside a namespace from a short-lived
child of its own and hands the fd back, so the process never changes
namespace. We open with ``flags=0``: a typo in the policy must fail with "no
such namespace", never create an empty namespace that silently swallows our
rules. ``step`` turns netlink and OS errors into the ``DatapathError`` the
parent will raise, with a hint (``netns.hint_for``).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from sidecar.datapath.netns import hint_for, label, path
from sidecar.errors import DatapathError


def open_ipr(netns: str | None) -> IPRoute:
    """An ``IPRoute`` inside ``netns`` (None: our own namespace). Never creates one."""
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
