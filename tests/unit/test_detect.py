"""The front door's decisions as plain functions: which path a connection's first bytes take."""

from __future__ import annotations

import socket
import struct

import pytest

from sidecar.proxy.listener import (
    HTTP1,
    HTTP2,
    OPAQUE,
    PREFACE,
    detect,
    detect_plain,
    parse_sockaddr,
)


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", HTTP1),
        (b"POST /api/v1/x?y=1 HTTP/1.0\r\n", HTTP1),
        (b"OPTIONS * HTTP/1.1\n", HTTP1),
        (b"PROPFIND /dav HTTP/1.1\r\n", HTTP1),  # any token is a method
        (PREFACE, HTTP2),
        (PREFACE + b"\x00\x00\x12\x04", HTTP2),
        # incomplete, but may still become HTTP: wait for more
        (b"G", None),
        (b"GET", None),
        (b"GET /index.html", None),
        (b"GET / HTTP/1.", None),
        (b"PRI * HTTP/2", None),
        (b"P", None),
        # binary or other text protocols: relayed as they are
        (b"\x16\x03\x01\x02\x00\x01\x00", OPAQUE),  # TLS ClientHello
        (b"*1\r\n$4\r\nPING\r\n", OPAQUE),  # Redis RESP
        (b"SSH-2.0-OpenSSH_9.2\r\n", OPAQUE),
        (b"hello\n", OPAQUE),
        (b"GET /\r\n", OPAQUE),  # HTTP/0.9
        (b"GET / HTTP/2.0\r\n", OPAQUE),
        (b"GET / HTTP/1.1 extra\r\n", OPAQUE),
        (b"\x00", OPAQUE),
        (b"GET /" + b"a" * 9000, OPAQUE),  # no end of line in sight
    ],
)
def test_detect(first, expected):
    assert detect(first) == expected


def test_detect_decides_on_a_prefix_consistently():
    """Bytes fed one at a time never flip a decision once made."""
    line = b"DELETE /x HTTP/1.1\r\n"
    seen = [detect(line[: i + 1]) for i in range(len(line))]
    assert seen[-1] == HTTP1 and set(seen[:-1]) == {None}
    seen = [detect(PREFACE[: i + 1]) for i in range(len(PREFACE))]
    assert seen[-1] == HTTP2 and set(seen[:-1]) == {None}


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        (b"GET http://a/ HTTP/1.1\r\n", HTTP1),
        (b"\x16\x03\x01", HTTP1),  # the HTTP path answers what it cannot parse with a 400
        (b"PRI * HTTP/2.0\r\n", None),
        (PREFACE, HTTP2),
    ],
)
def test_detect_plain(first, expected):
    assert detect_plain(first) == expected


def test_parse_sockaddr_both_families():
    v4 = struct.pack("!HH4s8x", socket.AF_INET, 8080, socket.inet_aton("198.18.100.10"))
    assert parse_sockaddr(v4, socket.AF_INET) == ("198.18.100.10", 8080)
    v6 = struct.pack(
        "!HHI16sI", socket.AF_INET6, 443, 0, socket.inet_pton(socket.AF_INET6, "fd00:96::10"), 0
    )
    assert parse_sockaddr(v6, socket.AF_INET6) == ("fd00:96::10", 443)
