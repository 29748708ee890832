"""One service of a call chain: answers who it is and what it got, after calling the next hop.

The demo's second act and the lane tests run one per service version. It is the
kind of app a sidecar must work with unchanged: by default it copies nothing
from its inbound request onto its outbound call. ``--copy-color`` makes it copy
the color header (an app that propagates by hand); ``--otel`` instruments it with
the OpenTelemetry SDK instead (WSGI middleware for the inbound side, urllib for
the outbound call), which propagates W3C Baggage on its own, with no app code.

    python -m sidecar.demo.chainapp --name reviews-canary --listen 127.0.0.11:9080 \\
        [--next http://ratings:9080/] [--otel | --copy-color]

The outbound call goes through ``http_proxy`` from the environment (the sidecar's
outbound port), as an app injected with ``HTTP_PROXY`` does.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socketserver
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

COLOR_HEADER = "x-traffic-color"

Wsgi = Callable[[dict, Callable], Iterable[bytes]]


def make_app(name: str, next_url: str | None, copy_color: bool) -> Wsgi:
    """The WSGI app: JSON of this hop (name, Host, color, baggage) and of the next hops."""

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":  # readiness, without calling the next hop
            start_response("200 OK", [("content-length", "3")])
            return [b"ok\n"]
        color = environ.get("HTTP_X_TRAFFIC_COLOR")
        answer: dict[str, Any] = {
            "name": name,
            "host": environ.get("HTTP_HOST"),
            "color": color,
            "baggage": environ.get("HTTP_BAGGAGE"),
        }
        if next_url:
            req = urllib.request.Request(next_url)
            if copy_color and color:
                req.add_header(COLOR_HEADER, color)
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    answer["next"] = json.loads(resp.read())
            except Exception as exc:  # the chain's answer says where it broke
                answer["next"] = {"error": str(exc)}
        body = json.dumps(answer).encode()
        start_response(
            "200 OK", [("content-type", "application/json"), ("content-length", str(len(body)))]
        )
        return [body]

    return app


def instrument(app: Wsgi) -> Wsgi:
    """OpenTelemetry as an operator adds it: the SDK's tracer provider, the WSGI
    middleware and the urllib instrumentation; propagators stay the default
    (``tracecontext,baggage``)."""
    from opentelemetry import trace
    from opentelemetry.instrumentation.urllib import URLLibInstrumentor
    from opentelemetry.instrumentation.wsgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.trace import TracerProvider

    trace.set_tracer_provider(TracerProvider())
    URLLibInstrumentor().instrument()
    return OpenTelemetryMiddleware(app)


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sidecar.demo.chainapp",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--name", required=True)
    parser.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT (IPv4)")
    parser.add_argument("--next", dest="next_url", help="URL this service calls per request")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--otel", action="store_true", help="instrument with OpenTelemetry")
    how.add_argument("--copy-color", action="store_true", help="copy the color header by hand")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    host, _, port = args.listen.rpartition(":")
    app = make_app(args.name, args.next_url, args.copy_color)
    if args.otel:
        app = instrument(app)
    server = make_server(host, int(port), app, _Server, _QuietHandler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"{args.name} listening on {args.listen}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
