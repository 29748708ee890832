"""A color's DSCP changed by a reload reaches the upstream flows already open (issue 15).

The DS field is read back from the proxy's own upstream sockets (``getsockopt``), for
each kind of flow the pools hold: an idle keep-alive connection, a parked one (a bare
descriptor), a CONNECT tunnel in use and an HTTP/2 upstream connection. The packets
themselves are checked at a node agent's classifier in tests/netns/test_node.py.
"""

from __future__ import annotations

import os
import socket

from sidecar.coloring import Colorer
from sidecar.policy import Address, parse_policy
from sidecar.proxy import Proxy
from sidecar.proxy.pool import ParkedFlow, dscp_changes
from tests.proto.backend import Backend
from tests.proto.conftest import Conn, MakeProxy, RecordingHooks, port, request, until
from tests.proto.h2help import (
    END_HEADERS,
    END_STREAM,
    HEADERS,
    RawH2,
    RawUpstream,
    frame,
    hpack,
    request_fields,
)

POLICY = "colors:\n  stable: {mark: 1, dscp: 8}\n  canary: {mark: 2, dscp: 10}\n"


def ds_field(flow) -> int:
    """The DS field an open flow's socket sends with now."""
    if isinstance(flow, ParkedFlow):
        fd = flow.fd
    else:
        fd = flow.transport.get_extra_info("socket").fileno()
    with socket.socket(fileno=os.dup(fd)) as s:
        return s.getsockopt(socket.IPPROTO_IP, socket.IP_TOS)


def h1_flows(proxy: Proxy) -> list:
    return list(proxy._shared.pool.open)  # type: ignore[union-attr]


async def test_http1_idle_parked_and_tunnel_flows_get_the_new_dscp(
    make_proxy: MakeProxy, backend: Backend
) -> None:
    proxy = await make_proxy(policy=POLICY, color="canary")
    pool = proxy._shared.pool  # type: ignore[union-attr]
    host = f"127.0.0.1:{backend.port}"
    client = await Conn.open(port(proxy))
    await client.send(request("GET", "/", host))
    assert (await client.response()).status == 200
    client.close()
    tunnel = await Conn.open(port(proxy))
    await tunnel.send(f"CONNECT {host} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert (await tunnel.response("CONNECT")).status == 200
    # two requests at once: a second pooled connection, parked below
    slow, fast = await Conn.open(port(proxy)), await Conn.open(port(proxy))
    await slow.send(request("GET", "/hold?s=0.3", host))
    await until(lambda: len(backend.requests) == 2)
    await fast.send(request("GET", "/", host))
    for c in (slow, fast):
        assert (await c.response()).status == 200
        c.close()
    assert await until(lambda: len(pool.idle.get(("canary", "127.0.0.1", backend.port), [])) == 2)
    pool.park(pool.idle[("canary", "127.0.0.1", backend.port)].pop(0))
    assert await until(lambda: any(isinstance(f, ParkedFlow) for f in pool.open))
    flows = h1_flows(proxy)
    assert len(flows) == 3  # hot, parked, tunnel
    assert {type(f).__name__ for f in flows} == {"UpstreamConnection", "ParkedFlow"}
    assert [ds_field(f) for f in flows] == [10 << 2] * 3

    new = parse_policy(POLICY.replace("dscp: 10", "dscp: 46"))
    changes = dscp_changes(proxy.ctx.colorer.policy, new)
    assert changes == {"canary": 46}
    assert proxy.set_dscp(changes) == 3
    assert [ds_field(f) for f in flows] == [46 << 2] * 3
    # the tunnel still works, and the parked flow revives with the new value
    await tunnel.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await tunnel.response()).status == 200
    tunnel.close()
    assert proxy.set_dscp({"canary": 0}) == 3  # a color whose DSCP was removed: back to 0
    assert [ds_field(f) for f in flows] == [0] * 3
    assert proxy.set_dscp({"stable": 12}) == 0  # other colors' flows are left alone


def test_which_colors_change_on_a_reload() -> None:
    old = parse_policy(POLICY + "  blue: {mark: 3, dscp: 14}\n")
    new = parse_policy(
        "colors:\n  stable: {mark: 1, dscp: 8}\n  canary: {mark: 2}\n  gold: {mark: 4, dscp: 20}\n"
    )
    # canary lost its DSCP, blue is gone (its flows still run), gold is new
    assert dscp_changes(old, new) == {"canary": 0, "blue": 0, "gold": 20}
    assert dscp_changes(old, old) == {}


async def test_http2_upstream_connections_get_the_new_dscp(make_proxy: MakeProxy) -> None:
    up = await RawUpstream().start()
    proxy = await make_proxy(policy=POLICY, color="canary", app=Address("127.0.0.1", up.port))
    client = await RawH2.open(port(proxy, "inbound"))
    block = hpack(request_fields("app", "/"))
    await client.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, block))
    await client.frames_until(lambda fs: any(k == HEADERS and s == 1 for k, _, s, _ in fs))
    h2 = proxy._door.h2  # type: ignore[union-attr]
    [conn] = h2.pool.open
    assert ds_field(conn) == 10 << 2
    assert proxy.set_dscp({"canary": 34}) == 1
    assert ds_field(conn) == 34 << 2
    client.close()
    await up.close()


async def test_a_flow_whose_connect_a_reload_overtook_gets_the_new_dscp(
    make_proxy: MakeProxy, backend: Backend
) -> None:
    """The reload lands between the socket's options and its connect's end (here: in the
    flow hook, which runs just before the SYN): the new flow is not open yet when the
    reload looks, so ``connect`` sees to it."""
    new = Colorer(parse_policy(POLICY.replace("dscp: 10", "dscp: 46")), "canary")

    class ReloadingHooks(RecordingHooks):
        def flow_open(self, color: str, local: tuple, remote: tuple) -> None:
            super().flow_open(color, local, remote)
            proxy.ctx.colorer = new

    proxy = await make_proxy(policy=POLICY, color="canary", hooks=ReloadingHooks())
    client = await Conn.open(port(proxy))
    await client.send(request("GET", "/", f"127.0.0.1:{backend.port}"))
    assert (await client.response()).status == 200
    client.close()
    [flow] = h1_flows(proxy)
    assert ds_field(flow) == 46 << 2


async def test_an_http2_connection_whose_connect_a_reload_overtook_gets_the_new_dscp(
    make_proxy: MakeProxy,
) -> None:
    """As above, for an HTTP/2 upstream connection still being made when the reload looks."""
    new = Colorer(parse_policy(POLICY.replace("dscp: 10", "dscp: 46")), "canary")

    class ReloadingHooks(RecordingHooks):
        def flow_open(self, color: str, local: tuple, remote: tuple) -> None:
            super().flow_open(color, local, remote)
            proxy.ctx.colorer = new

    up = await RawUpstream().start()
    proxy = await make_proxy(
        policy=POLICY, color="canary", app=Address("127.0.0.1", up.port), hooks=ReloadingHooks()
    )
    client = await RawH2.open(port(proxy, "inbound"))
    await client.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, hpack(request_fields("app"))))
    await client.frames_until(lambda fs: any(k == HEADERS and s == 1 for k, _, s, _ in fs))
    [conn] = proxy._door.h2.pool.open  # type: ignore[union-attr]
    assert ds_field(conn) == 46 << 2
    client.close()
    await up.close()
