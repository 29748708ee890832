"""The nftables child: one libnftables JSON command from stdin, one JSON answer on stdout.

``python -m sidecar.datapath.child.nft`` is started by
``sidecar.datapath.capture`` for every change or listing of our table, so no
long-lived process maps libnftables (Debian's python3-nftables, about 2 MB of
RSS).
"""

from __future__ import annotations

import json
import sys

from sidecar.errors import DatapathError


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


def main() -> int:
    """Child entry: one JSON command on stdin, one JSON answer on stdout."""
    try:
        result = run_nft(json.loads(sys.stdin.read()))
    except DatapathError as exc:
        print(json.dumps({"ok": False, "message": str(exc), "code": exc.code}))
        return 0
    except ValueError as exc:
        print(json.dumps({"ok": False, "message": f"bad request: {exc}", "code": None}))
        return 0
    print(json.dumps({"ok": True, "result": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
