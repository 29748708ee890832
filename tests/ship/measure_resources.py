"""Measure what an injected sidecar uses, to set the chart's requests and limits from figures.

Not a test: run it as root and copy the figures into charts/traffic-color/README.md
("Resources"). It starts ``traffic-color run`` in the pod namespace of the demo
topology with the kernel data path attached at tc egress of the pod's ``eth0`` (as
the chart's pod-side classifier does), and reports:

- the BCC compile child's peak RSS (``VmHWM``, polled every 2 ms while it lives),
- the sidecar's RSS once ready (idle) and its peak under load (wrk -c64 through the
  outbound port to nginx on the service address, bounded in time),
- the kernel memory its BPF maps lock (``memlock`` of each map fd in
  ``/proc/PID/fdinfo``), which the memory cgroup charges to the container too,
- the same for a sidecar with the data path off (what pods get with the node agent).

``.venv/bin/python -m tests.ship.measure_resources [--seconds 10] [--flow-table-size N]``
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from sidecar.demo.topology import SERVICE_V4, Topology
from sidecar.policy import DEFAULT_FLOW_TABLE_SIZE

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import http_bench  # noqa: E402  (bench/ is scripts, not a package)

POLICY = """\
colors:
  stable: {{mark: 0x1}}
  canary: {{mark: 0x2, dscp: 10}}
outbound: {{listen: "127.0.0.1:15001"}}
inbound: {{listen: "0.0.0.0:15006"}}
admin: {{listen: "127.0.0.1:15090"}}
datapath:
{datapath}
"""


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(p) for p in text]
    return out


def map_memlock(pid: int) -> int:
    """Bytes locked by the BPF maps among ``pid``'s file descriptors."""
    total = 0
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = info.read_text()
        except OSError:
            continue
        if "map_type:" in text:
            m = re.search(r"^memlock:\s+(\d+)", text, re.M)
            total += int(m.group(1)) if m else 0
    return total


class ChildPeak(threading.Thread):
    """Polls the sidecar's children and keeps the highest VmHWM seen."""

    def __init__(self, parent: int) -> None:
        super().__init__(daemon=True)
        self.parent, self.peak_kib, self.seen = parent, 0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        known: set[int] = set()
        while not self.stop.is_set():
            try:
                for child in children(self.parent):
                    known.add(child)
                    self.peak_kib = max(self.peak_kib, status_kib(child, "VmHWM"))
            except (OSError, RuntimeError, ValueError):
                pass
            self.seen = len(known)
            time.sleep(0.002)


def wait_ready(topo: Topology, proc: subprocess.Popen, timeout: float = 60.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"sidecar exited with {proc.returncode}")
        r = topo.exec(
            "pod",
            [
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "http://127.0.0.1:15090/readyz",
            ],
            check=False,
        )
        if r.stdout.strip() == "200":
            return time.monotonic() - t0
        time.sleep(0.05)
    raise RuntimeError("sidecar not ready")


def measure(topo: Topology, tmp: Path, datapath: bool, size: int, seconds: int) -> dict:
    dp = (
        f"  enabled: true\n  required: true\n  flow_table_size: {size}\n"
        "  attach:\n    - {interface: eth0, direction: egress}"
        if datapath
        else "  enabled: false"
    )
    policy = tmp / f"policy-{datapath}.yaml"
    policy.write_text(POLICY.format(datapath=dp))
    env = dict(os.environ, TRAFFIC_COLOR="canary", TRAFFIC_COLOR_LOG_LEVEL="warning")
    proc = topo.spawn(
        "pod",
        [sys.executable, "-m", "sidecar", "run", "--policy", str(policy)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / f"sidecar-{datapath}.log", "wb"),  # noqa: SIM115
    )
    sampler = ChildPeak(proc.pid)
    sampler.start()
    try:
        ready_s = wait_ready(topo, proc)
        sampler.stop.set()
        sampler.join()
        time.sleep(1.0)
        out = {
            "datapath": datapath,
            "ready_s": ready_s,
            "children": sampler.seen,
            "child_peak_mib": sampler.peak_kib / 1024,
            "idle_rss_mib": status_kib(proc.pid, "VmRSS") / 1024,
            "memlock_mib": map_memlock(proc.pid) / 2**20,
        }
        wrk = topo.exec(
            "pod",
            [
                "wrk",
                "-t2",
                "-c64",
                f"-d{seconds}s",
                "-H",
                f"Host: {SERVICE_V4}",
                "http://127.0.0.1:15001/",
            ],
            timeout=seconds + 30,
        ).stdout
        out["rps"] = float(re.search(r"Requests/sec:\s+([\d.]+)", wrk).group(1))  # type: ignore[union-attr]
        out["load_peak_rss_mib"] = status_kib(proc.pid, "VmHWM") / 1024
        out["after_load_rss_mib"] = status_kib(proc.pid, "VmRSS") / 1024
        return out
    finally:
        sampler.stop.set()
        proc.terminate()
        proc.wait(20)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--flow-table-size", type=int, default=DEFAULT_FLOW_TABLE_SIZE)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces, tc, BPF)", file=sys.stderr)
        return 2
    with Topology(prefix="tc16kres") as topo, tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        # The bench's backend nginx, listening on the service address in "stable".
        block = http_bench.BACKEND_BLOCK.format(port=80, text="ok")
        conf = http_bench.NGINX_CONF.format(
            prefix=tmp, name="backend", body=block.replace("127.0.0.1", SERVICE_V4)
        )
        (tmp / "nginx.conf").write_text(conf)
        topo.spawn("stable", ["nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf")])
        time.sleep(0.5)
        for datapath in (True, False):
            res = measure(topo, tmp, datapath, args.flow_table_size, args.seconds)
            print(
                f"data path {'on ' if datapath else 'off'} "
                f"(flow_table_size {args.flow_table_size}): ready in {res['ready_s']:.2f} s; "
                f"compile child peak {res['child_peak_mib']:.1f} MiB ({res['children']} child); "
                f"RSS idle {res['idle_rss_mib']:.1f} MiB, peak under wrk -c64 "
                f"{res['load_peak_rss_mib']:.1f} MiB ({res['rps']:.0f} req/s), after "
                f"{res['after_load_rss_mib']:.1f} MiB; BPF maps lock {res['memlock_mib']:.2f} MiB",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
