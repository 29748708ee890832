"""The pure part of HTTP/2 coloring and failures: header blocks in, decisions out."""

from __future__ import annotations

import pytest

from sidecar.coloring import Colorer
from sidecar.policy import default_policy
from sidecar.proxy.http2 import headers as h

BLOCK = b":method\0POST\0:path\0/t.T/M\0:authority\0svc:50051\0content-type\0application/grpc\0"


def test_fields_authority_and_grpc() -> None:
    f = h.fields(BLOCK + b"x-traffic-color\0canary\0")
    assert f[0] == [b":method", b":path", b":authority", b"content-type", b"x-traffic-color"]
    assert h.authority(f) == b"svc:50051"
    assert h.is_grpc(f)
    assert h.values_of(f, b"x-traffic-color") == [b"canary"]
    assert not h.is_grpc(h.fields(b":method\0GET\0content-type\0text/plain\0"))
    assert h.authority(h.fields(b":method\0GET\0host\0a:1\0")) == b"a:1"


def test_recolor_replaces_every_color_field_and_keeps_the_rest_in_order() -> None:
    block = BLOCK + b"x-traffic-color\0a\0te\0trailers\0x-traffic-color\0b\0"
    f = h.fields(block)
    out = h.rewrite(block, f, b"x-traffic-color", b"stable", None)
    assert out == BLOCK + b"te\0trailers\0x-traffic-color\0stable\0"
    assert h.rewrite(BLOCK, h.fields(BLOCK), b"x-traffic-color", b"canary", None) == (
        BLOCK + b"x-traffic-color\0canary\0"
    )


def test_rewrite_replaces_baggage_fields_and_keeps_the_color_header_when_asked() -> None:
    block = BLOCK + b"baggage\0a=1\0x-traffic-color\0canary\0baggage\0b=2\0te\0trailers\0"
    f = h.fields(block)
    joined = b"a=1,b=2,traffic-color=canary"
    out = h.rewrite(block, f, b"x-traffic-color", None, (joined,))
    assert out == BLOCK + b"x-traffic-color\0canary\0te\0trailers\0baggage\0" + joined + b"\0"
    both = h.rewrite(block, f, b"x-traffic-color", b"stable", (b"k=v",))
    assert h.fields(both) == (
        [*h.fields(BLOCK)[0], b"te", b"x-traffic-color", b"baggage"],
        [*h.fields(BLOCK)[1], b"trailers", b"stable", b"k=v"],
    )
    # Nothing to replace: the block is the same bytes.
    assert h.rewrite(block, f, b"x-traffic-color", None, None) == block


def test_coloring_a_block_follows_the_http1_rules() -> None:
    colorer = Colorer(default_policy(), "canary")
    for block, want in [
        (BLOCK, ("canary", "missing")),
        (BLOCK + b"x-traffic-color\0stable\0", ("stable", None)),
        (BLOCK + b"x-traffic-color\0purple\0", ("canary", "unknown")),
        (BLOCK + b"x-traffic-color\0no way\0", ("canary", "malformed")),
        (BLOCK + b"x-traffic-color\0stable\0x-traffic-color\0stable\0", ("canary", "repeated")),
    ]:
        assert colorer.outbound(h.values_of(h.fields(block), colorer.header)) == want


def test_captured_collects_only_the_headers_rules_read() -> None:
    f = h.fields(b"cookie\0a=1\0x-user\0u\0cookie\0b=2\0")
    assert h.captured(f, frozenset({b"cookie"})) == {b"cookie": [b"a=1", b"b=2"]}
    assert h.captured(f, frozenset()) == {}


def test_grpc_status_from_trailers_or_http() -> None:
    assert h.grpc_status(h.fields(b"grpc-status\x000\0"), 200) == "0"
    assert h.grpc_status(h.fields(b"grpc-status\x005\0grpc-message\0x\0"), 200) == "5"
    assert h.grpc_status(h.fields(b""), 200) == h.GRPC_UNKNOWN
    assert h.grpc_from_http(503) == h.GRPC_UNAVAILABLE
    assert h.grpc_from_http(404) == h.GRPC_UNIMPLEMENTED
    assert h.grpc_from_http(401) == h.GRPC_UNAUTHENTICATED
    assert h.grpc_from_http(418) == h.GRPC_UNKNOWN


def test_failures_speak_grpc_to_grpc_clients_and_http_to_the_rest() -> None:
    status, code, head, body = h.failure(h.UNAVAILABLE, grpc=True)
    f = h.fields(head)
    assert (status, code, body) == (200, "14", b"")
    assert h.status(f) == 200 and h.get(f, b"grpc-status") == b"14" and h.is_grpc(f)
    status, code, head, body = h.failure(h.TIMEOUT, grpc=True)
    assert h.get(h.fields(head), b"grpc-status") == b"4"
    status, _, head, body = h.failure(h.TIMEOUT, grpc=False)
    f = h.fields(head)
    assert status == 504 and h.status(f) == 504
    assert h.get(f, b"content-length") == str(len(body)).encode()
    assert h.failure(h.UNAVAILABLE, grpc=False)[0] == 502


def test_grpc_timeout_and_the_answer_limit_it_gives() -> None:
    def t(value: bytes) -> float | None:
        return h.grpc_timeout(h.fields(b"grpc-timeout\0" + value + b"\0"))

    assert (
        t(b"5S") == 5
        and t(b"100m") == 0.1
        and t(b"2H") == 7200
        and t(b"30u") == pytest.approx(3e-5)
    )
    assert t(b"123456789S") is None  # more than 8 digits
    assert t(b"5") is None and t(b"S") is None and t(b"5x") is None and t(b"-5S") is None
    assert h.grpc_timeout(h.fields(BLOCK)) is None

    from sidecar.proxy.http2.stream import Relay

    relay = Relay(None, 1, 0.0)  # type: ignore[arg-type]
    assert relay.answer_limit(60.0) == 60.0  # plain HTTP/2: upstream_read
    relay.grpc = True
    assert relay.answer_limit(60.0) is None  # a gRPC call without a deadline: no limit
    relay.grpc_timeout = 5.0
    assert relay.answer_limit(60.0) == 5.0
    assert relay.answer_limit(1.0) == 1.0
