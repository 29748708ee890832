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

import asyncio
import logging
import re
import socket
from typing import TYPE_CHECKING, Any

from sidecar.proxy.http1.downstream import Downstream
from sidecar.proxy.opaque import Opaque

if TYPE_CHECKING:
    from sidecar.policy import Timeouts
    from sidecar.proxy.http1.downstream import Shared

Endpoint = tuple[str, int]
log = logging.getLogger(__name__)

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


# ------------------------------------------------------------------ the front door


class Door:
    """What the front doors of one proxy share: where each protocol is handed."""

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.ctx = shared.ctx
        self.loop = shared.loop
        self.counts = {d: shared.ctx.metrics.direction(d) for d in ("outbound", "inbound")}
        self.h2: Any = None  # the HTTP/2 side, made on the first HTTP/2 connection
        self._h2_missing = False

    def h2_side(self) -> Any:
        """``sidecar.proxy.http2.H2Side``, created on first use; None while it does not exist."""
        if self.h2 is None and not self._h2_missing:
            try:
                from sidecar.proxy.http2 import H2Side

                self.h2 = H2Side(self.ctx, self.loop)
                self.h2.loops_back = self.shared.loops_back  # the outbound listener's own check
            except ImportError:
                self._h2_missing = True
            except Exception:  # a binding that cannot load: HTTP/2 flows go on as opaque
                log.exception("the HTTP/2 side cannot be made; HTTP/2 is relayed as opaque")
                self._h2_missing = True
        return self.h2

    def protocol(self, proto: str, direction: str, dst: Endpoint | None) -> asyncio.Protocol:
        """The protocol that serves a connection from now on (``proto`` may fall back)."""
        if proto == HTTP2:
            side = self.h2_side()
            if side is not None:
                self.counts[direction].connections[HTTP2] += 1
                return side.protocol(direction, dst)
            # No HTTP/2 path yet: a captured flow is relayed as it is; a plain one gets
            # the HTTP/1 path's answer to a request it cannot serve (505).
            proto = OPAQUE if dst is not None else HTTP1
        self.counts[direction].connections[proto] += 1
        if proto == OPAQUE:
            return Opaque(self.shared, direction, dst)  # type: ignore[arg-type]
        down = Downstream(self.shared, direction)
        down.dst = dst
        return down


class FrontDoor(asyncio.Protocol):
    """An accepted connection until its protocol is known (usually its first read).

    It sits in the proxy's connection set, so the sweeper times it out (a captured
    connection silent for ``capture.detect_timeout`` is relayed opaque; a plain one
    silent for ``timeouts.header_read`` is closed, as the HTTP/1 path would) and a
    drain closes it, with no timer of its own.
    """

    __slots__ = ("buf", "direction", "door", "dst", "since", "transport")

    queue = ()  # what ``Proxy.drain`` looks at: nothing in flight
    tunnel = None

    def __init__(self, door: Door, direction: str) -> None:
        self.door = door
        self.direction = direction
        self.transport: asyncio.Transport | None = None
        self.dst: Endpoint | None = None
        self.buf = b""
        self.since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        door = self.door
        capture = door.ctx.capture
        if capture is not None:
            sock = transport.get_extra_info("socket")
            dst = self.dst = original_destination(sock) if sock is not None else None
            if dst is not None and dst[1] in capture.opaque_ports:
                self._hand(OPAQUE, b"")  # server-first: the client waits for the server
                return
        if door.shared.draining:
            transport.close()
            return
        self.since = door.loop.time()
        door.shared.conns.add(self)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        proto = detect(buf) if self.dst is not None else detect_plain(buf)
        if proto is None:
            self.buf = buf
            return
        self._hand(proto, buf)

    def eof_received(self) -> bool | None:
        """The client stopped sending before its protocol was clear: decide on what came."""
        proto = OPAQUE if self.dst is not None else HTTP1
        protocol = self._hand(proto, self.buf)
        return protocol.eof_received() if protocol is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.door.shared.conns.discard(self)  # type: ignore[arg-type]

    def _hand(self, proto: str, first: bytes) -> asyncio.Protocol | None:
        transport = self.transport
        door = self.door
        door.shared.conns.discard(self)  # type: ignore[arg-type]
        self.buf = b""
        if transport is None or transport.is_closing():
            return None
        protocol = door.protocol(proto, self.direction, self.dst)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if first:
            protocol.data_received(first)
        return protocol

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def sweep(self, now: float, timeouts: Timeouts) -> None:
        capture = self.door.ctx.capture
        if self.dst is not None and capture is not None:
            if now - self.since > capture.detect_timeout:
                self._hand(OPAQUE, self.buf)  # silence, or bytes that never became HTTP
        elif now - self.since > timeouts.header_read:
            if self.buf:
                self._hand(HTTP1, self.buf)  # the HTTP/1 path answers what it has
            else:
                self._close()
