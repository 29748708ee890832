"""Per-request decisions of the proxy, as pure functions over bytes: no sockets, no loop.

Everything here is what a reviewer wants to check against RFC 9110/9112 without
reading asyncio code: which headers are hop-by-hop, how a request target names
its upstream (absolute-form, origin-form plus ``Host``, CONNECT's authority),
how bodies are framed on the way out, and what the error answers look like.
The protocol modules call these on the hot path, so they take and return bytes
and small tuples, never objects built per call.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from sidecar.errors import DownstreamProtocolError

# Limits of the request head (issue 2): a longer request target is answered 414,
# a bigger header block 431, and either closes the connection.
MAX_REQUEST_LINE = 8 * 1024
MAX_HEADER_BYTES = 64 * 1024

# RFC 9110 section 7.6.1 plus the de-facto ones (Keep-Alive, Proxy-Connection) and the
# proxy's own credentials. Transfer-Encoding is also hop-by-hop, but the proxy keeps
# the same framing it received, so the protocol modules handle it apart.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)

# RFC 9110 section 9.2.2: only these may be sent twice, so only these are retried
# when a pooled connection turns out to be closed by the upstream.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

# Tokens of a Connection header that never name a header to drop: the connection options,
# the framing fields and Host. The proxy forwards a body with the framing it arrived with,
# so dropping Content-Length or Transfer-Encoding because a peer named it would turn the
# body into the start of another message on the next hop (request smuggling past the
# coloring); and Host names the upstream and is required in HTTP/1.1 (RFC 9112 section 3.2),
# so ``Connection: host`` cannot make it hop-by-hop.
_CONNECTION_OPTIONS = frozenset(
    {b"close", b"keep-alive", b"upgrade", b"content-length", b"transfer-encoding", b"host"}
)

REASONS = {
    200: "OK",
    400: "Bad Request",
    405: "Method Not Allowed",
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    499: "Client Closed Request",
    502: "Bad Gateway",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
    508: "Loop Detected",
}

# A character a host name (RFC 3986 reg-name) or an IPv4 address cannot contain.
_NOT_IN_REG_NAME = re.compile(r"[^A-Za-z0-9\-._~%!$&'()*+,;=]")

CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"


def connection_tokens(value: bytes) -> frozenset[bytes]:
    """Lower-case tokens of one ``Connection`` header value."""
    return frozenset(t.strip().lower() for t in value.split(b",") if t.strip())


def extra_hop_headers(tokens: Iterable[bytes]) -> frozenset[bytes]:
    """Header names a ``Connection`` header declared hop-by-hop (besides the usual options).

    Content-Length, Transfer-Encoding and Host are never among them: see
    ``_CONNECTION_OPTIONS``.
    """
    return frozenset(t for t in tokens if t not in _CONNECTION_OPTIONS)


def is_chunked(transfer_encoding: bytes) -> bool:
    """Whether a Transfer-Encoding value ends in ``chunked`` (the only framing coding)."""
    return transfer_encoding.rsplit(b",", 1)[-1].strip().lower() == b"chunked"


def chunk(data: bytes) -> tuple[bytes, bytes, bytes]:
    """One chunk of a chunked body, as pieces to hand to a single write."""
    return (b"%x\r\n" % len(data), data, b"\r\n")


# Response header lines the proxy acts on, each found by the CRLF that ends the line before
# it. Only run over heads llhttp has accepted: CRLF line ends, no whitespace before a colon,
# no folded lines and no lone CR, so these see the fields exactly as the parser did.
_RESPONSE_FIELD = re.compile(
    rb"\r\n(%s):[ \t]*([^\r]*)" % b"|".join(sorted(HOP_BY_HOP | {b"transfer-encoding"})),
    re.IGNORECASE,
)
# A cheaper first look, over the lower-cased lines, that finds every line
# ``_RESPONSE_FIELD`` would (and a few more, such as Proxy-Status): where it finds none,
# ``response_fields`` would give the lines back unchanged, so the hot path calls this
# instead (a C call, where ``response_fields`` is a Python one).
may_have_response_field = re.compile(
    rb"\r\n(?:connection|keep-alive|proxy-|t(?:e|railer|ransfer-encoding)|upgrade):"
).search
# How most HTTP/1.1 servers (nginx among them) end a keep-alive response head: the hot
# path cuts this line off (``lines[:KEEP_ALIVE_CUT]`` keeps the CRLF before it) first.
KEEP_ALIVE_LAST = b"\r\nConnection: keep-alive\r\n"
KEEP_ALIVE_CUT = 2 - len(KEEP_ALIVE_LAST)
_CONNECTION_PLAIN = frozenset({b"keep-alive", b"close"})
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:", re.IGNORECASE)


def response_fields(block: bytes) -> tuple[bytes, bytes | None, bytes | None]:
    """Split a response's header lines into those forwarded and those that frame it.

    ``block`` runs from the status line's CRLF to the CRLF of the last header line, so
    every line starts with CRLF and the block ends with one; the forwarded lines come
    back in the same form. Returns (forwarded lines, Transfer-Encoding, Upgrade).
    Hop-by-hop fields, those a ``Connection`` header names, and Transfer-Encoding (the
    caller restates the framing it uses) are left out.

    Works on the whole block at once, not a Python call per header. Most heads hold
    no such field once a trailing ``KEEP_ALIVE_LAST`` is cut, and the hot path skips
    this call for them (``may_have_response_field``).
    """
    parts = _RESPONSE_FIELD.split(block)
    if len(parts) == 1:
        return block, None, None
    kept = [parts[0]]
    te: bytes | None = None
    upgrade: bytes | None = None
    extra: frozenset[bytes] | None = None
    for i in range(1, len(parts), 3):
        lname = parts[i].lower()
        value = parts[i + 1].rstrip(b" \t")
        if lname == b"transfer-encoding":
            te = value if te is None else b"%s, %s" % (te, value)
        elif lname == b"upgrade":
            upgrade = value
        elif lname == b"connection" and value.lower() not in _CONNECTION_PLAIN:
            named = extra_hop_headers(connection_tokens(value))
            if named:
                extra = named if extra is None else extra | named
        kept.append(parts[i + 2])
    lines = b"".join(kept)
    if extra:
        lines = b"".join(
            b"\r\n" + line
            for line in lines.split(b"\r\n")[1:]
            if line.partition(b":")[0].lower() not in extra
        )
    return lines, te, upgrade


def has_content_length(lines: bytes) -> bool:
    """Whether header lines in ``response_fields``' form carry a Content-Length."""
    return _CONTENT_LENGTH.search(lines) is not None


def drop_headers(pieces: list[bytes], names: frozenset[bytes], start: int = 1) -> list[bytes]:
    """Remove the named headers from a head kept as ``[name, b": ", value, b"\\r\\n", ...]``.

    Rare path: only when a ``Connection`` header names extra hop-by-hop headers.
    ``pieces[:start]`` (the request or status line slot) is kept as is.
    """
    out = pieces[:start]
    for i in range(start, len(pieces) - 3, 4):
        if pieces[i].lower() not in names:
            out.extend(pieces[i : i + 4])
    return out


# ---------------------------------------------------------------- request targets


def parse_authority(authority: bytes, default_port: int | None) -> tuple[str, int]:
    """``host[:port]`` or ``[v6]:port`` -> (host, port). Raises a 400 on anything else."""
    if not authority or b"@" in authority or b"/" in authority:
        raise DownstreamProtocolError(f"invalid authority {authority[:100]!r}")
    try:
        text = authority.decode("ascii")
    except UnicodeDecodeError:
        raise DownstreamProtocolError("non-ASCII authority") from None
    port_text: str | None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise DownstreamProtocolError(f"invalid IPv6 authority {text[:100]!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            raise DownstreamProtocolError(f"invalid IPv6 authority {text[:100]!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise DownstreamProtocolError(f"invalid IPv6 authority {text[:100]!r}") from None
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text = text.partition(":")
        if not colon:
            port_text = None
        elif ":" in port_text:
            raise DownstreamProtocolError(f"invalid authority {text[:100]!r}")
        if _NOT_IN_REG_NAME.search(host):  # whitespace, braces...: not a name to resolve
            raise DownstreamProtocolError(f"invalid host in authority {text[:100]!r}")
    if not host:
        raise DownstreamProtocolError(f"authority without a host: {text[:100]!r}")
    if port_text is None or port_text == "":
        if default_port is None:
            raise DownstreamProtocolError(f"authority without a port: {text[:100]!r}")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise DownstreamProtocolError(f"invalid port in authority {text[:100]!r}")
    return host, int(port_text)


def split_absolute(url: bytes, method: bytes = b"GET") -> tuple[bytes, bytes] | None:
    """``http://authority/path?q`` -> (authority, origin-form target); None if not absolute.

    Only ``http`` is proxied in absolute-form; an app asking for ``https://...`` this
    way is misconfigured (HTTPS through a proxy is CONNECT), so that is a 400. An empty
    path becomes ``/``, except for OPTIONS, whose empty path asks about the server as a
    whole and goes on as ``*`` (RFC 9112 section 3.2.4, the last proxy's duty).
    """
    if url[:1] == b"/" or url == b"*":
        return None
    scheme, sep, rest = url.partition(b"://")
    if not sep:
        return None
    if scheme.lower() != b"http":
        raise DownstreamProtocolError(f"unsupported scheme {scheme[:20]!r} in request target")
    cut = len(rest)
    for delim in (b"/", b"?", b"#"):
        at = rest.find(delim)
        if 0 <= at < cut:
            cut = at
    authority, tail = rest[:cut], rest[cut:]
    hash_at = tail.find(b"#")
    if hash_at >= 0:
        tail = tail[:hash_at]
    if not tail:
        tail = b"*" if method == b"OPTIONS" else b"/"
    elif tail[:1] == b"?":
        tail = b"/" + tail
    return authority, tail


def outbound_target(
    method: bytes, url: bytes, host: bytes | None
) -> tuple[str, int, bytes, bytes | None]:
    """Where an app's request goes: (host, port, origin-form target, new Host value or None).

    Absolute-form (apps using ``HTTP_PROXY``) names the upstream in the target and the
    forwarded request is rewritten to origin-form with ``Host`` set from it (RFC 9112
    section 3.2.2); origin-form takes the upstream from the ``Host`` header.
    """
    absolute = split_absolute(url, method)
    if absolute is not None:
        authority, path = absolute
        h, p = parse_authority(authority, 80)
        return h, p, path, authority
    if url[:1] != b"/" and not (url == b"*" and method == b"OPTIONS"):
        raise DownstreamProtocolError(f"invalid request target {url[:100]!r}")
    if not host:
        raise DownstreamProtocolError("origin-form request without a Host header")
    h, p = parse_authority(host.strip(), 80)
    return h, p, url, None


def inbound_target(method: bytes, url: bytes) -> tuple[bytes, bytes | None]:
    """The app's request target: (origin-form target, new Host value or None).

    An absolute-form authority becomes the app's Host, so it is held to the same
    rules as on the outbound side (no userinfo, a host, a valid port): the app must
    never see a Host the proxy would have refused from its own pod.
    """
    absolute = split_absolute(url, method)
    if absolute is not None:
        parse_authority(absolute[0], 80)
        return absolute[1], absolute[0]
    if url[:1] != b"/" and url != b"*":
        raise DownstreamProtocolError(f"invalid request target {url[:100]!r}")
    return url, None


def connect_target(url: bytes) -> tuple[str, int]:
    """CONNECT's authority-form target: ``host:port``, the port required."""
    return parse_authority(url, None)


# ---------------------------------------------------------------- answers the proxy makes


def error_response(status: int, text: str, keep_alive: bool = False) -> bytes:
    """A short plain-text answer of the proxy's own, closing the connection by default."""
    body = (text.rstrip("\n") + "\n").encode("utf-8", "replace")
    reason = REASONS.get(status, "Error")
    conn = b"keep-alive" if keep_alive else b"close"
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, reason.encode("ascii")),
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: %s\r\n\r\n" % conn,
            body,
        )
    )


def header_line(name: bytes, value: bytes) -> bytes:
    return b"%s: %s\r\n" % (name, value)


def _status_lines() -> dict[int, bytes]:
    from http import HTTPStatus

    return {s.value: b"HTTP/1.1 %d %s" % (s.value, s.phrase.encode()) for s in HTTPStatus}


# Without their CRLF: header lines follow, each starting with one (see ``response_fields``).
# Looked up directly on the hot path; ``status_line`` for codes not in it.
STATUS_LINES = _status_lines()


def status_line(code: int) -> bytes:
    """The response's status line, without its CRLF: HTTP/1.1 (what the proxy speaks to
    clients) and the standard reason phrase, which RFC 9112 section 4 tells clients to
    ignore anyway."""
    line = STATUS_LINES.get(code)
    return line if line is not None else b"HTTP/1.1 %d " % code
