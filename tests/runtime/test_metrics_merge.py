"""Metrics merging: the sidecar's /metrics also carries the app's own series.

The app is a real Prometheus exporter (prometheus_client's HTTP server in a
process of its own) with a counter of its own; the sidecar runs in-process
with ``TRAFFIC_COLOR_APP_METRICS`` pointing at it, as injection sets it. When
the app stops answering, is slow or too big, the sidecar's own series are
still served and the failure is counted by reason.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sidecar.admin.merge import APP_METRICS_ENV
from tests.runtime.test_runtime import admin_get, configmap, policy_text, started

APP = textwrap.dedent("""\
    import sys, time
    from prometheus_client import Counter, start_http_server
    orders = Counter("shop_orders", "Orders taken by the app", ["kind"])
    orders.labels("book").inc(7)
    start_http_server(int(sys.argv[1]), addr="127.0.0.1")
    print("up", flush=True)
    time.sleep(120)
    """)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", APP, str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        yield proc, port
    finally:
        proc.kill()
        proc.wait()


def failures(body: str, reason: str) -> float:
    name = f'traffic_color_app_metrics_scrape_failures_total{{reason="{reason}"}} '
    [line] = [x for x in body.splitlines() if x.startswith(name)]
    return float(line.split()[-1])


async def test_app_series_are_merged_and_a_dead_app_costs_only_its_own(
    tmp_path: Path, app, monkeypatch
) -> None:
    proc, port = app
    monkeypatch.setenv(APP_METRICS_ENV, f"http://127.0.0.1:{port}/metrics")
    sc = await started(configmap(tmp_path, policy_text(1)))
    try:
        status, body = await admin_get(sc, "/metrics")
        assert status == 200
        assert 'shop_orders_total{kind="book"} 7.0' in body
        assert "# TYPE shop_orders_total counter" in body or "# TYPE shop_orders counter" in body
        assert "traffic_color_datapath_attached 0.0" in body  # ours, beside the app's
        # The exporter's own process series come along; none of our names appear twice.
        types = [x.split()[2] for x in body.splitlines() if x.startswith("# TYPE ")]
        assert len(types) == len(set(types))
        assert failures(body, "connect") == 0

        proc.kill()
        proc.wait()
        status, body = await admin_get(sc, "/metrics")
        assert status == 200
        assert "shop_orders" not in body
        assert "traffic_color_datapath_attached 0.0" in body
        assert failures(body, "connect") == 1
    finally:
        await sc.stop()


async def _serve_once(handler) -> tuple[asyncio.AbstractServer, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_slow_and_oversized_apps_are_cut_off_and_counted(tmp_path: Path, monkeypatch):
    async def slow(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(3)
        writer.close()

    server, port = await _serve_once(slow)
    monkeypatch.setenv(APP_METRICS_ENV, f"http://127.0.0.1:{port}/metrics")
    sc = await started(configmap(tmp_path, policy_text(1)))
    try:
        sc._admin.app_metrics.timeout = 0.3
        t0 = time.monotonic()
        status, body = await admin_get(sc, "/metrics")
        assert status == 200 and time.monotonic() - t0 < 2
        assert failures(body, "timeout") == 1

        big = b"x_big 1\n" * 4096

        async def oversized(reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
            await writer.drain()
            writer.close()

        server.close()
        server, port = await _serve_once(oversized)
        sc._admin.app_metrics.url = f"http://127.0.0.1:{port}/metrics"
        sc._admin.app_metrics.max_bytes = 1000
        status, body = await admin_get(sc, "/metrics")
        assert status == 200 and "x_big" not in body
        assert failures(body, "too_large") == 1
        sc._admin.app_metrics.max_bytes = 1 << 20
        status, body = await admin_get(sc, "/metrics")
        assert "x_big 1" in body
    finally:
        server.close()
        await sc.stop()
