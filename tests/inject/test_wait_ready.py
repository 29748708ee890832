"""``traffic-color wait-ready``, the injected postStart hook, against a real HTTP server.

The hook holds the app until the sidecar is ready; it must return 0 once
``/readyz`` answers 200, and fail (so the kubelet restarts the container) with
the last answer when it never does.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


class Admin:
    """A stand-in admin port: /readyz says 503 until ``ready_after`` requests were seen."""

    def __init__(self, ready_after: int) -> None:
        self.ready_after, self.seen = ready_after, 0
        admin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                admin.seen += 1
                ready = self.path == "/readyz" and admin.seen > admin.ready_after
                body = b"ready\n" if ready else b"data path: compiling\n"
                self.send_response(200 if ready else 503)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def admin_factory() -> Iterator:
    servers: list[Admin] = []

    def make(ready_after: int) -> Admin:
        admin = Admin(ready_after)
        threading.Thread(target=admin.server.serve_forever, daemon=True).start()
        servers.append(admin)
        return admin

    yield make
    for admin in servers:
        admin.server.shutdown()
        admin.server.server_close()


def _wait(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "wait-ready", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


def test_returns_once_readyz_answers_200(admin_factory) -> None:
    admin = admin_factory(ready_after=3)
    result = _wait("--admin", admin.url, "--timeout", "30")
    assert result.returncode == 0, result.stderr
    assert admin.seen == 4  # three 503s, then the 200


def test_fails_with_the_last_answer_when_never_ready(admin_factory) -> None:
    admin = admin_factory(ready_after=10**6)
    t0 = time.monotonic()
    result = _wait("--admin", admin.url, "--timeout", "1")
    assert result.returncode == 1
    assert time.monotonic() - t0 < 15
    assert "not ready after 1 s: 503 data path: compiling" in result.stderr


def test_waits_for_a_sidecar_that_is_not_listening_yet() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = _wait("--admin", f"http://127.0.0.1:{port}", "--timeout", "0.5")
    assert result.returncode == 1
    assert "Connection refused" in result.stderr
