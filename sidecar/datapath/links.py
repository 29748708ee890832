"""Link events for the node agent, from a child that holds pyroute2 for the agent's life.

Pods come and go: their host-side interfaces appear and vanish while the
agent runs, and it must attach to a new one within a second. The kernel says
so on netlink (RTNLGRP_LINK); listening needs pyroute2, which the long-lived
process does not import (issue 5), so ``python -m sidecar.datapath.links``
listens and sends each event to the parent as one SEQPACKET message:

  ``{"event": "add", "ifindex": N, "ifname": "veth1"}`` (a new link, or a
  rename: the same ifindex with another name), ``{"event": "del", ...}``, and
  once, after the links present at start, ``{"event": "synced"}``.

The child exits when the parent hangs up or dies (EOF on the socket, and
PR_SET_PDEATHSIG for a SIGKILL of the parent).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading

from sidecar.datapath import spawn

PR_SET_PDEATHSIG = 1


def event(kind: str, ifindex: int = 0, ifname: str = "") -> bytes:
    return json.dumps({"event": kind, "ifindex": ifindex, "ifname": ifname}).encode()


def parse(msg: bytes) -> tuple[str, int, str]:
    """(event, ifindex, ifname) of a message from the child. Pure."""
    d = json.loads(msg)
    return d["event"], int(d.get("ifindex", 0)), d.get("ifname", "")


class LinkWatcher:
    """The parent's end: start the child, read its events (``fileno`` for the event loop)."""

    def __init__(self) -> None:
        self._proc, self.sock = spawn.spawn("sidecar.datapath.links", [], step="links")

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        """Hang up; the child exits on EOF. Safe to call twice."""
        self.sock.close()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


# ------------------------------------------------------------------- child side


def _exit_on_hangup(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while sock.recv(64):
            pass
    os._exit(0)


def _serve(sock: socket.socket) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        ipr.bind()  # RTMGRP_LINK among the default groups: events from now on
        for link in ipr.get_links():
            sock.send(event("add", link["index"], link.get_attr("IFLA_IFNAME") or ""))
        sock.send(event("synced"))
        # pyroute2 buffers what it reads, so its fd cannot be select()ed with ours:
        # a thread waits for the parent to hang up, and this one for the kernel.
        threading.Thread(target=_exit_on_hangup, args=(sock,), daemon=True).start()
        while True:
            for msg in ipr.get():
                kind = msg.get("event")
                if kind == "RTM_NEWLINK":
                    sock.send(event("add", msg["index"], msg.get_attr("IFLA_IFNAME") or ""))
                elif kind == "RTM_DELLINK":
                    sock.send(event("del", msg["index"], msg.get_attr("IFLA_IFNAME") or ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sock-fd", type=int, required=True)
    args = parser.parse_args(argv)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    sock = socket.socket(fileno=args.sock_fd)
    try:
        _serve(sock)
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
