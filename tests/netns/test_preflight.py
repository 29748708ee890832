"""``traffic-color doctor --preflight``: will a sidecar with this policy come up here?

Run with ``ip netns exec`` in a namespace of its own, so the default ports are
this test's alone: the built-in policy passes; a port already taken, a pod
color the policy lacks, and a data path whose interface does not exist each
fail with the reason, and exit 1.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sidecar.policy import Address
from sidecar.preflight import judge_listeners
from tests.netns.netnsutil import Lab

REPO = Path(__file__).resolve().parents[2]


def preflight(netns: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "sidecar", "doctor", "--preflight", *args]
    return subprocess.run(
        ["ip", "netns", "exec", netns, *cmd],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def lines_of(out: str) -> dict[str, str]:
    """check name -> its line."""
    return {ln[7:].split()[0]: ln for ln in out.splitlines() if ln.startswith("[")}


@pytest.mark.root
def test_builtin_policy_passes_and_each_missing_need_fails(tmp_path: Path) -> None:
    with Lab() as lab:
        netns = lab.netns("tcopf")
        ok = preflight(netns)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "all checks passed" in ok.stdout
        assert "off in this policy" in lines_of(ok.stdout)["datapath"]

        bad_color = preflight(netns, "--color", "gold")
        assert bad_color.returncode == 1
        assert "[FAIL] pod_color" in lines_of(bad_color.stdout)["pod_color"]

        holder = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                netns,
                sys.executable,
                "-c",
                "import socket, time; s = socket.socket(); s.bind(('127.0.0.1', 15090)); "
                "s.listen(); print('up', flush=True); time.sleep(60)",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "up"
            taken = preflight(netns)
        finally:
            holder.kill()
            holder.wait()
        assert taken.returncode == 1
        assert "0.0.0.0:15090: in use" in lines_of(taken.stdout)["ports_free"]

        policy = tmp_path / "dp.yaml"
        policy.write_text(
            textwrap.dedent("""\
            colors: {stable: {mark: 0x1}, canary: {mark: 0x2}}
            datapath:
              enabled: true
              attach: [{interface: eth9, direction: ingress}]
            """)
        )
        dp = preflight(netns, "--policy", str(policy))
        assert dp.returncode == 1
        found = lines_of(dp.stdout)
        assert found["attach_points"].startswith("[FAIL]") and "eth9 (host)" in dp.stdout
        for name in ("bcc", "kernel_headers", "capabilities"):
            assert found[name].startswith("[ ok ]"), dp.stdout

        policy.write_text("capture: {enabled: true}\n")
        cap = preflight(netns, "--policy", str(policy))
        assert cap.returncode == 0, cap.stdout
        assert "NET_ADMIN held" in lines_of(cap.stdout)["capture"]
        policy.write_text('capture: {enabled: true}\nadmin: {listen: "127.0.0.1:0"}\n')
        cap = preflight(netns, "--policy", str(policy))
        assert cap.returncode == 1 and "fixed ports" in lines_of(cap.stdout)["capture"]


def test_listeners_on_one_port_collide_through_a_wildcard() -> None:
    a = Address("0.0.0.0", 15090)
    assert not judge_listeners({"admin": a, "inbound": Address("127.0.0.1", 15090)}).ok
    assert not judge_listeners({"admin": a, "inbound": a}).ok
    assert judge_listeners({"x": Address("127.0.0.1", 1), "y": Address("127.0.0.2", 1)}).ok
    assert judge_listeners({"x": Address("127.0.0.1", 0), "y": Address("0.0.0.0", 0)}).ok
