"""Admin plane hardening: what a peer on the pod network may ask the admin port.

The real ``python -m sidecar run`` listens on every address of a pod namespace
joined by a veth to a peer namespace. curl in the peer stands for the kubelet,
Prometheus and anyone else on the network: probes and metrics answer it,
``/status``, ``/debug/route`` and ``/quitquitquit`` refuse it until the policy
trusts its network; curl inside the pod (loopback) is always answered, and its
``POST /quitquitquit`` stops the sidecar at once with exit 0.
"""

from __future__ import annotations

import subprocess
import textwrap
import time

import pytest

from tests.netns.netnsutil import Lab, ip
from tests.netns.test_footprint import running

pytestmark = pytest.mark.root

POD, PEER = "198.18.61.1", "198.18.61.2"
ADMIN_PORT = 15391


def policy(trusted: str = "") -> str:
    return textwrap.dedent(f"""
        colors:
          stable: {{mark: 0x1}}
          canary: {{mark: 0x2}}
        outbound: {{listen: "127.0.0.1:15381"}}
        inbound: {{listen: "127.0.0.1:15386"}}
        admin: {{listen: "0.0.0.0:{ADMIN_PORT}"{trusted}}}
    """)


def curl(netns: str, host: str, path: str, method: str = "GET") -> int:
    """HTTP status of ``method path`` sent by curl inside ``netns`` (0: no answer)."""
    out = subprocess.run(
        [
            *("ip", "netns", "exec", netns, "curl", "-s", "-o", "/dev/null", "-m", "5"),
            *("-X", method, "-w", "%{http_code}", f"http://{host}:{ADMIN_PORT}{path}"),
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    return int(out.stdout or 0)


@pytest.fixture
def pod(tmp_path):
    with Lab() as lab:
        pod_ns, peer_ns = lab.netns("tcoa"), lab.netns("tcob")
        lab.veth(pod_ns, "eth0", peer_ns, "eth0")
        ip("addr", "add", f"{POD}/30", "dev", "eth0", netns=pod_ns)
        ip("addr", "add", f"{PEER}/30", "dev", "eth0", netns=peer_ns)
        pfile = tmp_path / "policy.yaml"
        pfile.write_text(policy())
        with running(pod_ns, pfile) as sc:
            yield pod_ns, peer_ns, pfile, sc


def test_peer_gets_probes_and_metrics_but_not_internals(pod):
    pod_ns, peer_ns, _, sc = pod
    for path in ("/healthz", "/readyz", "/metrics"):
        assert curl(peer_ns, POD, path) == 200, path
    for path in ("/status", "/debug/route?color=canary&dst=198.18.0.1", "/nothing"):
        assert curl(peer_ns, POD, path) == 403, path
    assert curl(peer_ns, POD, "/quitquitquit", "POST") == 403
    time.sleep(0.3)
    assert sc.proc.poll() is None, "a refused /quitquitquit must not stop the sidecar"
    # The pod's own address is not loopback either: only 127.0.0.1 / ::1 count.
    assert curl(pod_ns, POD, "/status") == 403
    assert curl(pod_ns, "127.0.0.1", "/status") == 200
    assert curl(pod_ns, "127.0.0.1", "/debug/route?color=canary&dst=198.18.0.1") == 409


def test_policy_opens_them_to_a_network_and_loopback_quit_stops(pod):
    pod_ns, peer_ns, pfile, sc = pod
    pfile.write_text(policy(', trusted_sources: ["198.18.61.0/30"]'))
    sc.proc.send_signal(1)  # SIGHUP: reload
    sc.wait_for("applied")
    assert curl(peer_ns, POD, "/status") == 200
    pfile.write_text(policy(', trusted_sources: ["198.18.99.0/24"]'))
    sc.proc.send_signal(1)
    sc.wait_for("applied")
    assert curl(peer_ns, POD, "/status") == 403

    t0 = time.monotonic()
    assert curl(pod_ns, "127.0.0.1", "/quitquitquit", "POST") == 200
    assert sc.proc.wait(15) == 0
    # No drain_accept period for a finished Job: the default 5 s is not waited out.
    assert time.monotonic() - t0 < 4
