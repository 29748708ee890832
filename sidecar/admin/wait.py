"""``traffic-color wait-ready``: block until the sidecar's ``/readyz`` answers 200.

Injected as the sidecar's postStart hook where Kubernetes has no native sidecars:
the kubelet starts containers in order and waits for each postStart hook, so the
app starts only once its proxy serves (as Istio's ``holdApplicationUntilProxyStarts``
with ``pilot-agent wait``). It must be in the image and start fast, so it uses only
the standard library.
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request

# Never through a proxy: the admin port is ours, on loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def probe(url: str, timeout: float) -> tuple[bool, str]:
    """One GET of ``url``: (answered 200, what happened)."""
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return resp.status == 200, f"{resp.status}"
    except urllib.error.HTTPError as exc:
        body = exc.read(200).decode(errors="replace").strip()
        return False, f"{exc.code} {body}".strip()
    except (OSError, ValueError) as exc:
        return False, str(getattr(exc, "reason", exc))


def wait_ready(admin: str, timeout: float, interval: float = 0.2) -> int:
    """0 once ``/readyz`` answers 200; 1 with the last answer after ``timeout`` seconds."""
    url = admin.rstrip("/") + "/readyz"
    deadline = time.monotonic() + timeout
    while True:
        ok, why = probe(url, timeout=min(2.0, max(0.1, deadline - time.monotonic())))
        if ok:
            return 0
        if time.monotonic() + interval > deadline:
            print(
                f"traffic-color wait-ready: {url} not ready after {timeout:g} s: {why}",
                file=sys.stderr,
            )
            return 1
        time.sleep(interval)
