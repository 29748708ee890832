"""HTTP benchmark: wrk against a backend directly, through nginx and through the sidecar.

All in one run on this machine, so the ratios compare like with like:

- ``backend``: an nginx instance (one worker) answering a 100-byte body;
- ``nginx``: a second nginx instance (one worker) proxying to it with keep-alive
  upstreams and ``proxy_set_header x-traffic-color`` - the baseline;
- ``sidecar-outbound``: the sidecar's outbound side, origin-form with ``Host`` naming
  the backend (as an app sends it);
- ``sidecar-inbound``: the sidecar's inbound side, whose app is the backend.

For each: requests/s, p50, p99, CPU microseconds per request of the proxying
process (utime+stime delta from /proc/PID/stat over the requests wrk counted),
its user-space part (utime: the kernel's share is about the same for every
proxy, so this is where they differ), and the ratios to nginx; each the median
of ``--rounds`` runs that visit the targets in turn. Exits 1 when the outbound
side misses issue 2's bar. RSS of the sidecar after warm-up and after the load,
and of the nginx proxy worker, is printed as a reference (issue 5).

The sidecar runs as its own process: ``python -m sidecar run`` when the runtime
is usable, else ``python bench/http_bench.py --serve`` (a bare ``Proxy`` on uvloop).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BODY = b"x" * 99 + b"\n"  # 100 bytes
CLK_TCK = os.sysconf("SC_CLK_TCK")

NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx-{name}.pid;
error_log {prefix}/error-{name}.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    {body}
}}
"""

BACKEND_BLOCK = """
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        default_type text/plain;
        location / {{ return 200 "{text}"; }}
    }}
"""

PROXY_BLOCK = """
    upstream backend {{
        server 127.0.0.1:{backend};
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header x-traffic-color stable;
        }}
    }}
"""

POLICY = """\
version: 1
header: x-traffic-color
default_color: stable
colors:
  stable: {{mark: 0x1}}
  canary: {{mark: 0x2}}
inbound:
  listen: "127.0.0.1:{inbound}"
  app: "127.0.0.1:{backend}"
  trust_header: true
outbound:
  listen: "127.0.0.1:{outbound}"
admin:
  listen: "127.0.0.1:{admin}"
datapath:
  enabled: false
"""


@dataclass
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    cpu_us: float | None  # per request, of the proxying process
    user_us: float | None = None  # the user-space part of it (the rest is the kernel's)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


def cpu_seconds(pid: int) -> tuple[float, float]:
    """A process's (user, kernel) CPU seconds so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # utime, stime


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def nginx_worker(master: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise RuntimeError("nginx started no worker")


def start_nginx(prefix: Path, name: str, block: str) -> subprocess.Popen[bytes]:
    conf = prefix / f"nginx-{name}.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, name=name, body=block))
    return subprocess.Popen(
        ["nginx", "-p", str(prefix), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


_LAT = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def run_wrk(
    url: str,
    seconds: float,
    conns: int,
    threads: int,
    headers: list[str],
    pid: int | None,
    prefix: list[str] | None = None,
) -> Result:
    """One wrk run; ``prefix`` runs it elsewhere (``ip netns exec NS``)."""
    # wrk counts its duration in whole seconds: less than one is an error.
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency"]
    for h in headers:
        cmd += ["-H", h]
    cpu0 = cpu_seconds(pid) if pid else (0.0, 0.0)
    out = subprocess.run(
        [*(prefix or ()), *cmd, url],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    ).stdout
    cpu1 = cpu_seconds(pid) if pid else (0.0, 0.0)
    reqs = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = {m.group(1): float(m.group(2)) * _UNIT[m.group(3)] for m in _LAT.finditer(out)}
    errs = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs += int(non2xx.group(1)) if non2xx else 0
    if pid and reqs:
        user = (cpu1[0] - cpu0[0]) / reqs * 1e6
        cpu: float | None = user + (cpu1[1] - cpu0[1]) / reqs * 1e6
    else:
        user = cpu = None
    return Result("", rps, lat.get("50", 0.0), lat.get("99", 0.0), reqs, errs, cpu, user)


def start_sidecar(
    prefix: Path, backend: int, mode: str
) -> tuple[subprocess.Popen[bytes], int, int, str]:
    """Start the sidecar; returns (process, outbound port, inbound port, how)."""
    py = sys.executable
    outbound, inbound, admin = free_port(), free_port(), free_port()
    env = dict(os.environ, TRAFFIC_COLOR="stable", TRAFFIC_COLOR_LOG_LEVEL="warning")
    if mode in ("auto", "runtime"):
        policy = prefix / "policy.yaml"
        policy.write_text(
            POLICY.format(inbound=inbound, outbound=outbound, admin=admin, backend=backend)
        )
        proc = subprocess.Popen(
            [py, "-m", "sidecar", "run", "--policy", str(policy), "--color", "stable"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(prefix / "sidecar.log", "wb"),  # noqa: SIM115
        )
        if wait_port(outbound, 15) and wait_port(inbound, 2) and proc.poll() is None:
            return proc, outbound, inbound, "python -m sidecar run"
        stop(proc)
        if mode == "runtime":
            raise RuntimeError("python -m sidecar run did not start; see sidecar.log")
    proc = subprocess.Popen(
        [py, str(Path(__file__).resolve()), "--serve", str(outbound), str(inbound), str(backend)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    if not (wait_port(outbound, 15) and wait_port(inbound, 2)):
        stop(proc)
        raise RuntimeError("standalone proxy did not start")
    return proc, outbound, inbound, "standalone Proxy (bench/http_bench.py --serve)"


def serve(outbound: int, inbound: int, backend: int) -> None:
    """The bare proxy on uvloop, for when the runtime is not available."""
    import asyncio

    import uvloop

    sys.path.insert(0, str(ROOT))
    from sidecar.admin.metrics import ProxyMetrics
    from sidecar.coloring import Colorer
    from sidecar.policy import Address, default_policy
    from sidecar.proxy import Proxy, ProxyContext

    async def main() -> None:
        policy = default_policy()
        ctx = ProxyContext(
            Colorer(policy, "stable"),
            ProxyMetrics(),
            policy.timeouts,
            Address("127.0.0.1", backend),
        )
        proxy = Proxy(ctx)
        await proxy.start(Address("127.0.0.1", outbound), Address("127.0.0.1", inbound))
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stopped.set)
        loop.add_signal_handler(signal.SIGINT, stopped.set)
        await stopped.wait()
        await proxy.drain(1.0)

    uvloop.run(main())


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def median_result(name: str, runs: list[Result]) -> Result:
    """One row from several runs of a target: medians, and errors and requests summed."""
    cpus = [r.cpu_us for r in runs if r.cpu_us is not None]
    users = [r.user_us for r in runs if r.user_us is not None]
    return Result(
        name,
        statistics.median(r.rps for r in runs),
        statistics.median(r.p50_ms for r in runs),
        statistics.median(r.p99_ms for r in runs),
        sum(r.requests for r in runs),
        sum(r.errors for r in runs),
        statistics.median(cpus) if cpus else None,
        statistics.median(users) if users else None,
    )


def bench(
    seconds: float, conns: int, threads: int, warmup: float, mode: str, rounds: int = 5
) -> dict:
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found: apt-get install nginx-light wrk (make install)")
    prefix = Path(tempfile.mkdtemp(prefix="tc-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        back_port, ngx_port = free_port(), free_port()
        text = BODY.decode().rstrip("\n") + "\\n"
        backend = start_nginx(prefix, "backend", BACKEND_BLOCK.format(port=back_port, text=text))
        procs.append(backend)
        proxy = start_nginx(prefix, "proxy", PROXY_BLOCK.format(port=ngx_port, backend=back_port))
        procs.append(proxy)
        if not (wait_port(back_port) and wait_port(ngx_port)):
            raise RuntimeError("nginx did not start: " + (prefix / "error-proxy.log").read_text())
        back_worker = nginx_worker(backend.pid)
        ngx_worker = nginx_worker(proxy.pid)
        sidecar, out_port, in_port, how = start_sidecar(prefix, back_port, mode)
        procs.append(sidecar)
        host = f"Host: 127.0.0.1:{back_port}"
        targets = [
            ("backend", f"http://127.0.0.1:{back_port}/", [], back_worker),
            ("nginx", f"http://127.0.0.1:{ngx_port}/", [], ngx_worker),
            ("sidecar-outbound", f"http://127.0.0.1:{out_port}/", [host], sidecar.pid),
            ("sidecar-inbound", f"http://127.0.0.1:{in_port}/", [], sidecar.pid),
        ]
        # Check each path answers the 100-byte body before measuring it.
        for name, url, headers, _ in targets:
            req = urllib_get(url, headers)
            if req != BODY:
                raise RuntimeError(f"{name} answered {req[:200]!r}, not the 100-byte body")
        rss_start = rss_kib(sidecar.pid)
        for _, url, headers, _ in targets:
            run_wrk(url, warmup, conns, threads, headers, None)
        rss_warm = rss_kib(sidecar.pid)
        # Rounds visit every target in turn, so a drift of the machine (frequency,
        # neighbours) lands on nginx and the sidecar alike; each figure is the median.
        runs: dict[str, list[Result]] = {name: [] for name, *_ in targets}
        for _ in range(rounds):
            for name, url, headers, pid in targets:
                runs[name].append(run_wrk(url, seconds, conns, threads, headers, pid))
        results = [median_result(name, rs) for name, rs in runs.items()]
        rss_after = rss_kib(sidecar.pid)
        return {
            "sidecar": how,
            "wrk": f"wrk -t{threads} -c{conns} -d{max(1, round(seconds))}s --latency",
            "rounds": rounds,
            "results": results,
            "rss_kib": {
                "sidecar_start": rss_start,
                "sidecar_after_warmup": rss_warm,
                "sidecar_after_load": rss_after,
                "nginx_proxy_worker": rss_kib(ngx_worker),
            },
        }
    finally:
        for p in reversed(procs):
            stop(p)
        shutil.rmtree(prefix, ignore_errors=True)


def urllib_get(url: str, headers: list[str]) -> bytes:
    import urllib.request

    req = urllib.request.Request(url)
    for h in headers:
        name, _, value = h.partition(":")
        req.add_header(name.strip(), value.strip())
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=5) as resp:
        return resp.read()


def bar(results: list[Result]) -> tuple[bool, bool]:
    """Issue 2's bar: outbound >= 0.7x nginx's req/s and <= 1.5x its CPU per request."""
    base = next(r for r in results if r.name == "nginx")
    out = next(r for r in results if r.name == "sidecar-outbound")
    ok_cpu = out.cpu_us is not None and base.cpu_us is not None
    ok_cpu = ok_cpu and out.cpu_us <= 1.5 * base.cpu_us  # type: ignore[operator]
    return out.rps >= 0.7 * base.rps, ok_cpu


def bar_met(data: dict) -> bool:
    return all(bar(data["results"]))


def report(data: dict) -> str:
    results: list[Result] = data["results"]
    base = next(r for r in results if r.name == "nginx")
    lines = [
        f"load: {data['wrk']}, {data['rounds']} rounds in turn (medians); "
        f"sidecar: {data['sidecar']}",
        f"{'target':<18}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'CPU us/req':>12}"
        f"{'(user)':>8}{'errors':>8}{'req/s vs nginx':>16}{'CPU vs nginx':>14}",
    ]
    for r in results:
        cpu = f"{r.cpu_us:.1f}" if r.cpu_us is not None else "-"
        user = f"{r.user_us:.1f}" if r.user_us is not None else "-"
        lines.append(
            f"{r.name:<18}{r.rps:>10.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}{cpu:>12}{user:>8}"
            f"{r.errors:>8}{ratio(r.rps, base.rps):>16}{ratio(r.cpu_us, base.cpu_us):>14}"
        )
    rss = data["rss_kib"]
    lines.append(
        "RSS: sidecar {:.1f} MiB at start, {:.1f} MiB after warm-up, {:.1f} MiB after load; "
        "nginx proxy worker {:.1f} MiB".format(
            rss["sidecar_start"] / 1024,
            rss["sidecar_after_warmup"] / 1024,
            rss["sidecar_after_load"] / 1024,
            rss["nginx_proxy_worker"] / 1024,
        )
    )
    ok_rps, ok_cpu = bar(results)
    lines.append(
        f"bar (outbound >= 0.7x nginx req/s, <= 1.5x nginx CPU/req): "
        f"req/s {'met' if ok_rps else 'NOT met'}, CPU {'met' if ok_cpu else 'NOT met'}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--serve", nargs=3, type=int, metavar=("OUT", "IN", "BACKEND"), help=argparse.SUPPRESS
    )
    ap.add_argument("--seconds", type=float, default=5.0, help="per run")
    ap.add_argument("--rounds", type=int, default=5, help="runs of each target, in turn")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sidecar", choices=("auto", "runtime", "standalone"), default="auto")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.serve:
        serve(*args.serve)
        return 0
    data = bench(
        args.seconds, args.connections, args.threads, args.warmup, args.sidecar, args.rounds
    )
    if args.json:
        print(json.dumps({**data, "results": [r.__dict__ for r in data["results"]]}, indent=2))
    else:
        print(report(data))
    return 0 if bar_met(data) else 1


if __name__ == "__main__":
    sys.exit(main())
