"""The link events child: pyroute2 listens on RTNLGRP_LINK for the node agent's life.

``python -m sidecar.datapath.child.links`` is started by ``LinkWatcher``
(``sidecar.datapath.links``, which holds the message format) through
``spawn``. It sends the links present at start, ``synced``, then every new,
renamed or deleted link, and exits when the parent hangs up or dies (EOF on
the socket, and PR_SET_PDEATHSIG for a SIGKILL of the parent).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import sys
import threading

from sidecar.datapath.links import event

PR_SET_PDEATHSIG = 1


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
