"""Flows: per-color pool and hooks, CONNECT and Upgrade tunnels, stale retries, drain."""

from __future__ import annotations

import asyncio
import json

import pytest
import requests

from sidecar.proxy import Proxy
from sidecar.proxy import pool as pooling
from tests.proto.backend import Backend
from tests.proto.conftest import (
    Conn,
    MakeProxy,
    RecordingHooks,
    port,
    request,
    sample,
    until,
)


async def test_per_color_pool_gives_each_color_its_own_flow(
    make_proxy: MakeProxy, backend: Backend
) -> None:
    hooks = RecordingHooks()
    proxy = await make_proxy(hooks=hooks)
    host = f"127.0.0.1:{backend.port}"
    conn = await Conn.open(port(proxy))
    for color in ("stable", "canary", "stable", "canary"):
        await conn.send(request("GET", f"/{color}", host, {"x-traffic-color": color}))
        assert (await conn.response()).status == 200
    conn.close()
    assert proxy.open_flows() == {"stable": 1, "canary": 1}
    assert sorted(c for c, _, _ in hooks.opened) == ["canary", "stable"]
    # The 4-tuples are the real ones: the backend saw our local ends as its peers.
    assert {local for _, local, _ in hooks.opened} == set(backend.peers)
    assert {remote for _, _, remote in hooks.opened} == {("127.0.0.1", backend.port)}
    # Each flow carried only its color.
    by_peer: dict[tuple[str, int], set[str]] = {}
    for seen in backend.requests:
        by_peer.setdefault(seen.peer, set()).update(seen.header("x-traffic-color"))
    assert sorted(map(sorted, by_peer.values())) == [["canary"], ["stable"]]
    assert sample(proxy, "traffic_color_upstream_flows", color="canary") == 1
    await proxy.drain(1)
    assert sorted(hooks.closed) == sorted(hooks.opened)  # each closed once, same arguments
    assert sample(proxy, "traffic_color_upstream_flows", color="canary") == 0


async def test_a_failing_hook_does_not_break_requests(
    make_proxy: MakeProxy, backend: Backend
) -> None:
    hooks = RecordingHooks(fail=True)
    proxy = await make_proxy(hooks=hooks)
    conn = await Conn.open(port(proxy))
    await conn.send(request("GET", "/", f"127.0.0.1:{backend.port}"))
    assert (await conn.response()).status == 200
    conn.close()
    await proxy.drain(1)
    assert len(hooks.opened) == 1 and len(hooks.closed) == 1


async def test_hooks_set_after_start_apply_to_new_flows(proxy: Proxy, backend: Backend) -> None:
    hooks = RecordingHooks()
    proxy.ctx.hooks = hooks
    conn = await Conn.open(port(proxy, "inbound"))
    await conn.send(request("GET", "/", "app", {"x-traffic-color": "canary"}))
    assert (await conn.response()).status == 200
    conn.close()
    assert [c for c, _, _ in hooks.opened] == ["canary"]


async def test_connect_tunnel_gets_the_pod_color(make_proxy: MakeProxy, backend: Backend) -> None:
    hooks = RecordingHooks()
    proxy = await make_proxy(color="canary", hooks=hooks)
    conn = await Conn.open(port(proxy))
    target = f"127.0.0.1:{backend.port}"
    await conn.send(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    est = await conn.response("CONNECT")
    assert est.status == 200
    # Inside the tunnel the bytes are opaque: the proxy injects no header.
    await conn.send(request("GET", "/inside", target))
    inner = await conn.response()
    assert json.loads(inner.body)["target"] == "/inside"
    assert backend.requests[-1].header("x-traffic-color") == []
    assert [c for c, _, _ in hooks.opened] == ["canary"]
    assert hooks.opened[0][1] == backend.peers[-1]
    assert hooks.opened[0][2] == ("127.0.0.1", backend.port)
    assert proxy.open_flows() == {"canary": 1}
    conn.close()
    assert await until(lambda: hooks.closed == hooks.opened)
    assert proxy.open_flows() == {}


async def test_connect_through_requests_https_style(proxy: Proxy, backend: Backend) -> None:
    """An app's HTTPS client sends CONNECT; here the tunnel carries plain HTTP to check bytes."""
    import socket

    def tunnel() -> bytes:
        with socket.create_connection(("127.0.0.1", port(proxy)), timeout=5) as s:
            target = f"127.0.0.1:{backend.port}"
            s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            s.sendall(request("GET", "/early", target))  # sent before the 200 arrives
            s.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            return data

    out = await asyncio.to_thread(tunnel)
    assert out.startswith(b"HTTP/1.1 200 Connection Established\r\n\r\nHTTP/1.1 200 OK")
    assert b'"/early"' in out


async def test_websocket_style_upgrade_becomes_a_tunnel(
    make_proxy: MakeProxy, backend: Backend
) -> None:
    hooks = RecordingHooks()
    proxy = await make_proxy(hooks=hooks)
    conn = await Conn.open(port(proxy, "inbound"))
    await conn.send(
        request(
            "GET",
            "/ws",
            "app",
            {
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Version": "13",
                "x-traffic-color": "canary",
            },
        )
    )
    resp = await conn.response()
    assert resp.status == 101
    assert resp.getheader("upgrade") == "websocket"
    seen = backend.requests[-1]
    assert seen.header("upgrade") == ["websocket"]
    assert seen.header("x-traffic-color") == ["canary"]
    await conn.send(b"hello frames")
    got = b""
    while len(got) < 12:
        got += await asyncio.wait_for(conn.reader.read(100), 5)
    assert got == b"HELLO FRAMES"
    # Half-close travels through: the backend answers EOF with EOF.
    conn.writer.write_eof()
    assert await conn.closed(5)
    conn.close()
    assert await until(lambda: len(hooks.closed) == 1)
    assert hooks.opened[0][0] == "canary"
    assert (
        sample(
            proxy, "traffic_color_requests_total", direction="inbound", color="canary", code="101"
        )
        == 1
    )


async def test_stale_pooled_connection_is_retried_for_idempotent_requests(
    proxy: Proxy, backend: Backend
) -> None:
    host = f"127.0.0.1:{backend.port}"
    conn = await Conn.open(port(proxy))
    await conn.send(request("GET", "/arm-drop", host))
    assert (await conn.response()).status == 200
    # The backend now closes that pooled connection on its next request, unanswered.
    await conn.send(request("GET", "/after", host))
    resp = await conn.response()
    assert resp.status == 200 and json.loads(resp.body)["target"] == "/after"
    assert backend.paths() == ["/arm-drop", "/after", "/after"]
    assert [s.answered for s in backend.requests] == [True, False, True]
    # Not idempotent: not retried, the client gets a 502.
    await conn.send(request("GET", "/arm-drop", host))
    assert (await conn.response()).status == 200
    await conn.send(request("POST", "/pay", host, body=b"1"))
    assert (await conn.response("POST")).status == 502
    conn.close()
    assert backend.paths()[-1] == "/pay" and backend.requests[-1].answered is False


async def test_long_idle_pooled_connection_parks_and_serves_again_on_the_same_flow(
    make_proxy: MakeProxy, backend: Backend
) -> None:
    hooks = RecordingHooks()
    proxy = await make_proxy(hooks=hooks)
    pool = proxy._shared.pool  # type: ignore[union-attr]
    host = f"127.0.0.1:{backend.port}"
    key = ("stable", "127.0.0.1", backend.port)
    conn = await Conn.open(port(proxy))
    await conn.send(request("GET", "/first", host))
    assert (await conn.response()).status == 200
    (idle,) = pool.idle[key]
    now = pool.now
    pool.sweep(now + 1, idle_timeout=60)  # idle less than a whole sweep: stays hot
    assert pool.idle[key] == [idle] and not pool.parked
    pool.sweep(now + 2, idle_timeout=60)  # idle across a whole sweep: parked
    assert await until(lambda: len(pool.parked.get(key, {})) == 1, 2)
    (parked,) = pool.parked[key]
    assert not pool.idle.get(key) and idle.transport is None
    # The flow lives on: the same 4-tuple, the socket open, nothing told the hooks it closed.
    assert hooks.opened == [("stable", *parked.addrs)] and hooks.closed == []
    assert len(backend.writers) == 1 and proxy.open_flows() == {"stable": 1}
    assert sample(proxy, "traffic_color_upstream_flows", color="stable") == 1
    await conn.send(request("GET", "/second", host))
    resp = await conn.response()
    assert resp.status == 200 and json.loads(resp.body)["target"] == "/second"
    assert len(hooks.opened) == 1 and backend.connections == 1  # the same flow served both
    assert not pool.parked[key] and len(pool.idle[key]) == 1
    # Revived connections are as stale-prone as pooled ones: a keep-alive race is retried.
    await conn.send(request("GET", "/arm-drop", host))
    assert (await conn.response()).status == 200
    pool.sweep(pool.now + 1, idle_timeout=60)
    pool.sweep(pool.now + 1, idle_timeout=60)
    assert await until(lambda: len(pool.parked.get(key, {})) == 1, 2)
    await conn.send(request("GET", "/third", host))
    resp = await conn.response()
    conn.close()
    assert resp.status == 200 and json.loads(resp.body)["target"] == "/third"
    assert [s.answered for s in backend.requests[-2:]] == [False, True]
    assert backend.connections == 2
    await proxy.drain(1)
    assert sorted(hooks.closed) == sorted(hooks.opened)


async def test_upstreams_no_longer_used_leave_no_pool_entries(
    make_proxy: MakeProxy, backend: Backend
) -> None:
    """Eight upstreams used once (four spellings of one address, two colors): once their
    connections idle out, the pool keeps nothing for them, however many an app has
    talked to over its life."""
    proxy = await make_proxy()
    pool = proxy._shared.pool  # type: ignore[union-attr]
    conn = await Conn.open(port(proxy))
    for name in ("127.0.0.1", "127.1", "127.0.1", "2130706433"):
        for color in ("stable", "canary"):
            host = f"{name}:{backend.port}"
            await conn.send(request("GET", "/", host, {"x-traffic-color": color}))
            assert (await conn.response()).status == 200
    conn.close()
    assert len(pool.idle) == 8
    pool.sweep(pool.now + 1, idle_timeout=60)
    pool.sweep(pool.now + 1, idle_timeout=60)  # idle across a sweep: all parked
    assert await until(lambda: sum(map(len, pool.parked.values())) == 8, 2)
    assert pool.idle == {}
    pool.sweep(pool.now + 120, idle_timeout=60)  # and now past the idle timeout
    assert pool.parked == {} and pool.idle == {}
    assert proxy.open_flows() == {}


async def test_idle_connections_beyond_the_hot_tier_park_and_close_when_the_upstream_does(
    make_proxy: MakeProxy, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pooling, "HOT_IDLE_PER_KEY", 1)
    hooks = RecordingHooks()
    proxy = await make_proxy(hooks=hooks)
    pool = proxy._shared.pool  # type: ignore[union-attr]
    host = f"127.0.0.1:{backend.port}"
    conns = [await Conn.open(port(proxy)) for _ in range(3)]
    for c in conns:
        await c.send(request("GET", "/hold?s=0.2", host))
    assert [(await c.response()).status for c in conns] == [200, 200, 200]
    key = ("stable", "127.0.0.1", backend.port)
    assert await until(lambda: len(pool.parked.get(key, {})) == 2, 2)
    assert len(pool.idle[key]) == 1 and proxy.open_flows() == {"stable": 3}
    # The upstream goes away: parked flows end too, and the kernel hears of each.
    await backend.close()
    assert await until(lambda: len(hooks.closed) == 3, 2)
    assert sorted(hooks.closed) == sorted(hooks.opened)
    assert proxy.open_flows() == {} and not pool.parked[key]
    assert sample(proxy, "traffic_color_upstream_flows", color="stable") == 0
    for c in conns:
        c.close()


async def test_drain_closes_parked_connections(
    make_proxy: MakeProxy, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pooling, "HOT_IDLE_PER_KEY", 0)  # every idle connection parks
    hooks = RecordingHooks()
    proxy = await make_proxy(hooks=hooks)
    conn = await Conn.open(port(proxy))
    await conn.send(request("GET", "/", f"127.0.0.1:{backend.port}"))
    assert (await conn.response()).status == 200
    conn.close()
    pool = proxy._shared.pool  # type: ignore[union-attr]
    assert await until(lambda: any(pool.parked.values()), 2)
    await proxy.drain(1)
    assert len(hooks.opened) == 1 and hooks.closed == hooks.opened
    assert await until(lambda: not backend.writers, 2)  # the backend saw the socket close


async def test_requests_session_survives_keep_alive_race(proxy: Proxy, backend: Backend) -> None:
    proxies = {"http": f"http://127.0.0.1:{port(proxy)}"}
    base = f"http://127.0.0.1:{backend.port}"

    def run() -> list[int]:
        with requests.Session() as s:
            return [
                s.get(f"{base}{p}", proxies=proxies, timeout=5).status_code
                for p in ("/arm-drop", "/x", "/arm-drop", "/y")
            ]

    assert await asyncio.to_thread(run) == [200, 200, 200, 200]


async def test_drain_finishes_in_flight_requests_and_closes(
    make_proxy: MakeProxy, backend: Backend
) -> None:
    hooks = RecordingHooks()
    proxy = await make_proxy(hooks=hooks)
    host = f"127.0.0.1:{backend.port}"
    idle = await Conn.open(port(proxy))
    await idle.send(request("GET", "/warm", host))
    assert (await idle.response()).status == 200
    busy = await Conn.open(port(proxy))
    await busy.send(request("GET", "/hold?s=0.4", host))
    await until(lambda: len(backend.requests) == 2 or False, 2)
    await asyncio.sleep(0.05)
    drain = asyncio.create_task(proxy.drain(5))
    assert await idle.closed(2)  # idle keep-alive connection: closed at once
    resp = await busy.response()
    assert resp.status == 200 and resp.getheader("connection") == "close"
    assert await busy.closed(2)
    await asyncio.wait_for(drain, 5)
    busy.close()
    idle.close()
    assert proxy.open_flows() == {}
    assert sorted(hooks.closed) == sorted(hooks.opened) and hooks.opened
    try:
        _, w = await asyncio.open_connection("127.0.0.1", port(proxy))
        w.close()
        accepted = True
    except OSError:
        accepted = False
    assert not accepted


async def test_drain_deadline_cuts_what_is_left(make_proxy: MakeProxy, backend: Backend) -> None:
    proxy = await make_proxy()
    busy = await Conn.open(port(proxy))
    await busy.send(request("GET", "/hold?s=5", f"127.0.0.1:{backend.port}"))
    assert await until(lambda: len(backend.requests) == 1, 3) or True
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await proxy.drain(0.3)
    assert loop.time() - t0 < 3
    assert await busy.closed(2)
    busy.close()
    assert proxy.open_flows() == {}
