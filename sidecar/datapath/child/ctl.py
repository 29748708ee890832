"""The netlink helper child: tc filters, ip rules and routes through pyroute2.

``python -m sidecar.datapath.child.ctl`` is started by a ``NetlinkSession``
(``sidecar.datapath.ctl``, which holds the protocol) through ``spawn``. It
imports pyroute2 (about 10 MB of RSS and its sockets, which die with it),
answers one request per SEQPACKET message until the parent hangs up, and
exits. Failures go back in the envelope of ``spawn``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import socket
import sys
import time
from typing import Any

from sidecar.datapath import routing, spawn
from sidecar.datapath.child import netlink
from sidecar.datapath.child import routing as rt
from sidecar.datapath.child import tc as tcm
from sidecar.datapath.ctl import (
    MSG_MAX,
    QdiscOwnership,
    point_from_json,
    qdisc_from_json,
    qdisc_to_json,
)
from sidecar.datapath.tc import Attachment
from sidecar.errors import DatapathError

log = logging.getLogger(__name__)

_MAX_FDS = 4
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # as the CLI's


def _serve_one(op: str, args: dict, fds: list[int], qdisc: QdiscOwnership) -> Any:
    attacher = tcm.TcAttacher()
    attacher._qdisc_ours = qdisc
    if op == "sweep":
        return attacher.sweep(args["netns"])
    if op == "attach":
        if not fds:
            raise DatapathError("attach", "no program fd came with the request")
        point = point_from_json(args["point"])
        return dataclasses.asdict(attacher.attach(point, fds[0], args.get("classid", 0)))
    if op == "detach":
        attacher.detach(Attachment(**args["att"]))
        return None
    if op in ("reconcile", "remove_all"):
        netns = args["netns"]
        rules = [routing.RuleSpec(**r) for r in args.get("rules", [])]
        routes = [routing.RouteSpec(**r) for r in args.get("routes", [])]
        with netlink.ipr_in(netns) as ipr:
            changes = rt.reconcile(ipr, rules, routes, netns, prune=args.get("prune", True))
        return changes.removed if op == "remove_all" else dataclasses.asdict(changes)
    if op == "route_get":
        with netlink.ipr_in(args["netns"]) as ipr:
            return rt.route_get(ipr, args["dst"], args["mark"])
    raise DatapathError(op, f"unknown netlink helper operation {op!r}")


def serve(sock: socket.socket) -> None:
    """Answer requests until the parent hangs up."""
    while True:
        msg, fds, _, _ = socket.recv_fds(sock, MSG_MAX, _MAX_FDS)
        if not msg:
            return
        req = json.loads(msg)
        qdisc = qdisc_from_json(req.get("qdisc", []))
        try:
            result = _serve_one(req["op"], req.get("args", {}), fds, qdisc)
            answer = {"ok": True, "result": result}
        except DatapathError as exc:
            answer = spawn.error_to_json(exc)
        except Exception as exc:  # a bug or an unexpected netlink failure: say what
            log.exception("netlink helper: %s failed", req.get("op"))
            answer = {"ok": False, "step": req.get("op", "netlink"), "message": repr(exc)}
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)  # an attached filter holds its own reference
        answer["qdisc"] = qdisc_to_json(qdisc)
        sock.send(json.dumps(answer).encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sock-fd", type=int, required=True)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=_LOG_FORMAT)
    started = time.monotonic()
    sock = socket.socket(fileno=args.sock_fd)
    with sock:
        serve(sock)
    log.debug("netlink helper done after %.2f s", time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
