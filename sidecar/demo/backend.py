"""A tiny HTTP server that says which host it is and which color header it got.

The demo runs one in the stable namespace and one in the canary namespace, both
on the same service address, so the answer's ``host`` tells which path the
kernel chose for a request. HTTP/1.1 with keep-alive, because the sidecar pools
upstream connections per color and a pooled connection must be reusable.

    python -m sidecar.demo.backend --name stable-host --port 80
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

COLOR_HEADER = "x-traffic-color"


def answer(name: str, color: str | None, method: str, path: str, peer: str) -> dict[str, Any]:
    """The JSON body: who answered, and what the request carried. Pure."""
    return {"host": name, "color": color, "method": method, "path": path, "peer": peer}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: BackendServer

    def _reply(self, with_body: bool) -> None:
        body = json.dumps(
            answer(
                self.server.name,
                self.headers.get(COLOR_HEADER),
                self.command,
                self.path,
                self.client_address[0],
            )
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.send_header("x-served-by", self.server.name)
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def do_GET(self) -> None:
        self._reply(True)

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(min(length, 1 << 20))
        self._reply(True)

    def do_HEAD(self) -> None:
        self._reply(False)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            sys.stderr.write(f"{self.server.name}: {format % args}\n")


class BackendServer(ThreadingHTTPServer):
    """Binds ``::`` dual-stack (one socket for IPv4 and IPv6) or any literal address."""

    daemon_threads = True

    def __init__(self, name: str, host: str = "::", port: int = 80, verbose: bool = False):
        self.name = name
        self.verbose = verbose
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    @property
    def port(self) -> int:
        return self.server_address[1]


def start_in_thread(name: str, host: str = "127.0.0.1", port: int = 0) -> BackendServer:
    """A backend serving on a daemon thread (the loopback demo); ``shutdown()`` stops it."""
    server = BackendServer(name, host, port)
    threading.Thread(target=server.serve_forever, name=f"backend-{name}", daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sidecar.demo.backend",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--name", required=True, help="the host name to answer with")
    parser.add_argument("--host", default="::", help="bind address (default :: = v4 and v6)")
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--verbose", action="store_true", help="log each request to stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    server = BackendServer(args.name, args.host, args.port, args.verbose)
    # SIGTERM ends serve_forever like Ctrl-C does, so the socket is closed cleanly.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"{args.name} listening on {args.host} port {server.port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
