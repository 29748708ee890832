"""Footprint of the sidecar: start-up to ready, and RSS with the data path attached and N flows.

Issue 5's bars: steady-state RSS at most 60 MB with the data path attached and
10k open flows; start-up to ready at most 3 s with the data path, 1 s without.

The sidecar runs in the demo topology's pod namespace with the classifier at tc
ingress of the node's side of the pod's veth. A client in the pod sends bursts
of concurrent requests through the outbound port to backends on the service
address that answer after a second, so the proxy opens one upstream flow per
request and keeps them open, idle, in its pool: N flows registered in the
kernel's flow map, without holding N client connections too (the machine's
hard limit on open files is 20000). RSS is read from /proc after warm-up and
with the flows open. Run as root: ``.venv/bin/python bench/footprint.py [--flows 10000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sidecar.demo.topology import NODE_POD_IFACE, SERVICE_V4, Topology  # noqa: E402

RSS_BAR_MB = 60.0
START_BAR_DP = 3.0
START_BAR_PLAIN = 1.0

PORTS = 40  # the pool keeps at most 256 idle connections per (color, upstream): 40 x 256 > 10k

# Answers every request after a second, keep-alive: a burst of requests to one
# port is all in flight at once, so the proxy opens one upstream flow for each,
# and they stay open in its pool afterwards.
BACKEND = textwrap.dedent("""\
    import asyncio, sys
    RESP = b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok"
    async def serve(r, w):
        try:
            while await r.readuntil(b"\\r\\n\\r\\n"):
                await asyncio.sleep(1.0)
                w.write(RESP)
        except (asyncio.IncompleteReadError, ConnectionError):
            w.close()
    async def main():
        for port in range(8000, 8000 + int(sys.argv[1])):
            await asyncio.start_server(serve, "0.0.0.0", port, backlog=1024)
        print("listening", flush=True)
        await asyncio.sleep(600)
    asyncio.run(main())
    """)

# Sends, for each backend port, one burst of concurrent requests through the
# outbound port (absolute-form, as an HTTP_PROXY client), then closes its side.
CLIENT = textwrap.dedent("""\
    import asyncio, sys
    FLOWS, PORTS, PROXY, DST = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    async def one(port):
        r, w = await asyncio.open_connection("127.0.0.1", PROXY)
        w.write(f"GET http://{DST}:{port}/ HTTP/1.1\\r\\nHost: {DST}:{port}\\r\\n\\r\\n".encode())
        head = await r.readuntil(b"\\r\\n\\r\\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        await r.readexactly(2)
        w.close()
    async def main():
        per_port = -(-FLOWS // PORTS)
        left = FLOWS
        for first in range(0, PORTS, 4):
            batch = []
            for port in range(8000 + first, 8000 + min(first + 4, PORTS)):
                n = min(per_port, left)
                left -= n
                batch += [one(port) for _ in range(n)]
            await asyncio.wait_for(asyncio.gather(*batch), 60)
        print("open", FLOWS, flush=True)
    asyncio.run(main())
    """)


def policy(topo: Topology, datapath: bool, flows: int) -> str:
    dp = (
        f"datapath:\n  enabled: true\n  required: true\n"
        f"  flow_table_size: {max(65536, flows * 2)}\n"
        f"  attach:\n    - {{interface: {NODE_POD_IFACE}, direction: ingress, "
        f"netns: {topo.path('node')}}}\n"
        if datapath
        else "datapath:\n  enabled: false\n"
    )
    return (
        "colors:\n  stable: {mark: 0x1}\n  canary: {mark: 0x2}\n"
        "timeouts: {upstream_idle: 600}\n"
        'outbound: {listen: "127.0.0.1:15001"}\ninbound: {listen: "127.0.0.1:15006"}\n'
        'admin: {listen: "127.0.0.1:15090"}\n' + dp
    )


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def maps_llvm(pid: int) -> bool:
    text = Path(f"/proc/{pid}/maps").read_text()
    return "libbcc" in text or "libLLVM" in text


def start_sidecar(topo: Topology, policy_file: Path) -> tuple[subprocess.Popen[str], float]:
    """Spawn the sidecar in the pod; seconds from exec to its 'ready' log line."""
    t0 = time.monotonic()
    proc = topo.spawn(
        "pod",
        [sys.executable, "-m", "sidecar", "run", "--policy", str(policy_file)],
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stderr is not None
    deadline = t0 + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError(f"sidecar exited with {proc.wait()} before ready")
        if "ready in" in line:
            return proc, time.monotonic() - t0
    raise RuntimeError("sidecar not ready within 30 s")


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure(flows: int = 10_000, starts: int = 3) -> dict:
    """Start-up times (best of ``starts``) and RSS with ``flows`` open flows."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the sidecar inherits it
    out: dict = {"flows": flows}
    with Topology(prefix="tcbench") as topo, tempfile.TemporaryDirectory() as tmp:
        plain, dp = Path(tmp, "plain.yaml"), Path(tmp, "dp.yaml")
        plain.write_text(policy(topo, False, flows))
        dp.write_text(policy(topo, True, flows))
        for name, path in (("startup_plain_s", plain), ("startup_datapath_s", dp)):
            times = []
            for _ in range(starts):
                proc, took = start_sidecar(topo, path)
                times.append(took)
                stop(proc)
            out[name] = min(times)

        backend = topo.spawn(
            "stable", [sys.executable, "-c", BACKEND, str(PORTS)], stdout=subprocess.PIPE, text=True
        )
        assert backend.stdout is not None and backend.stdout.readline().startswith("listening")
        proc, _ = start_sidecar(topo, dp)
        try:
            time.sleep(1.0)
            out["rss_idle_mb"] = rss_mb(proc.pid)
            client = topo.spawn(
                "pod",
                [sys.executable, "-c", CLIENT, str(flows), str(PORTS), "15001", SERVICE_V4],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert client.stdout is not None
            t0 = time.monotonic()
            line = client.stdout.readline()
            if not line.startswith("open"):
                raise RuntimeError(f"client failed: {line!r}")
            out["open_s"] = time.monotonic() - t0
            time.sleep(2.0)
            out["rss_flows_mb"] = rss_mb(proc.pid)
            out["llvm_mapped"] = maps_llvm(proc.pid)
            status = topo.exec("pod", ["curl", "-s", "http://127.0.0.1:15090/status"])
            dpst = json.loads(status.stdout)["datapath"]
            out["kernel_flows"] = dpst["flows"]["in_map"]
            out["attached"] = dpst["attached"]
            out["memlock_mb"] = dpst["kernel_memory"]["memlock_bytes"] / 2**20
            out["flow_memlock_mb"] = dpst["kernel_memory"]["flow_maps_memlock_bytes"] / 2**20
            out["flow_table_size"] = dpst["flow_table_size"]
            client.wait(30)
        finally:
            stop(proc)
    return out


def report(res: dict) -> bool:
    ok = True
    rows = [
        (
            "start-up to ready, no data path",
            f"{res['startup_plain_s']:.2f} s",
            f"<= {START_BAR_PLAIN} s",
            res["startup_plain_s"] <= START_BAR_PLAIN,
        ),
        (
            "start-up to ready, data path attached",
            f"{res['startup_datapath_s']:.2f} s",
            f"<= {START_BAR_DP} s",
            res["startup_datapath_s"] <= START_BAR_DP,
        ),
        ("RSS after warm-up, data path attached", f"{res['rss_idle_mb']:.1f} MB", "", True),
        (
            f"RSS with {res['kernel_flows']} flows in the kernel map",
            f"{res['rss_flows_mb']:.1f} MB",
            f"<= {RSS_BAR_MB} MB",
            res["rss_flows_mb"] <= RSS_BAR_MB,
        ),
        (
            "RSS per open flow (with-flows minus warm-up)",
            f"{(res['rss_flows_mb'] - res['rss_idle_mb']) * 1024 / max(1, res['flows']):.2f} KB",
            "",
            True,
        ),
        (
            f"maps' locked kernel memory ({res['flow_table_size']} flows)",
            f"{res['memlock_mb']:.1f} MiB",
            "",
            True,
        ),
        (
            "  of which the flow maps (not in RSS)",
            f"{res['flow_memlock_mb']:.1f} MiB",
            "",
            True,
        ),
        (
            "RSS with flows + maps' kernel memory",
            f"{res['rss_flows_mb'] + res['memlock_mb'] * 1.048576:.1f} MB",
            "",
            True,
        ),
        (
            "libbcc / LLVM mapped in the sidecar",
            str(res["llvm_mapped"]),
            "False",
            not res["llvm_mapped"],
        ),
    ]
    print(
        f"\nfootprint ({res['flows']} upstream flows opened in {res['open_s']:.1f} s, "
        "held idle in the proxy's pool)"
    )
    for what, value, bar, good in rows:
        ok &= good
        print(f"  {what:<45} {value:>10}  {bar:<10} {'ok' if good else 'OVER'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=10_000)
    ap.add_argument("--starts", type=int, default=3)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("footprint: needs root (network namespaces, tc, BPF)", file=sys.stderr)
        return 2
    return 0 if report(measure(args.flows, args.starts)) else 1


if __name__ == "__main__":
    sys.exit(main())
