"""Link events for the node agent, from a child that holds pyroute2 for the agent's life.

Pods come and go: their host-side interfaces appear and vanish while the
agent runs, and it must attach to a new one within a second. The kernel says
so on netlink (RTNLGRP_LINK); listening needs pyroute2, which the long-lived
process does not import (issue 5), so ``python -m sidecar.datapath.child.links``
listens and sends each event to the parent as one SEQPACKET message:

  ``{"event": "add", "ifindex": N, "ifname": "veth1"}`` (a new link, or a
  rename: the same ifindex with another name), ``{"event": "del", ...}``, and
  once, after the links present at start, ``{"event": "synced"}``.

The child exits when the parent hangs up or dies (EOF on the socket, and
PR_SET_PDEATHSIG for a SIGKILL of the parent).
"""

from __future__ import annotations

import json
import subprocess

from sidecar.datapath import spawn


def event(kind: str, ifindex: int = 0, ifname: str = "") -> bytes:
    return json.dumps({"event": kind, "ifindex": ifindex, "ifname": ifname}).encode()


def parse(msg: bytes) -> tuple[str, int, str]:
    """(event, ifindex, ifname) of a message from the child. Pure."""
    d = json.loads(msg)
    return d["event"], int(d.get("ifindex", 0)), d.get("ifname", "")


class LinkWatcher:
    """The parent's end: start the child, read its events (``fileno`` for the event loop)."""

    def __init__(self) -> None:
        self._proc, self.sock = spawn.spawn("sidecar.datapath.child.links", [], step="links")

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
