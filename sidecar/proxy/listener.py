"""The proxy's front door: accept, recover the original destination, detect the protocol.

Every accepted connection starts as a ``FrontDoor``. A connection the capture
rules redirected (nftables ``redirect``, see ``sidecar.datapath.capture``) has
an original destination (``SO_ORIGINAL_DST`` / ``IP6T_SO_ORIGINAL_DST``) other
than the listener's own address; its first bytes decide where it goes
(``detect``): an HTTP/1 request line to the HTTP/1 path with that destination
as the upstream, the HTTP/2 preface to the HTTP/2 path, anything else (or
silence for ``capture.detect_timeout``) to the opaque relay. Destination ports
listed as opaque (server-first protocols) skip detection. A connection that
was not redirected keeps the behaviour of a plain proxy port: HTTP/1 (the
HTTP_PROXY mode), or HTTP/2 when it opens with the preface.

The hand-off is asyncio's protocol switch: ``transport.set_protocol(p);
p.connection_made(transport); p.data_received(first_bytes)``.
"""

from __future__ import annotations

import re
import socket

HTTP1, HTTP2, OPAQUE = "http1", "http2", "opaque"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MAX_SNIFF = 8192  # a request line longer than this is not waited for (as MAX_REQUEST_LINE)

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h, at SOL_IP
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h, at SOL_IPV6
_SOCKADDR_IN = 16
_SOCKADDR_IN6 = 28

_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
# A whole HTTP/1 request line: method SP request-target SP HTTP/1.x CRLF (RFC 9112 3).
_REQUEST_LINE = re.compile(_TOKEN + rb"{1,32} [\x21-\x7e\x80-\xff]+ HTTP/1\.[01]\r?\n")
# What can still grow into one: a method, then a target, then a version being written
# (loosely: the whole line is checked once it ends).
_PARTIAL_LINE = re.compile(_TOKEN + rb"{1,32}(?: [\x21-\x7e\x80-\xff]*(?: [HTP/.01\r]{0,9})?)?\Z")


def detect(first: bytes) -> str | None:
    """The protocol a captured connection speaks, from its first bytes; None: need more. Pure.

    Decided as early as the bytes allow, so a binary protocol goes to the relay
    after its first read and an HTTP request needs only its request line.
    """
    n = len(first)
    if n < 24 and PREFACE.startswith(first):
        return None
    if first.startswith(PREFACE):
        return HTTP2
    eol = first.find(b"\n", 0, MAX_SNIFF)
    if eol < 0:
        if n < MAX_SNIFF and _PARTIAL_LINE.match(first):
            return None
        return OPAQUE
    return HTTP1 if _REQUEST_LINE.match(first, 0, eol + 1) else OPAQUE


def detect_plain(first: bytes) -> str | None:
    """The protocol on a connection that was not redirected (a plain proxy port). Pure.

    Clients that dial the proxy speak HTTP: HTTP/2 with prior knowledge starts
    with the preface, everything else goes to the HTTP/1 path, which answers
    what it cannot parse with a 4xx as it always has.
    """
    n = len(first)
    if n < 24:
        return None if PREFACE.startswith(first) else HTTP1
    return HTTP2 if first.startswith(PREFACE) else HTTP1


def parse_sockaddr(raw: bytes, family: int) -> tuple[str, int]:
    """``struct sockaddr_in`` / ``sockaddr_in6`` bytes -> (ip, port). Pure."""
    port = int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    return socket.inet_ntop(socket.AF_INET, raw[4:8]), port


def _unmapped(ip: str) -> str:
    return ip[7:] if ip[:7].lower() == "::ffff:" and "." in ip else ip


def original_destination(sock: socket.socket) -> tuple[str, int] | None:
    """Where the client meant to connect, when capture redirected it here; else None.

    Conntrack answers for any tracked connection, redirected or not: one whose
    original destination is the listener's own address was not redirected.
    """
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6)
        else:
            raw = sock.getsockopt(socket.IPPROTO_IP, SO_ORIGINAL_DST, _SOCKADDR_IN)
        local = sock.getsockname()
    except OSError:  # ENOENT: not tracked (no nat table here), so not redirected
        return None
    ip, port = parse_sockaddr(raw, sock.family)
    if port == local[1] and _unmapped(ip) == _unmapped(local[0]):
        return None
    return ip, port
