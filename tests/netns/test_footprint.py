"""Issue 5: the long-lived sidecar process holds neither BCC/LLVM nor pyroute2.

The classifier is compiled by a build child and every netlink change (tc
filter, ip rules, routes) is made by a netlink child, at start, on reload and
at stop. These tests run the real ``python -m sidecar run`` in a namespace of
their own with the data path required, and check from the outside what an
operator would: ``/status``, ``/proc/PID/maps``, ``tc`` and ``ip rule``. The
memory bar itself is measured by ``bench/footprint.py``, not asserted here.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns.netnsutil import Lab, ip, tc

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
ADMIN = "127.0.0.1:15390"


def policy(mark: int) -> str:
    return textwrap.dedent(f"""
        version: 1
        colors:
          stable: {{mark: 0x1}}
          canary: {{mark: {mark:#x}}}
        outbound: {{listen: "127.0.0.1:15301"}}
        inbound: {{listen: "127.0.0.1:15306"}}
        admin: {{listen: "{ADMIN}"}}
        datapath:
          enabled: true
          required: true
          flow_table_size: 1024
          attach:
            - {{interface: d0, direction: ingress}}
          routing:
            rule_priority: 10000
            colors:
              canary:
                table: 102
                routes:
                  - {{dst: 198.18.100.0/24, dev: d0}}
    """)


def get_status(netns: str) -> dict:
    """The sidecar's /status, read from inside its namespace."""
    code = (
        "import sys, urllib.request; "
        f"sys.stdout.write(urllib.request.urlopen('http://{ADMIN}/status').read().decode())"
    )
    out = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    return json.loads(out.stdout)


def our_rules(netns: str) -> list[str]:
    out = ip("-4", "rule", netns=netns) + ip("-6", "rule", netns=netns)
    return [line.strip() for line in out.splitlines() if "proto 165" in line]


def our_filters(netns: str) -> str:
    return tc("filter", "show", "dev", "d0", "ingress", netns=netns)


class Running:
    """``python -m sidecar run`` inside ``netns``, stopped (and reaped) on exit."""

    def __init__(self, netns: str, policy_file: Path) -> None:
        cmd = [sys.executable, "-m", "sidecar", "run", "--policy", str(policy_file)]
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, *cmd],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []

    def wait_for(self, text: str, timeout: float = 30.0) -> None:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError(f"sidecar exited ({self.proc.wait()}):\n{''.join(self.log)}")
            self.log.append(line)
            if text in line:
                return
        raise AssertionError(f"no {text!r} within {timeout} s:\n{''.join(self.log[-30:])}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@contextlib.contextmanager
def running(netns: str, policy_file: Path) -> Iterator[Running]:
    """A ``Running`` sidecar once it says it is ready; stopped on the way out."""
    sc = Running(netns, policy_file)
    try:
        sc.wait_for("ready in")
        yield sc
    finally:
        sc.stop()


@pytest.fixture
def pod(tmp_path):
    with Lab() as lab:
        netns = lab.netns("tcfp")
        lab.veth(netns, "d0", netns, "d1")  # this kernel has no dummy links
        pfile = tmp_path / "policy.yaml"
        pfile.write_text(policy(0x2))
        with running(netns, pfile) as sc:
            yield netns, pfile, sc


def lru_memlock(pid: int) -> list[int]:
    """``memlock`` of each LRU hash map (map_type 9) the process holds, from its fdinfo."""
    out = []
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            fields = dict(
                line.split(":", 1) for line in info.read_text().splitlines() if ":" in line
            )
            if fields.get("map_type", "").strip() == "9":
                out.append(int(fields["memlock"]))
    return out


def libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_attached_sidecar_holds_no_bcc_llvm_nor_pyroute2(pod):
    netns, _, sc = pod
    st = get_status(netns)
    assert st["datapath"]["attached"] is True
    proc = st["process"]
    assert proc["pid"] == sc.proc.pid, "ip netns exec runs the sidecar itself"
    assert proc["bcc_imported"] is False
    assert proc["modules_of_note"] == {
        "bcc": False,
        "pyroute2": False,
        "nftables": False,
        "sidecar.datapath.child": False,
    }
    maps = libraries(proc["pid"])
    assert "libbcc" not in maps and "libLLVM" not in maps and "libclang" not in maps
    assert "libbpf.so" in maps, "the map fds are driven through libbpf in this process"
    # Kernel memory the maps lock, as /status reports it and as the kernel says per fd.
    mem = st["datapath"]["kernel_memory"]
    lru = lru_memlock(proc["pid"])
    assert len(lru) == 2 and mem["flow_maps_memlock_bytes"] == sum(lru)
    # Preallocated: charged in full while empty, at least key + value per entry (two per flow).
    assert min(lru) >= 2 * 1024 * (12 + 8)
    assert mem["memlock_bytes"] > mem["flow_maps_memlock_bytes"]
    # ... while the kernel side is in place: the children did the work.
    assert "traffic-color:ingress" in our_filters(netns)
    assert our_rules(netns) == ["10002:\tfrom all fwmark 0x2/0xff lookup 102 proto 165"] * 2
    assert "198.18.100.0/24 dev d0 proto 165" in ip("route", "show", "table", "102", netns=netns)


def test_reload_and_stop_go_through_children_and_leave_nothing(pod):
    netns, pfile, sc = pod
    pfile.write_text(policy(0x8))
    os.kill(sc.proc.pid, signal.SIGHUP)
    sc.wait_for("policy")  # "reload (SIGHUP): policy ... applied"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and "0x8" not in " ".join(our_rules(netns)):
        time.sleep(0.1)
    assert our_rules(netns) == ["10002:\tfrom all fwmark 0x8/0xff lookup 102 proto 165"] * 2
    assert not any(get_status(netns)["process"]["modules_of_note"].values())

    assert sc.stop() == 0
    assert "traffic-color" not in our_filters(netns)
    assert "clsact" not in tc("qdisc", "show", "dev", "d0", netns=netns)
    assert our_rules(netns) == []
    assert "proto 165" not in ip("route", "show", "table", "all", netns=netns)
