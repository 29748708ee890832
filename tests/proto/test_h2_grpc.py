"""gRPC through the sidecar, both sides, with grpcio clients and servers: every call colored,
streaming both ways, big messages, deadlines and cancellation passed on, failures in
gRPC terms."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest

from sidecar.policy import Address, Timeouts
from tests.proto.conftest import MakeProxy, RecordingHooks, port, sample
from tests.proto.h2help import GrpcBackend, call, channel, free_port, in_thread


@pytest.fixture
def grpc_backend() -> Iterator[GrpcBackend]:
    b = GrpcBackend()
    yield b
    b.close()


async def sides(make_proxy: MakeProxy, be: GrpcBackend, **kw: object) -> tuple:
    """A proxy whose app is the gRPC server, and a channel through each side."""
    proxy = await make_proxy(app=Address("127.0.0.1", be.port), **kw)
    out = channel(port(proxy, "outbound"), authority=f"127.0.0.1:{be.port}")
    inb = channel(port(proxy, "inbound"))
    return proxy, out, inb


async def test_unary_both_sides_reaches_the_server_with_the_color(
    make_proxy: MakeProxy, grpc_backend: GrpcBackend
) -> None:
    proxy, out, inb = await sides(make_proxy, grpc_backend, color="canary")
    with out, inb:
        got = await in_thread(call(out, "Unary"), b"hello", timeout=5)
        assert got == b"canary|hello"  # the pod's color, set on a call that had none
        kept = await in_thread(call(out, "Unary"), b"x", metadata=[("x-traffic-color", "stable")])
        assert kept == b"stable|x"  # a known color the app propagated is kept
        got = await in_thread(call(inb, "Unary"), b"in", metadata=[("x-traffic-color", "stable")])
        assert got == b"stable|in"  # trusted inbound header (default policy)
        got = await in_thread(call(inb, "Unary"), b"in", metadata=[("x-traffic-color", "purple")])
        assert got == b"canary|in"  # unknown: replaced by the pod's color and counted
    assert (
        sample(proxy, "traffic_color_header_rewrites_total", direction="inbound", reason="unknown")
        == 1
    )
    assert (
        sample(proxy, "traffic_color_header_rewrites_total", direction="outbound", reason="missing")
        == 1
    )
    grpc_ok = {"grpc_status": "0"}
    assert (
        sample(
            proxy,
            "traffic_color_grpc_requests_total",
            direction="outbound",
            color="canary",
            **grpc_ok,
        )
        == 1
    )
    assert (
        sample(
            proxy,
            "traffic_color_grpc_requests_total",
            direction="inbound",
            color="canary",
            **grpc_ok,
        )
        == 1
    )
    assert (
        sample(
            proxy, "traffic_color_requests_total", direction="outbound", color="stable", code="200"
        )
        == 1
    )
    assert (
        sample(proxy, "traffic_color_connections_total", direction="outbound", protocol="http2")
        == 1
    )
    assert (
        sample(proxy, "traffic_color_connections_total", direction="inbound", protocol="http2") == 1
    )
    assert (
        sample(
            proxy,
            "traffic_color_request_duration_seconds_count",
            direction="inbound",
            color="canary",
        )
        == 1
    )


async def test_streaming_calls_both_ways(make_proxy: MakeProxy, grpc_backend: GrpcBackend) -> None:
    _, out, inb = await sides(make_proxy, grpc_backend)
    with out, inb:
        for ch in (out, inb):
            msgs = await in_thread(
                lambda c=ch: list(call(c, "ServerStream", "unary_stream")(b"200,1000"))
            )
            assert len(msgs) == 200
            assert all(m == i.to_bytes(4, "big") * 250 for i, m in enumerate(msgs))
            parts = [bytes([i]) * (1000 + i) for i in range(100)]
            got = await in_thread(call(ch, "ClientStream", "stream_unary"), iter(parts))
            assert got == f"100,{sum(map(len, parts))}".encode()
            sent = [f"m{i}".encode() * 50 for i in range(50)]
            bidi = call(ch, "Bidi", "stream_stream")
            back = await in_thread(lambda b=bidi, m=sent: list(b(iter(m))))
            assert back == [m[::-1] for m in sent]
    assert [c for m, c in grpc_backend.colors] == ["stable"] * 6


async def test_four_mib_messages_both_ways(
    make_proxy: MakeProxy, grpc_backend: GrpcBackend
) -> None:
    _, out, inb = await sides(make_proxy, grpc_backend)
    big = bytes(range(256)) * (4 * 1024 * 1024 // 256)
    with out, inb:
        for ch in (out, inb):
            assert await in_thread(call(ch, "Echo"), big, timeout=30) == big


async def test_deadline_and_cancel_reach_the_server(
    make_proxy: MakeProxy, grpc_backend: GrpcBackend
) -> None:
    proxy, out, _ = await sides(make_proxy, grpc_backend)
    with out:
        with pytest.raises(grpc.RpcError) as info:
            await in_thread(call(out, "Slow"), b"deadline", timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(300):  # grpc-timeout reached the server: it gave up on its own too
            if grpc_backend.cancelled and not grpc_backend.active:
                break
            await asyncio.sleep(0.01)
        assert grpc_backend.cancelled == ["deadline"]
        fut = call(out, "Slow").future(b"cancel")
        for _ in range(300):
            if grpc_backend.active:
                break
            await asyncio.sleep(0.01)
        fut.cancel()
        for _ in range(300):  # the server saw the cancel: RST_STREAM passed on
            if len(grpc_backend.cancelled) == 2 and not grpc_backend.active:
                break
            await asyncio.sleep(0.01)
        assert sorted(grpc_backend.cancelled) == ["cancel", "deadline"]
    calls = {"direction": "outbound", "color": "stable"}
    cancelled = sample(proxy, "traffic_color_grpc_requests_total", grpc_status="1", **calls)
    # The deadline call ends as the first side to give up says: the client (RST_STREAM,
    # counted CANCELLED) or the server, which had the deadline too (DEADLINE_EXCEEDED).
    expired = sample(proxy, "traffic_color_grpc_requests_total", grpc_status="4", **calls)
    assert (cancelled, cancelled + expired) in ((1, 2), (2, 2))


async def test_a_grpc_call_without_deadline_may_wait_past_upstream_read(
    make_proxy: MakeProxy, grpc_backend: GrpcBackend
) -> None:
    """A watch stream whose server has nothing to say yet is not cut by the proxy."""
    quick = Timeouts(header_read=5.0, idle=5.0, connect=2.0, upstream_idle=5.0, upstream_read=0.2)
    _, out, _ = await sides(make_proxy, grpc_backend, timeouts=quick)
    with out:
        fut = call(out, "Slow").future(b"watch")
        await asyncio.sleep(1.0)
        assert not fut.done() and grpc_backend.active == 1
        fut.cancel()


async def test_server_status_passes_through(
    make_proxy: MakeProxy, grpc_backend: GrpcBackend
) -> None:
    proxy, out, _ = await sides(make_proxy, grpc_backend)
    with out, pytest.raises(grpc.RpcError) as info:
        await in_thread(call(out, "Fail"), b"", timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "no such thing"
    nf = {"direction": "outbound", "color": "stable", "grpc_status": "5"}
    assert sample(proxy, "traffic_color_grpc_requests_total", **nf) == 1


async def test_unreachable_upstream_is_unavailable(make_proxy: MakeProxy) -> None:
    dead = free_port()
    proxy = await make_proxy(app=Address("127.0.0.1", dead))
    out = channel(port(proxy, "outbound"), authority=f"127.0.0.1:{dead}")
    with out, pytest.raises(grpc.RpcError) as info:
        await in_thread(call(out, "Unary"), b"x", timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert info.value.details() == "upstream unavailable"
    una = {"direction": "outbound", "color": "stable", "grpc_status": "14"}
    assert sample(proxy, "traffic_color_grpc_requests_total", **una) == 1


async def test_two_colors_on_one_client_connection_get_their_own_flows(
    make_proxy: MakeProxy, grpc_backend: GrpcBackend
) -> None:
    hooks = RecordingHooks()
    proxy, out, _ = await sides(make_proxy, grpc_backend, hooks=hooks)
    colors = ["canary", "stable"] * 20

    def interleaved() -> list[bytes]:
        futs = [
            call(out, "Unary").future(c.encode(), metadata=[("x-traffic-color", c)]) for c in colors
        ]
        return [f.result(timeout=10) for f in futs]

    with out:
        got = await in_thread(interleaved)
    assert got == [f"{c}|{c}".encode() for c in colors]  # each call's color at the server
    assert proxy.open_flows() == {"canary": 1, "stable": 1}  # one upstream flow per color
    assert sorted(c for c, _, _ in hooks.opened) == ["canary", "stable"]
    by_flow = {(local, remote): c for c, local, remote in hooks.opened}
    assert len(by_flow) == 2
    assert (
        sample(proxy, "traffic_color_connections_total", direction="outbound", protocol="http2")
        == 1
    )
