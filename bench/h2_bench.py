"""HTTP/2 benchmark: h2load against nghttpd directly, through nginx as an h2c proxy and
through both sidecar sides, all in one run so the ratios compare like with like.

- ``backend``: ``nghttpd --no-tls`` serving a 100-byte file;
- ``nginx``: nginx (one worker) as an h2c proxy, ``listen ... http2`` + ``grpc_pass`` to
  the backend over kept-alive upstream connections, ``grpc_set_header x-traffic-color``:
  the baseline (DESIGN.md: 33-38 us of CPU per request on this machine kind);
- ``sidecar-outbound``: the outbound side, ``:authority`` naming the backend;
- ``sidecar-inbound``: the inbound side, whose app is the backend.

Load: ``h2load -c8 -m16 -n N`` per run, rounds visiting the targets in turn, medians
reported: req/s, p99 (from h2load's per-request log), CPU microseconds per request of
the proxying process (utime+stime from /proc), ratios to nginx. Then RSS per idle h2
connection: 200 client connections each left open after one request, RSS delta of the
sidecar and of the nginx worker. Exits 1 when a side's CPU per request passes 3x
nginx's (issue 13's bar; the aim is 1.5x).
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from http_bench import (
    cpu_seconds,
    free_port,
    nginx_worker,
    ratio,
    rss_kib,
    start_nginx,
    start_sidecar,
    stop,
    wait_port,
)

NGINX_H2_BLOCK = """
    upstream h2backend {{
        server 127.0.0.1:{backend};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} http2 backlog=1024;
        http2_max_concurrent_streams 128;
        location / {{
            grpc_pass grpc://h2backend;
            grpc_set_header x-traffic-color stable;
        }}
    }}
"""

BAR = 3.0  # CPU per request at most this times nginx's
IDLE_CONNS = 200


@dataclass
class Result:
    name: str
    rps: float
    p99_ms: float
    requests: int
    failed: int
    cpu_us: float | None


def run_h2load(url: str, n: int, pid: int | None, extra: list[str], log: Path) -> Result:
    cmd = ["h2load", "-c8", "-m16", f"-n{n}", f"--log-file={log}", *extra, url]
    cpu0 = cpu_seconds(pid) if pid else (0.0, 0.0)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    cpu1 = cpu_seconds(pid) if pid else (0.0, 0.0)
    rps = float(re.search(r"finished in [^,]+, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", out)
    ok, failed = int(m.group(1)), int(m.group(2))  # type: ignore[union-attr]
    times = sorted(int(line.split("\t")[2]) for line in log.read_text().splitlines() if line)
    p99 = times[int(len(times) * 0.99) - 1] / 1000 if times else 0.0
    cpu = ((cpu1[0] - cpu0[0]) + (cpu1[1] - cpu0[1])) / ok * 1e6 if pid and ok else None
    return Result("", rps, p99, ok, failed, cpu)


def _hpack_get(authority: bytes) -> bytes:
    """A GET / head as literal HPACK fields (no table, no Huffman)."""
    out = b""
    for k, v in ((b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/100"),
                 (b":authority", authority)):  # fmt: skip
        out += b"\x00" + bytes([len(k)]) + k + bytes([len(v)]) + v
    return out


def idle_rss(port: int, pid: int, authority: bytes) -> float:
    """KiB of RSS each idle h2 client connection (after one request) costs ``pid``."""
    before = rss_kib(pid)
    socks = []
    head = _hpack_get(authority)
    frame = struct.pack(">I", len(head))[1:] + bytes([1, 5]) + struct.pack(">I", 1) + head
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    try:
        for _ in range(IDLE_CONNS):
            s = socket.create_connection(("127.0.0.1", port), 5)
            s.sendall(preface + frame)
            socks.append(s)
        for s in socks:  # each answered (the last frame of the response: DATA END_STREAM)
            s.settimeout(5)
            got = b""
            while b"xxxxxxxxxx" not in got:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        time.sleep(0.5)
        return (rss_kib(pid) - before) / IDLE_CONNS
    finally:
        for s in socks:
            s.close()


def bench(n: int, rounds: int, mode: str) -> dict:
    for tool in ("nginx", "h2load", "nghttpd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: make install adds nginx-light, nghttp2-*")
    prefix = Path(tempfile.mkdtemp(prefix="tc-h2bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        www = prefix / "www"
        www.mkdir()
        (www / "100").write_bytes(b"x" * 99 + b"\n")
        back_port, ngx_port = free_port(), free_port()
        backend = subprocess.Popen(
            ["nghttpd", "--no-tls", "-d", str(www), str(back_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(backend)
        proxy = start_nginx(
            prefix, "h2proxy", NGINX_H2_BLOCK.format(port=ngx_port, backend=back_port)
        )
        procs.append(proxy)
        if not (wait_port(back_port) and wait_port(ngx_port)):
            raise RuntimeError("nghttpd or nginx did not start")
        ngx_worker = nginx_worker(proxy.pid)
        sidecar, out_port, in_port, how = start_sidecar(prefix, back_port, mode)
        procs.append(sidecar)
        authority = f"127.0.0.1:{back_port}"
        names = ["-H", f":authority: {authority}"]  # outbound: the upstream, as an app names it
        targets = [
            ("backend", f"http://{authority}/100", [], backend.pid),
            ("nginx", f"http://127.0.0.1:{ngx_port}/100", [], ngx_worker),
            ("sidecar-outbound", f"http://127.0.0.1:{out_port}/100", names, sidecar.pid),
            ("sidecar-inbound", f"http://127.0.0.1:{in_port}/100", [], sidecar.pid),
        ]
        rss_before_h2 = rss_kib(sidecar.pid)
        log = prefix / "h2load.log"
        for _, url, extra, _ in targets:  # warm-up, and a check that each path answers
            r = run_h2load(url, 2000, None, extra, log)
            if r.failed or not r.requests:
                raise RuntimeError(f"{url}: {r.failed} failed")
        rss_warm = rss_kib(sidecar.pid)
        runs: dict[str, list[Result]] = {name: [] for name, *_ in targets}
        for _ in range(rounds):
            for name, url, extra, pid in targets:
                runs[name].append(run_h2load(url, n, pid, extra, log))
        results = []
        for name, rs in runs.items():
            cpus = [r.cpu_us for r in rs if r.cpu_us is not None]
            results.append(
                Result(
                    name,
                    statistics.median(r.rps for r in rs),
                    statistics.median(r.p99_ms for r in rs),
                    sum(r.requests for r in rs),
                    sum(r.failed for r in rs),
                    statistics.median(cpus) if cpus else None,
                )
            )
        idle = {
            "sidecar": idle_rss(in_port, sidecar.pid, authority.encode()),
            "nginx": idle_rss(ngx_port, ngx_worker, authority.encode()),
        }
        return {
            "sidecar": how,
            "load": f"h2load -c8 -m16 -n{n}",
            "rounds": rounds,
            "results": results,
            "rss": (rss_before_h2, rss_warm),
            "idle_kib": idle,
        }
    finally:
        for p in reversed(procs):
            stop(p)
        shutil.rmtree(prefix, ignore_errors=True)


def bar(results: list[Result]) -> bool:
    base = next(r for r in results if r.name == "nginx")
    sides = [r for r in results if r.name.startswith("sidecar")]
    return all(
        r.cpu_us is not None and base.cpu_us and r.cpu_us <= BAR * base.cpu_us for r in sides
    )


def report(data: dict) -> str:
    results: list[Result] = data["results"]
    base = next(r for r in results if r.name == "nginx")
    lines = [
        f"load: {data['load']}, {data['rounds']} rounds in turn (medians); "
        f"sidecar: {data['sidecar']}",
        f"{'target':<18}{'req/s':>10}{'p99 ms':>9}{'CPU us/req':>12}{'failed':>8}"
        f"{'req/s vs nginx':>16}{'CPU vs nginx':>14}",
    ]
    for r in results:
        cpu = f"{r.cpu_us:.1f}" if r.cpu_us is not None else "-"
        lines.append(
            f"{r.name:<18}{r.rps:>10.0f}{r.p99_ms:>9.2f}{cpu:>12}{r.failed:>8}"
            f"{ratio(r.rps, base.rps):>16}{ratio(r.cpu_us, base.cpu_us):>14}"
        )
    before, warm = data["rss"]
    idle = data["idle_kib"]
    lines.append(
        f"RSS: sidecar {before / 1024:.1f} MiB before any h2 connection, {warm / 1024:.1f} MiB "
        f"after the h2 warm-up (binding loaded); per idle h2 connection: sidecar "
        f"{idle['sidecar']:.1f} KiB, nginx worker {idle['nginx']:.1f} KiB"
    )
    lines.append(
        f"bar (each side <= {BAR:.0f}x nginx CPU/req; aim 1.5x): "
        f"{'met' if bar(results) else 'NOT met'}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100_000, help="per run")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each target, in turn")
    ap.add_argument("--sidecar", choices=("auto", "runtime", "standalone"), default="auto")
    args = ap.parse_args(argv)
    data = bench(args.requests, args.rounds, args.sidecar)
    print(report(data))
    return 0 if bar(data["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
