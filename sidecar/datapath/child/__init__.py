"""What only short-lived children run: BCC, netlink (pyroute2) and libnftables.

Why a child: the long-lived processes (a pod's sidecar, for the pod's whole
life; the node agent, for the node's) must stay small, and these libraries
are not. BCC brings LLVM and clang (hundreds of MB of RSS), pyroute2 about
10 MB and its netlink sockets, libnftables 2 MB. Their memory, their sockets
and their threads die with the child; the long-lived process keeps only the
map and program fds, talks bpf syscalls through ``sidecar.datapath.bpfsys``
and holds the intent (``sidecar.datapath.routing``, ``tc``, ``capture``).

Each child is a ``python -m sidecar.datapath.child.MODULE`` started by
``sidecar.datapath.spawn`` from its parent-side module:

- ``build``: compile and load a classifier, send its fds (``datapath.build``);
- ``ctl``: tc filters (``tc``), ip rules and routes (``routing``) through
  ``netlink``, for one NetlinkSession (``datapath.ctl``);
- ``links``: link events for the node agent's life (``datapath.links``);
- ``nft``: one libnftables command (``datapath.capture``).

The netlink modules import pyroute2 at the top, so an import from the
long-lived side shows at once (``build`` and ``nft`` import bcc and nftables
on first use, to say how to install a missing one). Only children and
short-lived commands (``traffic-color doctor``) import this package; no
long-lived module does, lazily or not (tests/unit/test_process_boundary.py).
"""
