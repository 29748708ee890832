"""An injected pod in capture mode, run as the kubelet would run it.

The capture init container (its args, root with NET_ADMIN and NET_RAW through
``setpriv``) runs to completion in the pod's network namespace; then the sidecar
as uid 1337 with no capability, held by its postStart hook until ready; then apps
that know nothing of proxies, as uid 65534.
The namespaces are the demo's (sidecar.demo.topology): the pod, the node it hangs
off, and a service host. What a user checks: the app's plain call arrives colored,
a call from outside to the app's own port arrives colored, and a pod's exclude
annotation keeps its port out of capture.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.demo.topology import POD_V4, SERVICE_V4, Topology
from sidecar.inject.mutation import CAPTURE_NAME, POLICY_DIR, inject_pod
from tests.inject.test_injected_sidecar_runs import (
    CHART_POLICY,
    CONFIG,
    _env,
    _get,
    _image_command,
    _log,
    _pod,
    _setpriv,
    _sidecar,
    _stop,
)

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
POD, SVC = POD_V4, SERVICE_V4
APP = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--bounding-set=-all"]

# Answers with the color header it received.
ECHO = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("color=%s\\n" % self.headers.get("x-traffic-color")).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"""


@pytest.fixture
def topo() -> Iterator[Topology]:
    """The demo's namespaces: a pod, the node it hangs off, a service host ("stable")."""
    with Topology(prefix="tc16kcap") as topology:
        yield topology


class Pod:
    """The injected pod's containers started in order; ``close`` stops what it started."""

    def __init__(self, ns: str, volume: Path, tmp_path: Path, annotations: dict) -> None:
        self.ns, self.volume, self.tmp_path = ns, volume, tmp_path
        pod = _pod("canary")
        pod["metadata"]["annotations"] = annotations
        self.pod, reason = inject_pod(pod, CONFIG)
        assert reason is None
        self.procs: list[subprocess.Popen[Any]] = []
        (volume / "policy.yaml").write_text(CHART_POLICY)
        (volume / "policy.yaml").chmod(0o644)

    def run(self, container: dict[str, Any], argv: list[str], **kw: Any) -> Any:
        env = _env(container, self.pod, self.volume)
        argv = [a.replace(POLICY_DIR, str(self.volume)) for a in argv]
        cmd = ["ip", "netns", "exec", self.ns, *_setpriv(container["securityContext"])]
        return subprocess.run(
            [*cmd, *_image_command(argv)], env=env, cwd=REPO, capture_output=True, text=True, **kw
        )

    def start(self) -> dict[str, Any]:
        init = next(c for c in self.pod["spec"]["initContainers"] if c["name"] == CAPTURE_NAME)
        done = self.run(init, init["args"], timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        side = _sidecar(self.pod)
        log = open(self.tmp_path / "sidecar.log", "wb")  # noqa: SIM115 (closed with the process)
        self.sidecar = subprocess.Popen(
            [
                *("ip", "netns", "exec", self.ns),
                *_setpriv(side["securityContext"]),
                *_image_command(side["args"]),
            ],
            env=_env(side, self.pod, self.volume),
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        waited = self.run(side, side["lifecycle"]["postStart"]["exec"]["command"], timeout=150)
        assert waited.returncode == 0, waited.stderr + _log(self.tmp_path)
        return side

    def spawn(self, ns: str, argv: list[str]) -> None:
        self.procs.append(subprocess.Popen(["ip", "netns", "exec", ns, *argv]))

    def close(self) -> int | None:
        for proc in self.procs:
            proc.terminate()
            proc.wait(10)
        return _stop(self.sidecar) if hasattr(self, "sidecar") else None


def _curl(ns: str, url: str, app: bool) -> str:
    argv = ["ip", "netns", "exec", ns, *(APP if app else []), "curl", "-s", "--max-time", "5", url]
    return subprocess.run(
        argv, env={"PATH": os.environ["PATH"]}, capture_output=True, text=True, timeout=20
    ).stdout


def _serving(ns: str, url: str, app: bool = False) -> None:
    """Wait until ``url`` answers (a Python server can take seconds to start here)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not _curl(ns, url, app):
        time.sleep(0.1)


def test_a_client_that_knows_nothing_of_proxies_is_colored_both_ways(
    topo: Topology, volume: Path, tmp_path: Path
) -> None:
    pod = Pod(topo.pod, volume, tmp_path, {})
    try:
        pod.spawn(topo.stable, [sys.executable, "-c", ECHO, SVC, "8080"])
        _serving(topo.stable, f"http://{SVC}:8080/")
        side = pod.start()
        assert _get(topo.pod, side, side["readinessProbe"], host=POD) == 200
        # Outbound: a plain call from another uid, no proxy variables, arrives colored.
        assert _curl(topo.pod, f"http://{SVC}:8080/", app=True) == "color=canary\n", _log(tmp_path)
        # Inbound: the app on its own port, called from outside the pod, gets the pod's color.
        pod.spawn(topo.pod, [*APP, sys.executable, "-c", ECHO, "0.0.0.0", "8081"])
        _serving(topo.pod, "http://127.0.0.1:8081/", app=True)
        got = _curl(topo.node, f"http://{POD}:8081/", app=False)
        assert got == "color=canary\n", _log(tmp_path)
    finally:
        rc = pod.close()
    assert rc == 0, _log(tmp_path)


def test_an_excluded_port_is_left_alone(topo: Topology, volume: Path, tmp_path: Path) -> None:
    pod = Pod(topo.pod, volume, tmp_path, {"traffic-color.io/exclude-outbound-ports": "8080"})
    try:
        for port in ("8080", "8090"):
            pod.spawn(topo.stable, [sys.executable, "-c", ECHO, SVC, port])
            _serving(topo.stable, f"http://{SVC}:{port}/")
        pod.start()
        assert _curl(topo.pod, f"http://{SVC}:8080/", app=True) == "color=None\n"  # direct
        assert _curl(topo.pod, f"http://{SVC}:8090/", app=True) == "color=canary\n"
    finally:
        rc = pod.close()
    assert rc == 0, _log(tmp_path)
