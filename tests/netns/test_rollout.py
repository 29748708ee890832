"""A rollout as a pod sees it: SIGTERM while clients keep sending on both sides.

Three namespaces: the pod (the real ``python -m sidecar run`` and its app), a
client host on one veth and a service host on another. Clients keep sending to the
pod's inbound listener from the client host and, from inside the pod, through
the outbound listener to the service (as the app would while it shuts down).
SIGTERM arrives while both run; they stop before ``drain_accept`` ends, so any
error they see happened during it: there must be none. (wrk counts a "read
error" whenever a server closes after ``Connection: close``, so its counters
cannot tell a lost request from a moved-on client; a bounded client loop on
``http.client`` records each failure instead.) ``/readyz`` fails at
once; slow requests sent late in the accept period finish after the listeners
have closed; a new connection after the period is refused; the exit code is 0.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.netns.netnsutil import Lab, ip
from tests.netns.test_footprint import running

pytestmark = pytest.mark.root

POD_CLIENT, CLIENT = "198.18.62.1", "198.18.62.2"
POD_SVC, SVC = "198.18.63.1", "198.18.63.2"
ADMIN = "127.0.0.1:15392"
DRAIN_ACCEPT = 5.0
LOOP_SECONDS = 3.5  # started about 0.5 s before SIGTERM: ends well inside the accept period

# An HTTP/1.1 keep-alive server (the standard library's): 200 at once, or after
# ?s=SECONDS on /hold, so a request can be in flight when the listeners close.
BACKEND = textwrap.dedent("""\
    import sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def do_GET(self):
            if self.path.startswith("/hold"):
                time.sleep(float(self.path.split("s=")[1]))
            body = b"ok"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    ThreadingHTTPServer.daemon_threads = True
    srv = ThreadingHTTPServer(("0.0.0.0", 8080), H)
    print("up", flush=True)
    srv.serve_forever()
    """)


def policy() -> str:
    return textwrap.dedent(f"""
        colors:
          stable: {{mark: 0x1}}
          canary: {{mark: 0x2}}
        inbound: {{listen: "0.0.0.0:15006", app: "127.0.0.1:8080"}}
        outbound: {{listen: "127.0.0.1:15001"}}
        admin: {{listen: "{ADMIN}"}}
        timeouts: {{drain_accept: {DRAIN_ACCEPT}, drain: 6}}
    """)


def spawn(netns: str, *cmd: str, **kw) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", netns, *cmd], stdout=subprocess.PIPE, text=True, **kw
    )


def curl(netns: str, url: str, *extra: str) -> subprocess.Popen[str]:
    """curl's status code (000 when it could not connect) on stdout."""
    return spawn(
        netns, "curl", "-s", "-o", "/dev/null", "-m", "20", "-w", "%{http_code}", *extra, url
    )


# A bounded client loop on the standard library's http.client: keep-alive, and a
# new connection when an answer says Connection: close (as HTTP clients do). Each
# worker sends until the deadline (at most 2000 requests) and records every failure
# with its wall-clock time; prints a JSON summary.
CLIENT_LOOP = textwrap.dedent("""\
    import http.client, json, sys, threading, time
    host, port, hostname, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    deadline = time.time() + seconds
    out = {"ok": 0, "closes": 0, "errors": [], "after": []}
    lock = threading.Lock()
    def worker():
        conn = http.client.HTTPConnection(host, port, timeout=10)
        for _ in range(2000):
            if time.time() >= deadline:
                break
            t = time.time()
            try:
                conn.request("GET", "/", headers={"Host": hostname})
                resp = conn.getresponse()
                resp.read()
                with lock:
                    out["ok"] += resp.status == 200
                    out["closes"] += resp.will_close
                    out["after"].append(t)
                    if resp.status != 200:
                        out["errors"].append([t, f"HTTP {resp.status}"])
                if resp.will_close:
                    conn.close()
            except Exception as exc:
                with lock:
                    out["errors"].append([t, repr(exc)])
                conn.close()
    threads = [threading.Thread(target=worker) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    out["after"] = max(out["after"], default=0)
    print(json.dumps(out))
    """)


def client_loop(netns: str, host: str, port: int, hostname: str) -> subprocess.Popen[str]:
    return spawn(
        netns, sys.executable, "-c", CLIENT_LOOP, host, str(port), hostname, str(LOOP_SECONDS)
    )


def loop_result(proc: subprocess.Popen[str]) -> dict:
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    return json.loads(out)


@pytest.fixture
def lab(tmp_path: Path):
    with Lab() as lab:
        pod, client, svc = lab.netns("tcor"), lab.netns("tcoc"), lab.netns("tcos")
        lab.veth(pod, "eth0", client, "eth0")
        lab.veth(pod, "eth1", svc, "eth0")
        ip("addr", "add", f"{POD_CLIENT}/30", "dev", "eth0", netns=pod)
        ip("addr", "add", f"{CLIENT}/30", "dev", "eth0", netns=client)
        ip("addr", "add", f"{POD_SVC}/30", "dev", "eth1", netns=pod)
        ip("addr", "add", f"{SVC}/30", "dev", "eth0", netns=svc)
        backends = [spawn(ns, sys.executable, "-c", BACKEND) for ns in (pod, svc)]
        try:
            for b in backends:
                assert b.stdout is not None and b.stdout.readline().strip() == "up"
            pfile = tmp_path / "policy.yaml"
            pfile.write_text(policy())
            with running(pod, pfile) as sc:
                yield pod, client, sc
        finally:
            for b in backends:
                b.kill()
                b.wait()


def test_sigterm_during_traffic_loses_no_request_and_exits_0(lab) -> None:
    pod, client, sc = lab
    inbound = f"http://{POD_CLIENT}:15006"
    outbound = ("http://127.0.0.1:15001", "-H", f"Host: {SVC}:8080")
    assert curl(client, inbound + "/").communicate(timeout=30)[0] == "200"
    assert curl(pod, outbound[0] + "/", *outbound[1:]).communicate(timeout=30)[0] == "200"

    loads = [
        client_loop(client, POD_CLIENT, 15006, "app"),
        client_loop(pod, "127.0.0.1", 15001, f"{SVC}:8080"),
    ]
    time.sleep(0.5)
    t0, sigterm_at = time.monotonic(), time.time()
    sc.proc.send_signal(15)
    time.sleep(0.3)
    ready = curl(pod, f"http://{ADMIN}/readyz").communicate(timeout=30)[0]

    # Slow requests that start late in the accept period: in flight when it ends.
    time.sleep(t0 + DRAIN_ACCEPT - 1.0 - time.monotonic())
    slow = [
        curl(client, inbound + "/hold?s=3"),
        curl(pod, outbound[0] + "/hold?s=3", *outbound[1:]),
    ]
    results = [loop_result(p) for p in loads]
    time.sleep(max(0.0, t0 + DRAIN_ACCEPT + 0.7 - time.monotonic()))
    late = curl(client, inbound + "/").communicate(timeout=30)[0]
    codes = [p.communicate(timeout=30)[0] for p in slow]
    rc = sc.proc.wait(30)
    took = time.monotonic() - t0

    assert ready == "503", "/readyz must fail from the first moment of drain"
    for side, res in zip(("inbound", "outbound"), results, strict=True):
        lost = [(round(t - sigterm_at, 3), e) for t, e in res["errors"]]
        assert lost == [], f"{side} lost requests during drain_accept (s after SIGTERM)"
        # The load ran through the drain: answers there said Connection: close.
        assert res["after"] > sigterm_at + 2.5 and res["closes"] > 20, (side, res)
        assert res["ok"] > 100, (side, res)
    assert codes == ["200", "200"], "in-flight requests must finish"
    assert late == "000", "after drain_accept the listeners no longer accept"
    assert rc == 0, "".join(sc.log)
    assert DRAIN_ACCEPT < took < DRAIN_ACCEPT + 6
