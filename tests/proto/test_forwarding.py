"""Forwarding over real loopback sockets: coloring, targets, keep-alive, bodies, framing."""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.request

import pytest
import requests

from sidecar.proxy import Proxy
from tests.proto.backend import Backend
from tests.proto.conftest import Conn, MakeProxy, curl, port, raw, request, sample, upstream

INBOUND_RULES = """\
version: 1
default_color: stable
colors:
  stable: {mark: 0x1}
  canary: {mark: 0x2}
inbound:
  trust_header: false
  rules:
    - match: {header: {name: x-beta, value: "yes"}}
      color: canary
"""


def echo(body: bytes) -> dict:
    return json.loads(body)


def colors_seen(backend: Backend, i: int = -1) -> list[str]:
    return backend.requests[i].header("x-traffic-color")


# ---------------------------------------------------------------- outbound coloring


async def test_outbound_absolute_form_from_curl_gets_pod_color(
    make_proxy: MakeProxy, backend: Backend
) -> None:
    proxy = await make_proxy(color="canary")
    code, out, err = await curl(
        "-x", f"http://127.0.0.1:{port(proxy)}", f"http://127.0.0.1:{backend.port}/v1/items?x=1"
    )
    assert code == 0, err
    seen = backend.requests[-1]
    assert seen.target == "/v1/items?x=1"  # rewritten to origin-form
    assert seen.header("host") == [f"127.0.0.1:{backend.port}"]
    assert colors_seen(backend) == ["canary"]
    assert echo(out)["target"] == "/v1/items?x=1"
    assert (
        sample(proxy, "traffic_color_header_rewrites_total", direction="outbound", reason="missing")
        == 1
    )
    assert (
        sample(
            proxy, "traffic_color_requests_total", direction="outbound", color="canary", code="200"
        )
        == 1
    )


async def test_outbound_keeps_a_single_known_color(proxy: Proxy, backend: Backend) -> None:
    code, _, err = await curl(
        "-x",
        f"http://127.0.0.1:{port(proxy)}",
        "-H",
        "X-Traffic-Color: canary",
        f"http://127.0.0.1:{backend.port}/",
    )
    assert code == 0, err
    assert colors_seen(backend) == ["canary"]
    assert (
        sample(proxy, "traffic_color_header_rewrites_total", direction="outbound", reason="missing")
        == 0
    )


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({"x-traffic-color": "purple"}, "unknown"),
        ({"x-traffic-color": "Canary!"}, "malformed"),
        ({"x-traffic-color": "canary, stable"}, "repeated"),
    ],
)
async def test_outbound_replaces_bad_colors_and_counts_why(
    proxy: Proxy, backend: Backend, headers: dict[str, str], reason: str
) -> None:
    conn = await Conn.open(port(proxy))
    await conn.send(request("GET", "/", f"127.0.0.1:{backend.port}", headers))
    resp = await conn.response()
    conn.close()
    assert resp.status == 200
    assert colors_seen(backend) == ["stable"]
    assert (
        sample(proxy, "traffic_color_header_rewrites_total", direction="outbound", reason=reason)
        == 1
    )


async def test_outbound_repeated_header_lines_are_replaced_by_one(
    proxy: Proxy, backend: Backend
) -> None:
    data = (
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{backend.port}\r\nx-traffic-color: canary\r\n"
        "a: 1\r\nX-Traffic-Color: canary\r\n\r\n"
    ).encode()
    conn = await Conn.open(port(proxy))
    await conn.send(data)
    assert (await conn.response()).status == 200
    conn.close()
    seen = backend.requests[-1]
    assert colors_seen(backend) == ["stable"]
    names = [n.lower() for n, _ in seen.headers]
    assert names == ["host", "a", "x-traffic-color"]  # order kept, ours appended once
    assert (
        sample(
            proxy, "traffic_color_header_rewrites_total", direction="outbound", reason="repeated"
        )
        == 1
    )


async def test_outbound_origin_form_uses_host(proxy: Proxy, backend: Backend) -> None:
    code, out, err = await curl(
        f"http://127.0.0.1:{port(proxy)}/direct", "-H", f"Host: 127.0.0.1:{backend.port}"
    )
    assert code == 0, err
    assert echo(out)["target"] == "/direct"
    assert colors_seen(backend) == ["stable"]


async def test_python_clients_through_http_proxy(proxy: Proxy, backend: Backend) -> None:
    proxies = {"http": f"http://127.0.0.1:{port(proxy)}"}
    url = f"http://127.0.0.1:{backend.port}/py?q=1"

    def with_requests() -> requests.Response:
        return requests.get(url, proxies=proxies, headers={"x-traffic-color": "canary"}, timeout=5)

    def with_urllib() -> bytes:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))
        with opener.open(url, timeout=5) as resp:
            return resp.read()

    r = await asyncio.to_thread(with_requests)
    assert r.status_code == 200 and r.json()["target"] == "/py?q=1"
    assert colors_seen(backend) == ["canary"]
    body = await asyncio.to_thread(with_urllib)
    assert echo(body)["target"] == "/py?q=1"
    assert colors_seen(backend) == ["stable"]


async def test_request_durations_are_timed_finer_than_the_loop_clock(proxy: Proxy) -> None:
    """The histogram's buckets start at 0.1 ms, so durations must be finer than
    uvloop's ``loop.time()``, which counts whole milliseconds (cached per loop turn)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"\r\n\r\n"):
            await asyncio.sleep(0.0015)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    async with upstream(serve) as up:
        conn = await Conn.open(port(proxy))
        for _ in range(3):
            await conn.send(request("GET", "/", f"127.0.0.1:{up}"))
            assert (await conn.response()).status == 200
        conn.close()
    name = "traffic_color_request_duration_seconds"
    labels = {"direction": "outbound", "color": "stable"}
    assert sample(proxy, f"{name}_count", **labels) == 3
    total_ms = sample(proxy, f"{name}_sum", **labels) * 1e3
    assert total_ms >= 3 * 1.5
    assert abs(total_ms - round(total_ms)) > 1e-6  # not whole milliseconds


@pytest.mark.parametrize(
    "fields",
    [
        # nginx's order: the keep-alive line last, cut off without a look at the rest
        [b"Server: nginx", b"Content-Length: 2", b"Connection: keep-alive"],
        [
            b"Connection: keep-alive",
            b"Server: node",
            b"Keep-Alive: timeout=5",
            b"Content-Length: 2",
        ],
        [b"Content-Length: 2", b"connection: Keep-Alive", b"X-Last: 1"],
    ],
)
async def test_response_heads_reach_the_client_without_the_upstream_keep_alive(
    proxy: Proxy, fields: list[bytes]
) -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(head + b"ok")

    async with upstream(serve) as up:
        ask = request("GET", "/", f"127.0.0.1:{up}", {"Connection": "close"})
        out = await raw(port(proxy), ask + ask)  # the second is never read: the first closes
    got_head, _, body = out.partition(b"\r\n\r\n")
    lines = got_head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    kept = [f for f in fields if not f.lower().startswith((b"connection:", b"keep-alive:"))]
    assert lines[1:] == [*kept, b"connection: close"]
    assert body == b"ok"


# ---------------------------------------------------------------- inbound coloring


async def test_inbound_trusted_known_color_is_kept(proxy: Proxy, backend: Backend) -> None:
    code, _, err = await curl(
        f"http://127.0.0.1:{port(proxy, 'inbound')}/in", "-H", "x-traffic-color: canary"
    )
    assert code == 0, err
    assert backend.requests[-1].target == "/in"
    assert colors_seen(backend) == ["canary"]


async def test_inbound_rule_on_the_host_header(make_proxy: MakeProxy, backend: Backend) -> None:
    """A virtual host can pick the lane: Host is read by the rules and still forwarded."""
    policy = INBOUND_RULES.replace('name: x-beta, value: "yes"', "name: host, value: beta.shop")
    proxy = await make_proxy(policy=policy, color="stable")
    conn = await Conn.open(port(proxy, "inbound"))
    for host, color in (("beta.shop", "canary"), ("www.shop", "stable")):
        await conn.send(request("GET", "/", host))
        assert (await conn.response()).status == 200
        assert colors_seen(backend) == [color]
        assert backend.requests[-1].header("host") == [host]
    conn.close()


async def test_inbound_untrusted_color_goes_to_rules_then_pod_color(
    make_proxy: MakeProxy, backend: Backend
) -> None:
    proxy = await make_proxy(policy=INBOUND_RULES, color="stable")
    inbound = port(proxy, "inbound")
    conn = await Conn.open(inbound)
    # Untrusted sender claims canary: not kept, no rule matches -> the pod's color.
    await conn.send(request("GET", "/a", "app", {"x-traffic-color": "canary"}))
    assert (await conn.response()).status == 200
    assert colors_seen(backend) == ["stable"]
    # A rule decides.
    await conn.send(request("GET", "/b", "app", {"x-beta": "yes"}))
    assert (await conn.response()).status == 200
    assert colors_seen(backend) == ["canary"]
    assert backend.requests[-1].header("x-beta") == ["yes"]  # captured headers still pass
    conn.close()
    assert (
        sample(
            proxy, "traffic_color_header_rewrites_total", direction="inbound", reason="untrusted"
        )
        == 1
    )
    assert (
        sample(proxy, "traffic_color_header_rewrites_total", direction="inbound", reason="missing")
        == 1
    )


# ---------------------------------------------------------------- keep-alive, versions, pipelining


async def test_keep_alive_on_both_sides(proxy: Proxy, backend: Backend) -> None:
    conn = await Conn.open(port(proxy))
    for i in range(3):
        await conn.send(request("GET", f"/k{i}", f"127.0.0.1:{backend.port}"))
        resp = await conn.response()
        assert resp.status == 200 and echo(resp.body)["target"] == f"/k{i}"  # type: ignore[attr-defined]
    conn.close()
    assert backend.connections == 1  # one pooled upstream connection served all three
    assert len({s.peer for s in backend.requests}) == 1


async def test_http10_client(proxy: Proxy, backend: Backend) -> None:
    host = f"127.0.0.1:{backend.port}"
    # Plain HTTP/1.0: answered, then closed.
    out = await raw(port(proxy), f"GET http://{host}/old HTTP/1.0\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 200 ")
    assert echo(out.split(b"\r\n\r\n", 1)[1])["target"] == "/old"
    assert backend.requests[-1].header("host") == [host]
    # HTTP/1.0 keep-alive: the connection stays for a second request.
    conn = await Conn.open(port(proxy))
    for _ in range(2):
        await conn.send(f"GET http://{host}/ka HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode())
        resp = await conn.response()
        assert resp.status == 200 and resp.getheader("connection") == "keep-alive"
    conn.close()


@pytest.mark.parametrize(
    ("version", "header"),
    [
        ("1.0", ""),
        ("1.0", "Connection: keep-alive\r\n"),
        ("1.0", "Proxy-Connection: keep-alive\r\n"),
        ("1.1", "Connection: close\r\n"),
        ("1.1", "Proxy-Connection: close\r\n"),
    ],
)
async def test_only_http11_clients_get_a_chunked_body(
    proxy: Proxy, backend: Backend, version: str, header: str
) -> None:
    """The version decides the framing, whatever the keep-alive headers say."""
    host = f"127.0.0.1:{backend.port}"
    req = f"GET http://{host}/chunked?n=3 HTTP/{version}\r\nHost: {host}\r\n{header}\r\n"
    out = await raw(port(proxy), req.encode(), timeout=5)
    head, _, body = out.partition(b"\r\n\r\n")
    chunked = b"transfer-encoding: chunked" in head.lower()
    assert chunked is (version == "1.1"), head
    if not chunked:
        assert echo(body)["target"] == "/chunked?n=3"


async def test_pipelined_requests_are_answered_in_order(proxy: Proxy, backend: Backend) -> None:
    host = f"127.0.0.1:{backend.port}"
    data = b"".join(
        [
            request("GET", "/hold?s=0.2", host),
            request("POST", "/second", host, body=b"abc"),
            request("GET", "/third", host),
        ]
    )
    conn = await Conn.open(port(proxy))
    await conn.send(data)
    targets = []
    for method in ("GET", "POST", "GET"):
        resp = await conn.response(method)
        targets.append(echo(resp.body)["target"])  # type: ignore[attr-defined]
    conn.close()
    assert targets == ["/hold?s=0.2", "/second", "/third"]
    assert backend.requests[1].body == b"abc"


# ---------------------------------------------------------------- bodies


async def test_content_length_and_chunked_uploads(proxy: Proxy, backend: Backend) -> None:
    proxies = {"http": f"http://127.0.0.1:{port(proxy)}"}
    url = f"http://127.0.0.1:{backend.port}/upload"
    big = bytes(range(256)) * 8192  # 2 MiB

    def post_cl() -> requests.Response:
        return requests.post(url, data=big, proxies=proxies, timeout=10)

    def post_chunked() -> requests.Response:
        return requests.post(
            url, data=iter([b"a" * 70000, b"b" * 5, b"c" * 100000]), proxies=proxies, timeout=10
        )

    r = await asyncio.to_thread(post_cl)
    assert r.json()["body_len"] == len(big)
    assert backend.requests[-1].body == big
    r = await asyncio.to_thread(post_chunked)
    assert r.json()["body_len"] == 170005
    assert backend.requests[-1].header("transfer-encoding") == ["chunked"]
    assert backend.requests[-1].body == b"a" * 70000 + b"b" * 5 + b"c" * 100000


async def test_chunked_and_large_responses_stream_through(proxy: Proxy, backend: Backend) -> None:
    code, out, err = await curl(
        "-x",
        f"http://127.0.0.1:{port(proxy)}",
        "-D",
        "-",
        f"http://127.0.0.1:{backend.port}/chunked?n=5",
    )
    assert code == 0, err
    head, body = out.split(b"\r\n\r\n", 1)
    assert b"transfer-encoding: chunked" in head.lower()
    assert echo(body)["target"] == "/chunked?n=5"
    # The backend declared x-hop hop-by-hop via Connection: it must not reach the client.
    assert b"x-hop" not in head.lower()
    n = 8 * 1024 * 1024
    code, out, err = await curl(
        "-x", f"http://127.0.0.1:{port(proxy)}", f"http://127.0.0.1:{backend.port}/big?n={n}"
    )
    assert code == 0, err
    assert out == b"x" * n


async def test_close_delimited_response_is_rechunked(proxy: Proxy, backend: Backend) -> None:
    conn = await Conn.open(port(proxy))
    await conn.send(request("GET", "/close-delimited", f"127.0.0.1:{backend.port}"))
    resp = await conn.response()
    assert resp.getheader("transfer-encoding") == "chunked"
    assert echo(resp.body)["target"] == "/close-delimited"  # type: ignore[attr-defined]
    # The client connection survives the upstream's close.
    await conn.send(request("GET", "/after", f"127.0.0.1:{backend.port}"))
    assert echo((await conn.response()).body)["target"] == "/after"  # type: ignore[attr-defined]
    conn.close()


# ---------------------------------------------------------------- responses without bodies


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("HEAD", "/head", 200), ("GET", "/status/204", 204), ("GET", "/status/304", 304)],
)
async def test_bodiless_responses_keep_the_connection_usable(
    proxy: Proxy, backend: Backend, method: str, path: str, status: int
) -> None:
    host = f"127.0.0.1:{backend.port}"
    conn = await Conn.open(port(proxy))
    await conn.send(request(method, path, host))
    resp = await conn.response(method)
    assert resp.status == status
    assert resp.body == b""  # type: ignore[attr-defined]
    if method == "HEAD":
        assert int(resp.getheader("content-length")) > 0  # what GET would have sent
    await conn.send(request("GET", "/next", host))
    nxt = await conn.response()
    assert echo(nxt.body)["target"] == "/next"  # type: ignore[attr-defined]
    conn.close()
    assert backend.connections == 1


async def test_interim_responses_pass_through(proxy: Proxy, backend: Backend) -> None:
    conn = await Conn.open(port(proxy))
    await conn.send(request("GET", "/hints", f"127.0.0.1:{backend.port}"))
    early = await conn.response()
    assert early.status == 103 and early.getheader("link") == "</a.css>; rel=preload"
    final = await conn.response()
    assert final.status == 200
    conn.close()


async def test_expect_100_continue(proxy: Proxy, backend: Backend) -> None:
    host = f"127.0.0.1:{backend.port}"
    conn = await Conn.open(port(proxy))
    await conn.send(
        request("POST", "/upload", host, {"Expect": "100-continue", "Content-Length": "5"})
    )
    cont = await conn.response()
    assert cont.status == 100
    assert backend.requests == []  # the body is not there yet
    await conn.send(b"hello")
    final = await conn.response("POST")
    assert final.status == 200 and echo(final.body)["body_len"] == 5  # type: ignore[attr-defined]
    conn.close()
    # curl waits for the 100 the same way.
    code, out, err = await curl(
        "-x",
        f"http://127.0.0.1:{port(proxy)}",
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        "x" * 2000,
        f"http://{host}/curl",
    )
    assert code == 0, err
    assert echo(out)["body_len"] == 2000


async def test_expectation_refused_sends_no_body_upstream(proxy: Proxy, backend: Backend) -> None:
    conn = await Conn.open(port(proxy))
    await conn.send(
        request(
            "POST",
            "/refuse",
            f"127.0.0.1:{backend.port}",
            {"Expect": "100-continue", "Content-Length": "5"},
        )
    )
    resp = await conn.response("POST")
    assert resp.status == 417
    assert resp.getheader("connection") == "close"  # the unsent body would desync the stream
    assert await conn.closed()
    conn.close()


# ---------------------------------------------------------------- hop-by-hop


@pytest.mark.parametrize("side", ["outbound", "inbound"])
async def test_connection_naming_host_keeps_the_host(
    proxy: Proxy, backend: Backend, side: str
) -> None:
    """Host names the upstream and HTTP/1.1 requires it: ``Connection: host`` cannot drop it."""
    host = f"127.0.0.1:{backend.port}"
    conn = await Conn.open(port(proxy, side))
    await conn.send(request("GET", "/h", host, {"Connection": "host, X-Trace", "X-Trace": "t"}))
    resp = await conn.response()
    conn.close()
    assert resp.status == 200
    seen = backend.requests[-1]
    assert seen.header("host") == [host]
    assert seen.header("x-trace") == []


async def test_hop_by_hop_headers_are_removed(proxy: Proxy, backend: Backend) -> None:
    headers = {
        "Connection": "keep-alive, X-Trace",
        "X-Trace": "secret-hop",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "Proxy-Connection": "keep-alive",
        "TE": "trailers",
        "X-Kept": "yes",
    }
    conn = await Conn.open(port(proxy))
    await conn.send(request("GET", "/hop", f"127.0.0.1:{backend.port}", headers))
    resp = await conn.response()
    conn.close()
    names = {n.lower() for n, _ in backend.requests[-1].headers}
    for gone in (
        "connection",
        "x-trace",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
    ):
        assert gone not in names
    assert backend.requests[-1].header("x-kept") == ["yes"]
    # The backend's "keep-alive: timeout=5" response header is hop-by-hop too.
    assert resp.getheader("keep-alive") is None
    assert resp.getheader("content-type") == "application/json"


# ---------------------------------------------------------------- access log


async def test_access_log_follows_the_level_set_at_run_time(
    proxy: Proxy, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    """Access lines appear once ``sidecar.access`` is at DEBUG, without a restart."""
    host = f"127.0.0.1:{backend.port}"
    conn = await Conn.open(port(proxy))
    await conn.send(request("GET", "/quiet", host))
    assert (await conn.response()).status == 200
    assert not [r for r in caplog.records if r.name == "sidecar.access"]
    caplog.set_level(logging.DEBUG, logger="sidecar.access")
    lines: list[str] = []
    for _ in range(40):  # the sweeper looks again within half a second here
        await conn.send(request("GET", "/loud", host))
        assert (await conn.response()).status == 200
        lines = [r.getMessage() for r in caplog.records if r.name == "sidecar.access"]
        if lines:
            break
        await asyncio.sleep(0.05)
    conn.close()
    assert lines, "no access line within two seconds"
    assert lines[0].startswith("outbound ")
    assert f"GET /loud {host} color=stable -> 200" in lines[0]
