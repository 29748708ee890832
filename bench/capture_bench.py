"""Capture benchmark: the same sidecar in capture mode and in HTTP_PROXY mode, nginx beside them.

Two network namespaces: a pod (wrk as the app, the sidecar with
``capture.enabled``, an nginx proxy) and a server (the nginx backend at
198.18.50.2, answering a 100-byte body on ports 80 and 81). In one run, each
target visited in turn per round:

- ``nginx``: wrk -> nginx on the pod's loopback -> backend :81 (a port the
  capture rules exclude, so nginx's own upstream flows are not redirected);
- ``http_proxy``: wrk -> the sidecar's outbound port, ``Host`` naming the
  backend (what an app does with HTTP_PROXY);
- ``capture``: wrk -> http://198.18.50.2/ directly; nftables redirects it to
  the same sidecar, which recovers the destination with SO_ORIGINAL_DST.

Each with keep-alive (``wrk -c64``) and with ``Connection: close`` (one
connection per request, where capture's per-connection work shows). Figures
are req/s and CPU microseconds per request of the proxying process, medians
of ``--rounds``. Bar: capture within 1.1x of HTTP_PROXY mode's CPU per
request for keep-alive traffic. Root only (namespaces and nftables).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from http_bench import (
    BODY,
    NGINX_CONF,
    Result,
    median_result,
    nginx_worker,
    ratio,
    run_wrk,
    stop,
)

ROOT = Path(__file__).resolve().parent.parent
POD_IP, SRV_IP = "198.18.50.1", "198.18.50.2"
OUT, IN, ADMIN, NGINX = 15001, 15006, 15090, 18080
BAR = 1.1

BACKEND = """
    server {{
        listen {ip}:80 backlog=1024;
        listen {ip}:81 backlog=1024;
        default_type text/plain;
        location / {{ return 200 "{text}"; }}
    }}
"""

PROXY = """
    upstream backend {{
        server {ip}:81;
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

POLICY = f"""\
version: 1
default_color: stable
colors:
  stable: {{mark: 0x1}}
inbound:
  listen: "0.0.0.0:{IN}"
  app: "127.0.0.1:8080"
outbound:
  listen: "127.0.0.1:{OUT}"
admin:
  listen: "127.0.0.1:{ADMIN}"
capture:
  enabled: true
  outbound: {{exclude_ports: [81]}}
"""


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def in_ns(ns: str, argv: list[str], **kw) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)


def wait_http(ns: str, url: str, headers: list[str], timeout: float = 20.0) -> bytes:
    cmd = ["ip", "netns", "exec", ns, "curl", "-s", "--noproxy", "*", "-m", "2"]
    for h in headers:
        cmd += ["-H", h]
    deadline = time.monotonic() + timeout
    out = b""
    while time.monotonic() < deadline:
        out = subprocess.run([*cmd, url], capture_output=True, timeout=10).stdout
        if out == BODY:
            return out
        time.sleep(0.2)
    raise RuntimeError(f"{url} answered {out[:200]!r}, not the 100-byte body")


def bench(seconds: float, conns: int, threads: int, warmup: float, rounds: int) -> dict:
    tag = f"tcbc{os.getpid() % 10000}{secrets.token_hex(2)}"
    pod, srv = f"{tag}p", f"{tag}s"
    prefix = Path(tempfile.mkdtemp(prefix="tc-capbench-"))
    procs: list[subprocess.Popen[bytes]] = []
    made: list[str] = []
    try:
        for ns in (pod, srv):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh(
            "ip",
            "-n",
            pod,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            srv,
        )
        for ns, ip in ((pod, POD_IP), (srv, SRV_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        text = BODY.decode().rstrip("\n") + "\\n"
        for ns, name, block in (
            (srv, "backend", BACKEND.format(ip=SRV_IP, text=text)),
            (pod, "proxy", PROXY.format(ip=SRV_IP, port=NGINX)),
        ):
            conf = prefix / f"nginx-{name}.conf"
            conf.write_text(NGINX_CONF.format(prefix=prefix, name=name, body=block))
            procs.append(
                in_ns(
                    ns,
                    ["nginx", "-p", str(prefix), "-c", str(conf)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        policy = prefix / "policy.yaml"
        policy.write_text(POLICY)
        env = dict(os.environ, TRAFFIC_COLOR_LOG_LEVEL="warning")
        for k in ("HTTP_PROXY", "http_proxy", "TRAFFIC_COLOR_POLICY"):
            env.pop(k, None)
        log = (prefix / "sidecar.log").open("wb")
        sidecar = in_ns(
            pod,
            [sys.executable, "-m", "sidecar", "run", "--policy", str(policy), "--color", "stable"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        procs.append(sidecar)
        host = f"Host: {SRV_IP}"
        keep = {
            "nginx": (f"http://127.0.0.1:{NGINX}/", []),
            "http_proxy": (f"http://127.0.0.1:{OUT}/", [host]),
            "capture": (f"http://{SRV_IP}/", []),
        }
        for url, headers in keep.values():
            wait_http(pod, url, headers)
        pids = {
            "nginx": nginx_worker(procs[1].pid),
            "http_proxy": sidecar.pid,
            "capture": sidecar.pid,
        }
        targets = []
        for close in (False, True):
            for name, (url, headers) in keep.items():
                extra = ["Connection: close"] if close else []
                label = f"{name}{' close' if close else ''}"
                targets.append((label, url, headers + extra, pids[name]))
        nsx = ["ip", "netns", "exec", pod]
        for _, url, headers, _ in targets:
            run_wrk(url, warmup, conns, threads, headers, None, prefix=nsx)
        runs: dict[str, list[Result]] = {t[0]: [] for t in targets}
        for _ in range(rounds):
            for label, url, headers, pid in targets:
                runs[label].append(run_wrk(url, seconds, conns, threads, headers, pid, prefix=nsx))
        return {
            "wrk": f"wrk -t{threads} -c{conns} -d{max(1, round(seconds))}s --latency",
            "rounds": rounds,
            "results": [median_result(label, rs) for label, rs in runs.items()],
        }
    finally:
        for p in reversed(procs):
            stop(p)
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        shutil.rmtree(prefix, ignore_errors=True)


def report(data: dict) -> tuple[str, bool]:
    by = {r.name: r for r in data["results"]}
    lines = [
        f"load: {data['wrk']} in a pod namespace, {data['rounds']} rounds in turn (medians)",
        f"{'target':<18}{'req/s':>10}{'p99 ms':>9}{'CPU us/req':>12}{'errors':>8}"
        f"{'CPU vs http_proxy':>19}{'CPU vs nginx':>14}",
    ]
    for r in data["results"]:
        close = r.name.endswith(" close")
        base = by["http_proxy close" if close else "http_proxy"]
        ngx = by["nginx close" if close else "nginx"]
        cpu = f"{r.cpu_us:.1f}" if r.cpu_us is not None else "-"
        lines.append(
            f"{r.name:<18}{r.rps:>10.0f}{r.p99_ms:>9.2f}{cpu:>12}{r.errors:>8}"
            f"{ratio(r.cpu_us, base.cpu_us):>19}{ratio(r.cpu_us, ngx.cpu_us):>14}"
        )
    cap, hp = by["capture"], by["http_proxy"]
    ok = bool(cap.cpu_us and hp.cpu_us and cap.cpu_us <= BAR * hp.cpu_us)
    lines.append(
        f"bar (capture keep-alive CPU/req <= {BAR}x HTTP_PROXY mode's): "
        f"{'met' if ok else 'NOT met'}"
    )
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per run")
    ap.add_argument("--rounds", type=int, default=5, help="runs of each target, in turn")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args, _ = ap.parse_known_args(argv)  # make bench passes the HTTP part's flags too
    if os.geteuid() != 0:
        print("capture benchmark skipped: needs root (network namespaces, nftables)")
        return 2
    for tool in ("nginx", "wrk", "curl"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found (make install)")
    data = bench(args.seconds, args.connections, args.threads, args.warmup, args.rounds)
    text, ok = report(data)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
