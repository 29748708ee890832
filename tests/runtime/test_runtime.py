"""The running sidecar: admin plane, reload by file change and by SIGHUP, graceful stop.

The sidecar runs in-process on loopback (port 0 everywhere) against a real
backend; requests go through it with aiohttp as an HTTP proxy client.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from sidecar.policy import parse_policy
from sidecar.runtime import Sidecar
from tests.proto.backend import Backend

POLICY = """\
colors:
  stable: {mark: 0x1}
  canary: {mark: 0x2}
%(extra)s
inbound: {listen: "127.0.0.1:0", app: "127.0.0.1:%(app)d"}
outbound: {listen: "127.0.0.1:0"}
admin: {listen: "127.0.0.1:0"}
timeouts: {drain: 2}
"""


def policy_text(app_port: int, extra: str = "") -> str:
    return POLICY % {"app": app_port, "extra": extra}


def configmap(tmp: Path, text: str) -> Path:
    """Lay out a policy the way the kubelet mounts a ConfigMap: a symlink into ``..data``."""
    version = tmp / f"..v{time.monotonic_ns()}"
    version.mkdir()
    (version / "policy.yaml").write_text(text)
    data = tmp / "..data"
    tmp_link = tmp / "..data_tmp"
    tmp_link.symlink_to(version.name)
    os.replace(tmp_link, data)  # atomic swap, as the kubelet does
    target = tmp / "policy.yaml"
    if not target.is_symlink():
        target.symlink_to("..data/policy.yaml")
    return target


async def started(path: Path, color: str = "stable") -> Sidecar:
    sc = Sidecar(parse_policy(path.read_text(), str(path)), color, str(path))
    await sc.start()
    return sc


async def color_of(sc: Sidecar, backend: Backend, sent: str | None) -> str:
    """Send one outbound request through the sidecar; the color the backend received."""
    host, port = sc.proxy.addresses["outbound"]
    headers = {"x-traffic-color": sent} if sent else {}
    before = len(backend.requests)
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            f"http://127.0.0.1:{backend.port}/x",
            proxy=f"http://{host}:{port}",
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=5),
        ) as resp,
    ):
        assert resp.status == 200
        await resp.read()
    [got] = backend.requests[before:]
    [color] = got.header("x-traffic-color")
    return color


async def admin_get(sc: Sidecar, path: str) -> tuple[int, str]:
    host, port = sc.admin_address
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://{host}:{port}{path}", timeout=aiohttp.ClientTimeout(total=5)) as resp,
    ):
        return resp.status, await resp.text()


@pytest.fixture
async def backend():
    b = await Backend().start()
    yield b
    await b.close()


async def test_admin_endpoints(tmp_path: Path, backend: Backend) -> None:
    sc = await started(configmap(tmp_path, policy_text(backend.port)))
    try:
        assert await admin_get(sc, "/healthz") == (200, "ok\n")
        assert await admin_get(sc, "/readyz") == (200, "ready\n")
        await color_of(sc, backend, None)
        status, body = await admin_get(sc, "/metrics")
        assert status == 200
        series = r'traffic_color_requests_total\{code="200",color="stable",direction="outbound"\} 1'
        assert re.search(series, body)
        rewrites = 'traffic_color_header_rewrites_total{direction="outbound",reason="missing"} 1'
        assert rewrites in body
        assert "traffic_color_datapath_attached 0.0" in body
        status, body = await admin_get(sc, "/status")
        import json

        data = json.loads(body)
        assert data["pod_color"] == "stable" and data["ready"] is True
        assert [c["name"] for c in data["colors"]] == ["stable", "canary"]
        assert data["process"]["bcc_imported"] is False
        status, body = await admin_get(sc, "/debug/route?color=canary&dst=198.18.0.1")
        assert status == 409 and "not attached" in body
        status, body = await admin_get(sc, "/debug/route?color=gold&dst=198.18.0.1")
        assert status == 400 and "unknown color" in body
    finally:
        await sc.stop()


async def test_configmap_swap_reloads_and_a_bad_file_keeps_the_running_policy(
    tmp_path: Path, backend: Backend
) -> None:
    path = configmap(tmp_path, policy_text(backend.port))
    sc = await started(path)
    watcher = asyncio.get_running_loop().create_task(sc.watch_policy())
    try:
        # 'blue' is not a color yet: the app's header is replaced by the pod's color.
        assert await color_of(sc, backend, "blue") == "stable"
        configmap(tmp_path, policy_text(backend.port, "  blue: {mark: 0x4}"))
        for _ in range(50):
            if "blue" in sc.policy.colors:
                break
            await asyncio.sleep(0.1)
        assert "blue" in sc.policy.colors, "file change was not picked up"
        assert await color_of(sc, backend, "blue") == "blue"

        digest = sc.policy.digest
        configmap(tmp_path, policy_text(backend.port, "  red: {mark: 0x1}"))  # duplicate mark
        for _ in range(50):
            _, metrics = await admin_get(sc, "/metrics")
            if 'traffic_color_policy_reloads_total{result="failure"} 1.0' in metrics:
                break
            await asyncio.sleep(0.1)
        assert 'traffic_color_policy_reloads_total{result="failure"} 1.0' in metrics
        assert 'traffic_color_policy_reloads_total{result="success"} 1.0' in metrics
        assert sc.policy.digest == digest
        assert await color_of(sc, backend, "blue") == "blue"  # the running policy stayed
    finally:
        watcher.cancel()
        await sc.stop()


async def test_reload_that_drops_the_pods_color_is_rejected(tmp_path: Path, backend: Backend):
    path = configmap(tmp_path, policy_text(backend.port))
    sc = await started(path, color="canary")
    try:
        configmap(tmp_path, policy_text(backend.port).replace("  canary: {mark: 0x2}\n", ""))
        assert await sc.reload("test") is False
        assert "canary" in sc.policy.colors
        assert await color_of(sc, backend, None) == "canary"
    finally:
        await sc.stop()


async def test_required_datapath_that_cannot_attach_is_not_ready(tmp_path: Path, backend):
    text = policy_text(
        backend.port,
        "datapath:\n  enabled: true\n  required: false\n  attach:\n"
        "    - {interface: tc-none0, direction: ingress}\n",
    )
    sc = await started(configmap(tmp_path, text))
    try:
        # not required: the proxy keeps coloring in headers and stays ready, saying why.
        assert await admin_get(sc, "/readyz") == (200, "ready\n")
        assert sc.datapath is None and sc.dp_state.error
        assert await color_of(sc, backend, "canary") == "canary"
    finally:
        await sc.stop()


def _spawn(path: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run", "--policy", str(path), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_required_datapath_failure_exits_1_with_the_reason(tmp_path: Path) -> None:
    text = policy_text(
        1,
        "datapath:\n  enabled: true\n  required: true\n  attach:\n"
        "    - {interface: tc-none0, direction: ingress}\n",
    )
    path = tmp_path / "p.yaml"
    path.write_text(text)
    proc = _spawn(path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert "required" in out and "tc-none0" in out


def test_sighup_reloads_and_sigterm_drains_then_exits_0(tmp_path: Path) -> None:
    async def scenario() -> None:
        backend = await Backend().start()
        path = tmp_path / "p.yaml"
        path.write_text(
            policy_text(backend.port).replace(
                '"127.0.0.1:0"}\ntimeouts', '"127.0.0.1:0"}\ntimeouts'
            )
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sidecar",
            "run",
            "--policy",
            str(path),
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            outbound = await _wait_for_listener(proc)
            # a slow request is in flight when SIGTERM arrives: it must complete
            async with aiohttp.ClientSession() as s:
                slow = asyncio.ensure_future(
                    s.get(
                        f"http://127.0.0.1:{backend.port}/hold?s=0.5",
                        proxy=f"http://{outbound}",
                        timeout=aiohttp.ClientTimeout(total=10),
                    )
                )
                await asyncio.sleep(0.2)
                path.write_text(policy_text(backend.port, "  blue: {mark: 0x4}"))
                proc.send_signal(signal.SIGHUP)
                await asyncio.sleep(0.1)
                proc.send_signal(signal.SIGTERM)
                resp = await slow
                assert resp.status == 200
                await resp.read()
            rc = await asyncio.wait_for(proc.wait(), 15)
            log = (await proc.stderr.read()).decode()
            assert rc == 0, log
            assert "reload (SIGHUP): policy" in log and "applied" in log
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await backend.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


async def _wait_for_listener(proc: asyncio.subprocess.Process) -> str:
    """Read the log until the sidecar says it is ready; return the outbound host:port."""
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), 20)).decode()
        assert line, "sidecar exited before becoming ready"
        m = re.search(r"ready in .* outbound=\('([\d.]+)', (\d+)\)", line)
        if m:
            return f"{m.group(1)}:{m.group(2)}"


async def test_status_command_prints_a_table_and_json(tmp_path: Path, backend: Backend) -> None:
    sc = await started(configmap(tmp_path, policy_text(backend.port)))
    try:
        await color_of(sc, backend, "canary")
        host, port = sc.admin_address
        args = [sys.executable, "-m", "sidecar", "status", "--admin", f"http://{host}:{port}"]
        proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
        out = (await asyncio.wait_for(proc.communicate(), 20))[0].decode()
        assert proc.returncode == 0, out
        assert "pod color: stable" in out
        rows = {line.split()[0]: line.split() for line in out.splitlines() if line[:1].islower()}
        assert rows["canary"][1:3] == ["0x2", "main"]
        assert "data path: off" in out
        proc = await asyncio.create_subprocess_exec(*args, "--json", stdout=asyncio.subprocess.PIPE)
        raw = (await asyncio.wait_for(proc.communicate(), 20))[0].decode()
        import json

        assert json.loads(raw)["policy"]["digest"] == sc.policy.digest
    finally:
        await sc.stop()


async def test_reload_swaps_lane_routes_and_keeps_the_resolver_cache(
    tmp_path: Path, backend: Backend
) -> None:
    plain = policy_text(backend.port)
    routed = plain.replace(
        'outbound: {listen: "127.0.0.1:0"}',
        'outbound: {listen: "127.0.0.1:0", routes: [{host: reviews, lanes: {canary: r-canary}}]}',
    )
    path = configmap(tmp_path, plain)
    sc = await started(path)
    try:
        assert sc.ctx.lanes is None  # no routes: no router, no lookups
        configmap(tmp_path, routed)
        assert await sc.reload("test") is True
        first = sc.ctx.lanes
        assert first is not None and first.choose("canary", "reviews", 80).host == "r-canary"
        configmap(tmp_path, routed.replace("r-canary", "r-canary-2"))
        assert await sc.reload("test") is True
        assert sc.ctx.lanes is not first and sc.ctx.lanes.cache is first.cache
        assert sc.ctx.lanes.choose("canary", "reviews", 80).host == "r-canary-2"
        status, text = await admin_get(sc, "/debug/route?color=canary&host=reviews:9080")
        assert status == 200 and '"destination": "r-canary-2:9080"' in text
        status, text = await admin_get(sc, "/debug/route?color=canary&host=bad:port")
        assert status == 400
        configmap(tmp_path, plain)
        assert await sc.reload("test") is True
        assert sc.ctx.lanes is None
    finally:
        await sc.stop()


async def test_debug_route_takes_the_captured_destination(tmp_path: Path, backend: Backend) -> None:
    import json

    routed = policy_text(backend.port).replace(
        'outbound: {listen: "127.0.0.1:0"}',
        'outbound: {listen: "127.0.0.1:0", routes: [{host: reviews, lanes: {canary: r-canary}}]}',
    )
    sc = await started(configmap(tmp_path, routed))
    try:

        async def route(query: str) -> tuple[int, dict]:
            status, text = await admin_get(sc, "/debug/route?" + query)
            return status, json.loads(text)

        # stable and laneless choices go where the app dialled, at the dialled port
        status, got = await route("color=stable&host=reviews&dst=10.96.0.12:9080")
        assert status == 200, got
        assert (got["why"], got["destination"], got["original"]) == (
            "stable",
            "10.96.0.12:9080",
            "10.96.0.12:9080",
        )
        status, got = await route("color=canary&host=reviews:80&dst=[fd00:96::12]:9080")
        assert (got["why"], got["destination"], got["original"]) == (
            "lane",
            "r-canary:9080",
            "[fd00:96::12]:9080",
        )
        # an empty lane falls back to the captured destination, not to the name
        sc.ctx.lanes.cache.mark_down("r-canary", 9080, "refused")
        status, got = await route("color=canary&host=reviews&dst=10.96.0.12:9080")
        assert (got["why"], got["reason"], got["destination"]) == (
            "fallback",
            "refused",
            "10.96.0.12:9080",
        )
        for bad in ("10.96.0.12", "reviews:9080", "fd00::12:9080", "[10.0.0.1]:80", "1.2.3.4:0"):
            status, got = await route(f"color=canary&host=reviews&dst={bad}")
            assert status == 400 and "IP:PORT" in got["error"], (bad, got)
    finally:
        await sc.stop()


async def test_a_reload_gives_open_pooled_flows_the_new_dscp(
    tmp_path: Path, backend: Backend
) -> None:
    import socket

    text = policy_text(backend.port).replace("canary: {mark: 0x2}", "canary: {mark: 0x2, dscp: 10}")
    sc = await started(configmap(tmp_path, text), color="canary")
    try:
        assert await color_of(sc, backend, None) == "canary"
        [conn] = sc.proxy._shared.pool.open  # type: ignore[union-attr]
        sock = conn.transport.get_extra_info("socket")

        def ds_field() -> int:
            return sock.getsockopt(socket.IPPROTO_IP, socket.IP_TOS)

        assert ds_field() == 10 << 2
        configmap(tmp_path, text.replace("dscp: 10", "dscp: 46"))
        assert await sc.reload("test") is True
        assert ds_field() == 46 << 2
        assert await color_of(sc, backend, None) == "canary"
        assert backend.connections == 1, "the flow opened before the reload carried it"
        configmap(tmp_path, text.replace(", dscp: 10", ""))
        assert await sc.reload("test") is True
        assert ds_field() == 0, "a DSCP removed from the color: the default again"
    finally:
        await sc.stop()
