"""The nftables child: one libnftables JSON command in, one answer out, then exit.

``python -m sidecar.datapath.child.nft`` is started by ``run_nft_child``
(``sidecar.datapath.capture``) through ``spawn`` for every change or listing
of our table, so no long-lived process maps libnftables (Debian's
python3-nftables, about 2 MB of RSS). The command arrives as one SEQPACKET
message on the inherited socket; the answer is ``{"ok": true, "result"}`` or
the error envelope of ``spawn``.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys

from sidecar.datapath import spawn
from sidecar.errors import DatapathError

_MSG_MAX = 1 << 20


def run_nft(cmd: dict) -> dict:
    """Run one libnftables JSON command in this process; DatapathError on failure."""
    try:
        import nftables  # Debian's python3-nftables, linked into the venv (Makefile)
    except ImportError as exc:
        raise DatapathError(
            "capture", f"python3-nftables is not importable ({exc})", hint="run `make install`"
        ) from None
    nft = nftables.Nftables()
    nft.set_json_output(True)
    rc, output, error = nft.json_cmd(cmd)
    if rc != 0:
        raise DatapathError("capture", (error or "libnftables failed").strip(), code=rc)
    return output if isinstance(output, dict) else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sock-fd", type=int, required=True)
    args = parser.parse_args(argv)
    with socket.socket(fileno=args.sock_fd) as sock:
        msg = sock.recv(_MSG_MAX)
        if not msg:
            return 0
        try:
            answer = {"ok": True, "result": run_nft(json.loads(msg))}
        except DatapathError as exc:
            answer = spawn.error_to_json(exc)
        except ValueError as exc:
            answer = spawn.error_to_json(DatapathError("capture", f"bad request: {exc}"))
        sock.send(json.dumps(answer).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
