"""Netlink work (tc filters, ip rules, routes) in a short-lived child process.

Why a child (issue 5): pyroute2 costs the process that imports it about 10 MB
of RSS (600 modules instead of 400, sqlite3 among them), and the sidecar runs
once per pod for the pod's whole life. Netlink is only needed at start,
reload, stop and for a route-debug question, so each of those opens a
``NetlinkSession``: ``python -m sidecar.datapath.child.ctl`` imports pyroute2,
runs the operations the parent sends it over a Unix socket, and exits when the
parent hangs up. The long-lived process keeps only the map fds and talks
bpf syscalls through ``bpfsys``.

The child is stateless across sessions: the one fact tc ownership needs to
remember (which clsact qdiscs are ours, ``TcAttacher._qdisc_ours``) travels
with every request and comes back with every answer. Program fds for
``attach`` travel with the request (SCM_RIGHTS), as the build child sends
them. A failure comes back in the envelope of ``spawn`` (step, message, errno,
hint) and is raised again in the parent unchanged.

Protocol: one JSON object per SEQPACKET message. Request ``{"op", "args",
"qdisc"}`` (+ fds), answer ``{"ok": true, "result", "qdisc"}`` or ``{"ok":
false, "step", "message", "code", "hint"}``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import socket
import subprocess
from typing import Any

from sidecar.datapath import spawn
from sidecar.datapath.tc import Attachment
from sidecar.errors import DatapathError
from sidecar.policy import AttachPoint

log = logging.getLogger(__name__)

MSG_MAX = 1 << 20

# (netns, ifindex) -> the clsact qdisc there is ours to delete (TcAttacher's memory).
QdiscOwnership = dict[tuple[str | None, int], bool]


# ------------------------------------------------------------------ encoding (pure)


def point_to_json(p: AttachPoint) -> dict:
    return {"interface": p.interface, "direction": p.direction, "netns": p.netns}


def point_from_json(d: dict) -> AttachPoint:
    return AttachPoint(d["interface"], d["direction"], d["netns"])


def qdisc_to_json(q: QdiscOwnership) -> list:
    return [[netns, ifindex, ours] for (netns, ifindex), ours in sorted(q.items(), key=str)]


def qdisc_from_json(rows: list) -> QdiscOwnership:
    return {(netns, int(ifindex)): bool(ours) for netns, ifindex, ours in rows}


# ------------------------------------------------------------------ parent side


class NetlinkSession:
    """A netlink child for the duration of one start / reload / stop / debug call.

    Spawning returns at once: the child imports pyroute2 while the caller does
    other work (the classifier build), and the first ``call`` waits for it.
    ``qdisc`` is the caller's ownership record; it is updated in place.
    """

    def __init__(self, qdisc: QdiscOwnership, *, timeout: float = 60.0) -> None:
        self.qdisc = qdisc
        self.timeout = timeout
        # stderr is inherited: the child's INFO lines about kernel changes join our log.
        self._proc, self._sock = spawn.spawn(
            "sidecar.datapath.child.ctl", ["--log-level", spawn.log_level()], step="netlink"
        )

    def call(self, op: str, args: dict | None = None, fds: list[int] | tuple = ()) -> Any:
        """Run ``op`` in the child; raise its DatapathError, or one saying it died."""
        msg = json.dumps({"op": op, "args": args or {}, "qdisc": qdisc_to_json(self.qdisc)})
        try:
            self._sock.settimeout(self.timeout)
            socket.send_fds(self._sock, [msg.encode()], list(fds))
            raw = self._sock.recv(MSG_MAX)
        except TimeoutError:
            self._kill()
            raise DatapathError(
                op, f"the netlink helper did not answer in {self.timeout:.0f} s"
            ) from None
        except OSError as exc:
            raise DatapathError(op, f"the netlink helper is gone: {exc}", exc.errno) from exc
        if not raw:
            raise DatapathError(
                op, f"the netlink helper exited ({self._proc.poll()}) without answering"
            )
        answer = json.loads(raw)
        if "qdisc" in answer:
            self.qdisc.clear()
            self.qdisc.update(qdisc_from_json(answer["qdisc"]))
        if not answer.get("ok"):
            raise spawn.error_from_json(answer, op)
        return answer.get("result")

    # Typed wrappers: what the manager needs from tc and routing.

    def sweep(self, netns: str | None) -> int:
        return int(self.call("sweep", {"netns": netns}))

    def attach(self, point: AttachPoint, prog_fd: int, classid: int = 0) -> Attachment:
        d = self.call("attach", {"point": point_to_json(point), "classid": classid}, [prog_fd])
        return Attachment(**d)

    def detach(self, att: Attachment) -> None:
        self.call("detach", {"att": dataclasses.asdict(att)})

    def reconcile(self, netns: str | None, rules: list, routes: list, *, prune: bool) -> None:
        self.call(
            "reconcile",
            {
                "netns": netns,
                "rules": [dataclasses.asdict(r) for r in rules],
                "routes": [dataclasses.asdict(r) for r in routes],
                "prune": prune,
            },
        )

    def remove_all(self, netns: str | None) -> int:
        return int(self.call("remove_all", {"netns": netns}))

    def route_get(self, netns: str | None, dst: str, mark: int) -> dict:
        return self.call("route_get", {"netns": netns, "dst": dst, "mark": mark})

    @property
    def alive(self) -> bool:
        """False once the child has exited (killed, timed out): a new session is needed."""
        return self._proc.poll() is None

    def close(self) -> None:
        """Hang up; the child exits on EOF. Safe to call twice."""
        with contextlib.suppress(OSError):
            self._sock.close()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._kill()

    def _kill(self) -> None:
        self._proc.kill()
        self._proc.wait()

    def __enter__(self) -> NetlinkSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
