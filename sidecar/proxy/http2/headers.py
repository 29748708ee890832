"""Pure decisions over HTTP/2 header blocks: what a stream names, its color, its failures.

Blocks are in the binding's packed form, ``name\\0value\\0`` per field, as nghttp2
decoded them (it has already refused malformed fields, upper-case names,
connection-specific headers and misplaced pseudo-headers). A block that needs
no change is forwarded as the same bytes; only a replaced color rebuilds it.
"""

from __future__ import annotations

from sidecar.coloring import Captured

Fields = tuple[list[bytes], list[bytes]]  # names, values (same length, in order)

GRPC_CONTENT_TYPE = b"application/grpc"
BAGGAGE = b"baggage"  # W3C Baggage: one field or several, a list either way
# gRPC status codes (grpc/doc/statuscodes.md) the proxy answers or infers.
GRPC_OK = "0"
GRPC_CANCELLED = "1"
GRPC_UNKNOWN = "2"
GRPC_DEADLINE_EXCEEDED = "4"
GRPC_PERMISSION_DENIED = "7"
GRPC_RESOURCE_EXHAUSTED = "8"
GRPC_UNIMPLEMENTED = "12"
GRPC_INTERNAL = "13"
GRPC_UNAVAILABLE = "14"
GRPC_UNAUTHENTICATED = "16"

# Why the proxy answers a stream itself.
UNAVAILABLE = "unavailable"  # upstream refused, unreachable, or gone before its answer
TIMEOUT = "timeout"  # connect or first-answer deadline passed
TOO_LARGE = "too_large"  # request header list over the limit
BAD_REQUEST = "bad_request"  # no usable authority
LOOP = "loop"  # the upstream named is this proxy's own outbound listener
EMPTY_LANE = "empty_lane"  # the color's lane is empty and its route says fallback: fail

_FAILURES = {
    # kind: (HTTP status, gRPC status, message)
    UNAVAILABLE: (502, GRPC_UNAVAILABLE, "upstream unavailable"),
    TIMEOUT: (504, GRPC_DEADLINE_EXCEEDED, "upstream timed out"),
    TOO_LARGE: (431, GRPC_RESOURCE_EXHAUSTED, "request header list too large"),
    BAD_REQUEST: (400, GRPC_INTERNAL, "request names no upstream"),
    LOOP: (508, GRPC_INTERNAL, "request addressed to the proxy itself"),
    EMPTY_LANE: (503, GRPC_UNAVAILABLE, "lane empty and its route says fallback: fail"),
}

# grpc/doc/http-grpc-status-mapping.md: the status a gRPC client infers from an HTTP one.
_HTTP_TO_GRPC = {
    400: GRPC_INTERNAL,
    401: GRPC_UNAUTHENTICATED,
    403: GRPC_PERMISSION_DENIED,
    404: GRPC_UNIMPLEMENTED,
    429: GRPC_UNAVAILABLE,
    502: GRPC_UNAVAILABLE,
    503: GRPC_UNAVAILABLE,
    504: GRPC_UNAVAILABLE,
}


def fields(block: bytes) -> Fields:
    parts = block.split(b"\0")
    return parts[0:-1:2], parts[1::2]


def get(f: Fields, name: bytes) -> bytes | None:
    """The first value of ``name``, or None."""
    names = f[0]
    try:
        return f[1][names.index(name)]
    except ValueError:
        return None


def values_of(f: Fields, name: bytes) -> list[bytes]:
    names, values = f
    n = names.count(name)
    if not n:
        return []
    if n == 1:
        return [values[names.index(name)]]
    return [v for k, v in zip(names, values, strict=True) if k == name]


def captured(f: Fields, wanted: frozenset[bytes]) -> Captured:
    """The values of the headers the inbound rules read (``Colorer.inbound_capture``)."""
    out: Captured = {}
    if wanted:
        for k, v in zip(*f, strict=True):
            if k in wanted:
                out.setdefault(k, []).append(v)
    return out


def authority(f: Fields) -> bytes | None:
    """Who a request names: ``:authority``, else ``host`` (RFC 9113 section 8.3.1)."""
    value = get(f, b":authority")
    return value if value else get(f, b"host")


_GRPC_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def grpc_timeout(f: Fields) -> float | None:
    """A call's ``grpc-timeout`` in seconds (PROTOCOL-HTTP2.md: 1-8 digits and a unit)."""
    value = get(f, b"grpc-timeout")
    if value is None or not 2 <= len(value) <= 9 or not value[:-1].isdigit():
        return None
    unit = _GRPC_UNITS.get(value[-1:])
    return int(value[:-1]) * unit if unit is not None else None


def is_grpc(f: Fields) -> bool:
    ct = get(f, b"content-type")
    return ct is not None and ct.startswith(GRPC_CONTENT_TYPE)


def rewrite(
    block: bytes,
    f: Fields,
    header: bytes,
    color: bytes | None,
    bag: tuple[bytes, ...] | None,
) -> bytes:
    """The block with every ``header`` field replaced by one carrying ``color`` and every
    ``baggage`` field by ``bag``'s values, in order; None leaves that part as it is.

    Fields that stay keep their order; the new ones go last (after every
    pseudo-header, as RFC 9113 section 8.3 wants). Unchanged parts cost nothing: a
    block without those fields only grows.
    """
    names, values = f
    drop = (color is not None and header in names, bag is not None and BAGGAGE in names)
    if drop[0] or drop[1]:
        gone = {n for n, d in zip((header, BAGGAGE), drop, strict=True) if d}
        block = b"".join(
            k + b"\0" + v + b"\0" for k, v in zip(names, values, strict=True) if k not in gone
        )
    if color is not None:
        block += header + b"\0" + color + b"\0"
    if bag is not None:
        block += b"".join(BAGGAGE + b"\0" + v + b"\0" for v in bag)
    return block


def status(f: Fields) -> int:
    value = get(f, b":status")
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0


def status_of(block: bytes) -> int:
    """``:status`` of a response block; nghttp2 has checked it is there, first, 3 digits."""
    if block[:8] == b":status\0":
        try:
            return int(block[8:11])
        except ValueError:
            pass
    return status(fields(block))


def grpc_status(f: Fields, http_status: int) -> str:
    """The status a gRPC client reads from a response's trailers (or trailers-only head)."""
    value = get(f, b"grpc-status")
    if value is not None and value.isdigit():
        return value.decode()
    return grpc_from_http(http_status)


def grpc_from_http(http_status: int) -> str:
    if http_status == 200:
        return GRPC_UNKNOWN  # 200 without grpc-status: the server broke the protocol
    return _HTTP_TO_GRPC.get(http_status, GRPC_UNKNOWN)


def failure(kind: str, grpc: bool) -> tuple[int, str, bytes, bytes]:
    """The proxy's own answer: (HTTP status on the wire, gRPC status, head block, body).

    A gRPC client gets a trailers-only response (HTTP 200, ``grpc-status`` in the
    head, no body), which every gRPC library reads as that status; others get the
    HTTP status and a line of text.
    """
    http, code, message = _FAILURES[kind]
    if grpc:
        head = (
            b":status\0"
            b"200\0"
            b"content-type\0"
            b"application/grpc\0"
            b"grpc-status\0" + code.encode() + b"\0"
            b"grpc-message\0" + message.encode() + b"\0"
        )
        return 200, code, head, b""
    body = message.encode() + b"\n"
    head = (
        b":status\0" + str(http).encode() + b"\0"
        b"content-type\0"
        b"text/plain\0"
        b"content-length\0" + str(len(body)).encode() + b"\0"
    )
    return http, code, head, body
