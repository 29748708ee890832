"""The pure exchange decisions: targets, hop-by-hop headers, framing, error answers."""

from __future__ import annotations

from http.client import HTTPResponse

import pytest

from sidecar.errors import DownstreamProtocolError
from sidecar.proxy.http1.exchange import (
    HOP_BY_HOP,
    chunk,
    connect_target,
    connection_tokens,
    drop_headers,
    error_response,
    extra_hop_headers,
    has_content_length,
    inbound_target,
    is_chunked,
    outbound_target,
    parse_authority,
    response_fields,
    split_absolute,
)
from tests.proto.conftest import _Sock


@pytest.mark.parametrize(
    ("authority", "default", "expected"),
    [
        (b"example.com", 80, ("example.com", 80)),
        (b"example.com:8080", 80, ("example.com", 8080)),
        (b"10.0.0.1:1", 80, ("10.0.0.1", 1)),
        (b"[::1]:8443", 80, ("::1", 8443)),
        (b"[fd00::2]", 80, ("fd00::2", 80)),
        (b"svc.ns.svc.cluster.local:", 80, ("svc.ns.svc.cluster.local", 80)),
    ],
)
def test_parse_authority(authority: bytes, default: int, expected: tuple[str, int]) -> None:
    assert parse_authority(authority, default) == expected


@pytest.mark.parametrize(
    "authority",
    [
        b"",
        b":80",
        b"host:0",
        b"host:65536",
        b"host:8x",
        b"user@host:80",
        b"[::1",
        b"[::1]x",
        b"a:b:c",
        b"h\xffst:80",
        b"host/path",
    ],
)
def test_parse_authority_rejects(authority: bytes) -> None:
    with pytest.raises(DownstreamProtocolError) as exc:
        parse_authority(authority, 80)
    assert exc.value.status_hint == 400


def test_connect_needs_a_port() -> None:
    assert connect_target(b"db.internal:5432") == ("db.internal", 5432)
    with pytest.raises(DownstreamProtocolError):
        connect_target(b"db.internal")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (b"http://a.b/x?y=1", (b"a.b", b"/x?y=1")),
        (b"http://a.b:81", (b"a.b:81", b"/")),
        (b"http://a.b?q", (b"a.b", b"/?q")),
        (b"HTTP://a.b/p#frag", (b"a.b", b"/p")),
        (b"/x", None),
        (b"*", None),
    ],
)
def test_split_absolute(url: bytes, expected: tuple[bytes, bytes] | None) -> None:
    assert split_absolute(url) == expected


def test_absolute_form_becomes_origin_form_with_its_host() -> None:
    assert outbound_target(b"GET", b"http://api:8080/v1?a=b", b"ignored") == (
        "api",
        8080,
        b"/v1?a=b",
        b"api:8080",
    )


def test_origin_form_takes_the_upstream_from_host() -> None:
    assert outbound_target(b"GET", b"/v1", b"api:9000") == ("api", 9000, b"/v1", None)
    assert outbound_target(b"OPTIONS", b"*", b"api") == ("api", 80, b"*", None)


@pytest.mark.parametrize(
    ("url", "host"),
    [(b"/v1", None), (b"https://api/x", b"api"), (b"ftp://x/y", None), (b"v1", b"api")],
)
def test_outbound_target_rejects(url: bytes, host: bytes | None) -> None:
    with pytest.raises(DownstreamProtocolError):
        outbound_target(b"GET", url, host)


def test_inbound_target_keeps_origin_form() -> None:
    assert inbound_target(b"GET", b"/a?b") == (b"/a?b", None)
    assert inbound_target(b"GET", b"http://x:1/a") == (b"/a", b"x:1")
    with pytest.raises(DownstreamProtocolError):
        inbound_target(b"GET", b"nonsense")


@pytest.mark.parametrize(
    "url", [b"http://user:pw@good.example/p", b"http:///p", b"http://[::1/p", b"http://h:99999/p"]
)
def test_inbound_absolute_form_authority_is_checked_like_outbound(url: bytes) -> None:
    """The authority becomes the app's Host: what the outbound side refuses, so does this."""
    for target in (lambda: inbound_target(b"GET", url), lambda: outbound_target(b"GET", url, None)):
        with pytest.raises(DownstreamProtocolError) as exc:
            target()
        assert exc.value.status_hint == 400


def test_options_with_an_empty_path_asks_about_the_server() -> None:
    """RFC 9112 section 3.2.4: the last proxy sends ``OPTIONS *`` for an empty path."""
    assert outbound_target(b"OPTIONS", b"http://h:81", None) == ("h", 81, b"*", b"h:81")
    assert inbound_target(b"OPTIONS", b"http://h:81") == (b"*", b"h:81")
    assert outbound_target(b"OPTIONS", b"http://h:81/", None)[2] == b"/"
    assert outbound_target(b"OPTIONS", b"http://h:81?q", None)[2] == b"/?q"
    assert outbound_target(b"GET", b"http://h:81", None)[2] == b"/"


def test_hop_by_hop_set_and_connection_tokens() -> None:
    for name in (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    ):
        assert name in HOP_BY_HOP
    assert b"host" not in HOP_BY_HOP and b"content-length" not in HOP_BY_HOP
    tokens = connection_tokens(b"Keep-Alive, X-Trace ,close,,Upgrade")
    assert tokens == {b"keep-alive", b"x-trace", b"close", b"upgrade"}
    assert extra_hop_headers(tokens) == {b"x-trace"}
    # never the framing, nor the Host that names the upstream
    assert extra_hop_headers({b"content-length", b"transfer-encoding", b"host"}) == frozenset()


def test_drop_headers_keeps_order_of_the_rest() -> None:
    pieces = [b"LINE\r\n"]
    for name, value in ((b"A", b"1"), (b"X-Trace", b"t"), (b"B", b"2")):
        pieces += [name, b": ", value, b"\r\n"]
    assert b"".join(drop_headers(pieces, frozenset({b"x-trace"}))) == b"LINE\r\nA: 1\r\nB: 2\r\n"


def test_response_fields_forward_end_to_end_lines_in_order() -> None:
    nginx = (
        b"\r\nServer: nginx\r\nContent-Type: text/plain\r\nContent-Length: 100"
        b'\r\nConnection: keep-alive\r\nETag: "1-64"\r\n'
    )
    lines, te, upgrade = response_fields(nginx)
    assert lines == (
        b'\r\nServer: nginx\r\nContent-Type: text/plain\r\nContent-Length: 100\r\nETag: "1-64"\r\n'
    )
    assert (te, upgrade) == (None, None)
    assert has_content_length(lines)
    assert response_fields(b"\r\n") == (b"\r\n", None, None)  # a status line alone


def test_response_fields_drop_hop_by_hop_in_any_spelling() -> None:
    block = (
        b"\r\nKEEP-ALIVE: timeout=5\r\nA: 1\r\nproxy-connection: keep-alive"
        b"\r\nTe: trailers\r\nTrailer: x-sum\r\nProxy-Status: cache; hit\r\nupgrade: h2c "
        b"\r\nProxy-Authenticate: Basic\r\nX-Note: connection: close\r\nconnection: Upgrade\r\n"
    )
    lines, te, upgrade = response_fields(block)
    # Proxy-Status (RFC 9209) is end to end; a value that reads like a header stays a value.
    assert lines == b"\r\nA: 1\r\nProxy-Status: cache; hit\r\nX-Note: connection: close\r\n"
    assert (te, upgrade) == (None, b"h2c")
    assert not has_content_length(lines)


def test_response_fields_drop_what_connection_names_but_never_the_framing() -> None:
    block = (
        b"\r\nConnection: close, X-Trace, content-length\r\nx-trace: t\r\nB: 2"
        b"\r\ncontent-length: 2\r\nConnection: x-other\r\nX-Other: o\r\n"
    )
    lines, te, _ = response_fields(block)
    assert lines == b"\r\nB: 2\r\ncontent-length: 2\r\n"
    assert te is None and has_content_length(lines)


def test_response_fields_join_transfer_codings_and_take_them_out() -> None:
    block = b"\r\nTransfer-Encoding: gzip\r\nA: 1\r\ntransfer-encoding: chunked  \r\n"
    lines, te, _ = response_fields(block)
    assert lines == b"\r\nA: 1\r\n"
    assert te == b"gzip, chunked" and is_chunked(te)


@pytest.mark.parametrize(
    ("value", "chunked"),
    [(b"chunked", True), (b"gzip, Chunked", True), (b"gzip", False), (b"chunked, gzip", False)],
)
def test_is_chunked(value: bytes, chunked: bool) -> None:
    assert is_chunked(value) is chunked


def test_chunk_framing() -> None:
    assert b"".join(chunk(b"x" * 26)) == b"1a\r\n" + b"x" * 26 + b"\r\n"


@pytest.mark.parametrize("status", [400, 414, 431, 502, 504])
def test_error_response_is_valid_http(status: int) -> None:
    raw = error_response(status, "upstream 10.0.0.1:80 refused the connection")
    resp = HTTPResponse(_Sock(raw))  # type: ignore[arg-type]
    resp.begin()
    assert resp.status == status
    assert resp.getheader("connection") == "close"
    body = resp.read()
    assert body == b"upstream 10.0.0.1:80 refused the connection\n"
    assert resp.getheader("content-length") == str(len(body))
