"""A grpcio server that says who it is and what it was sent, and a client of it: both run
as processes inside a test's namespace (``ip netns exec``), so names resolve there.

    python grpcwho.py serve NAME HOST:PORT
    python grpcwho.py call TARGET AUTHORITY [--count N] [-m key=value ...]

``serve`` answers ``/who.Who/Call`` with JSON: its name, and the ``x-traffic-color``
and ``baggage`` metadata of the call. ``call`` makes ``N`` calls at once on one
channel to ``TARGET`` (the sidecar's outbound port) naming ``AUTHORITY`` (so every
call is a stream of one HTTP/2 connection) and prints one JSON line: per call, the
status code's name, its details and the reply.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent import futures

import grpc

METHOD = "/who.Who/Call"


def _ident(b: bytes) -> bytes:
    return b


def serve(name: str, listen: str) -> None:
    def call(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen: dict[str, list[str]] = {}
        for key, value in context.invocation_metadata():
            seen.setdefault(key, []).append(value)
        reply = {
            "name": name,
            "color": ",".join(seen.get("x-traffic-color", [])),
            "baggage": ",".join(seen.get("baggage", [])),
        }
        return json.dumps(reply).encode()

    handler = grpc.method_handlers_generic_handler(
        "who.Who", {"Call": grpc.unary_unary_rpc_method_handler(call, _ident, _ident)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(listen) == 0:
        sys.exit(f"cannot listen on {listen}")
    server.start()
    print("serving", flush=True)
    server.wait_for_termination()


def call(target: str, authority: str, count: int, metadata: list[str]) -> None:
    md = tuple(tuple(m.split("=", 1)) for m in metadata)
    options = [("grpc.default_authority", authority), ("grpc.enable_retries", 0)]
    with grpc.insecure_channel(target, options=options) as ch:
        grpc.channel_ready_future(ch).result(timeout=10)
        stub = ch.unary_unary(METHOD, _ident, _ident)
        pending = [stub.future(b"", metadata=md, timeout=10) for _ in range(count)]
        out = []
        for f in pending:
            try:
                out.append({"code": "OK", "reply": json.loads(f.result())})
            except grpc.RpcError as exc:
                out.append({"code": exc.code().name, "details": exc.details()})
    print(json.dumps(out), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("name")
    s.add_argument("listen")
    c = sub.add_parser("call")
    c.add_argument("target")
    c.add_argument("authority")
    c.add_argument("--count", type=int, default=1)
    c.add_argument("-m", dest="metadata", action="append", default=[])
    a = p.parse_args()
    if a.cmd == "serve":
        serve(a.name, a.listen)
    else:
        call(a.target, a.authority, a.count, a.metadata)


if __name__ == "__main__":
    main()
