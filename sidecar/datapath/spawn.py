"""The process boundary of the data path: one way to start a child, one error envelope.

The long-lived process (a pod's sidecar, or the node agent) holds map fds,
talks bpf syscalls through ``bpfsys`` and keeps the intent (which colors,
which attach points, which rules). What needs heavy libraries runs in
short-lived children it starts here, each a ``python -m MODULE`` of
``sidecar.datapath.child`` with a Unix SEQPACKET socket inherited as
``--sock-fd``:

- ``child.build``: BCC (LLVM) compiles and loads a classifier, sends the
  program and map fds back (SCM_RIGHTS), exits.
- ``child.ctl``: pyroute2 runs netlink work (tc filters, ip rules, routes)
  until the parent hangs up.
- ``child.links``: pyroute2 reports link events to the node agent for as long
  as it runs.
- ``child.nft``: libnftables runs one command on the capture table, answers,
  exits.

Every child answers a failure with the same envelope, ``{"ok": false, "step",
"message", "code", "hint"}``, which ``error_from_json`` turns back into the
``DatapathError`` the child raised (same step, message, errno and hint), so
the parent reports it as if it had failed itself.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import IO

from sidecar.errors import DatapathError

_PKG_ROOT = str(Path(__file__).resolve().parents[2])


def child_env() -> dict[str, str]:
    """Our environment, with this checkout's package root first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PKG_ROOT, env.get("PYTHONPATH")) if p)
    return env


def log_level() -> str:
    """The sidecar's effective log level, for a child to log kernel changes alike."""
    return str(logging.getLevelName(logging.getLogger("sidecar").getEffectiveLevel()))


def spawn(
    module: str,
    args: list[str],
    *,
    step: str,
    stdout: IO | int | None = None,
    stderr: IO | int | None = None,
) -> tuple[subprocess.Popen, socket.socket]:
    """Start ``python -m module --sock-fd N args...``; return it and our end of the socket.

    The child's end is closed here once it is passed, so a dead child reads as
    EOF on ours. A failure to start is ``DatapathError(step)``.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    cmd = [sys.executable, "-m", module, "--sock-fd", str(theirs.fileno()), *args]
    try:
        proc = subprocess.Popen(
            cmd,
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=child_env(),
        )
    except OSError as exc:
        ours.close()
        raise DatapathError(step, f"cannot start {module}: {exc}", exc.errno) from exc
    finally:
        theirs.close()
    return proc, ours


# ---------------------------------------------------------------- the envelope (pure)


def error_to_json(exc: DatapathError) -> dict:
    """A child's failure as the parent will raise it again (``error_from_json``)."""
    text = str(exc)
    prefix, suffix = f"{exc.step}: ", f" ({exc.hint})" if exc.hint else ""
    if text.startswith(prefix):
        text = text[len(prefix) :]
    if suffix and text.endswith(suffix):
        text = text[: -len(suffix)]
    return {"ok": False, "step": exc.step, "message": text, "code": exc.code, "hint": exc.hint}


def error_from_json(answer: dict, step: str) -> DatapathError:
    """The DatapathError a child sent (``step`` when the answer names none)."""
    return DatapathError(
        answer.get("step") or step,
        answer.get("message") or "failed",
        answer.get("code"),
        answer.get("hint") or "",
    )
