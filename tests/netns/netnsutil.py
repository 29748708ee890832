"""Test-side hosts made of network namespaces and veth pairs.

Every name is unique per run (pid + counter + random), every object is
recorded as it is made, and ``Lab.close()`` deletes all of it, also when a
test fails half way through building. Namespaces are made and configured with
the ``ip`` tool (iproute2): what a reader would type to reproduce a failure.

Sockets that live inside a namespace are created by pyroute2's
``netns.create_socket`` (a short-lived child enters the namespace, creates the
socket and passes the fd back), so the test process itself never changes
namespace and can use those sockets from any thread.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Iterator

from pyroute2 import netns as pr_netns

from sidecar.datapath import bpfsys

_counter = 0
_lock = threading.Lock()


def unique(prefix: str) -> str:
    """A name no other run uses; short enough for an interface (15 chars max)."""
    global _counter
    with _lock:
        _counter += 1
        n = _counter
    name = f"{prefix}{os.getpid() % 1000:03d}{n:02d}{secrets.token_hex(2)}"
    assert len(name) <= 15, name
    return name


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    """Run ``ip ARGS`` (inside ``netns`` when given) and return stdout."""
    cmd = ["ip", *(("-n", netns) if netns else ()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc.stdout


def tc(*args: str, netns: str | None = None, check: bool = True) -> str:
    cmd = ["tc", *(("-n", netns) if netns else ()), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc.stdout


def sysctl(netns: str, key: str, value: str) -> None:
    subprocess.run(
        ["ip", "netns", "exec", netns, "sysctl", "-qw", f"{key}={value}"],
        check=True,
        capture_output=True,
        timeout=20,
    )


class Lab:
    """Namespaces and veth pairs that are deleted together on ``close()``."""

    def __init__(self) -> None:
        self.namespaces: list[str] = []

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def netns(self, prefix: str = "tcns") -> str:
        """A fresh namespace with loopback up."""
        name = unique(prefix)
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("link", "set", "lo", "up", netns=name)
        return name

    def veth(self, ns_a: str, name_a: str, ns_b: str, name_b: str) -> None:
        """A veth pair with one end in each namespace, both up.

        Created with temporary unique names in the root namespace, then moved
        and renamed, so two tests can never collide on ``name_a``/``name_b``.
        """
        tmp_a, tmp_b = unique("tva"), unique("tvb")
        ip("link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
        try:
            ip("link", "set", tmp_a, "netns", ns_a, "name", name_a)
            ip("link", "set", tmp_b, "netns", ns_b, "name", name_b)
        except Exception:
            ip("link", "del", tmp_a, check=False)
            raise
        ip("link", "set", name_a, "up", netns=ns_a)
        ip("link", "set", name_b, "up", netns=ns_b)

    def close(self) -> None:
        """Delete every namespace (their veth ends go with them). Safe twice."""
        while self.namespaces:
            ip("netns", "del", self.namespaces.pop(), check=False)


def ns_socket(
    netns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
) -> socket.socket:
    """A socket that lives in ``netns`` (never creates the namespace)."""
    return pr_netns.create_socket(netns, family, kind, flags=0)


def ns_http_get(netns: str, port: int, path: str) -> tuple[int, str]:
    """GET ``path`` from 127.0.0.1:``port`` inside ``netns`` (an admin port): status, body."""
    with ns_socket(netns) as s:
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


class NameServer:
    """Answers every line it receives with its own ``name``, in a namespace.

    The answer proves that the request reached this host over an established
    flow; a connection stays open until the client closes it, so a test can
    send again on the same flow later. Bounded: at most ``max_conns``
    connections, every socket has a timeout, ``close()`` stops it all. The bound is
    per server and module-scoped fixtures share servers across tests, so it is set
    well above what a test module makes (past it, the kernel still completes
    handshakes on the listening socket but nobody answers).
    """

    def __init__(
        self, netns: str, address: str, port: int, name: str, max_conns: int = 4096
    ) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.sock = ns_socket(netns, family)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, port))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.name = name
        self.accepted = 0
        self._max = max_conns
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set() and self.accepted < self._max:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            t = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(0.2)
            buf = b""
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(4096)
                except TimeoutError:
                    continue
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    _, buf = buf.split(b"\n", 1)
                    conn.sendall(self.name.encode() + b"\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for t in self._threads:
            t.join(timeout=5)
        self.sock.close()


@contextlib.contextmanager
def servers(*specs: tuple[str, str, int, str]) -> Iterator[list[NameServer]]:
    """Start ``NameServer(netns, address, port, name)`` for each spec; stop all."""
    started: list[NameServer] = []
    try:
        for spec in specs:
            started.append(NameServer(*spec))
        yield started
    finally:
        for srv in started:
            srv.close()


def pass_program() -> int:
    """A SCHED_CLS program that returns TC_ACT_OK; the caller closes the fd.

    Enough to exercise attach and detach without a compiler: tc only needs a
    program fd of the right type.
    """
    return bpfsys.prog_load_sched_cls(bpfsys.RETURN_OK_INSNS, "tc_test_pass")


class Flow:
    """A TCP client in a namespace, bound before it connects so its 4-tuple is known.

    That is what the proxy does for the classifier: the flow is registered
    before its first packet (the SYN) reaches the hook.
    """

    def __init__(self, netns: str, src: str, dst: str, port: int, timeout: float = 5.0) -> None:
        family = socket.AF_INET6 if ":" in dst else socket.AF_INET
        self.sock = ns_socket(netns, family)
        self.sock.settimeout(timeout)
        self.sock.bind((src, 0))
        host, sport = self.sock.getsockname()[:2]
        self.local = (host, sport)
        self.remote = (dst, port)

    def connect(self) -> Flow:
        self.sock.connect(self.remote)
        return self

    def ask(self) -> str:
        """Send a line, return the answering host's name."""
        self.sock.sendall(b"who?\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = self.sock.recv(256)
            if not chunk:
                raise ConnectionError(f"{self.local} -> {self.remote}: closed by the peer")
            buf += chunk
        return buf.decode().strip()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Flow:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_child(code: str, timeout: float = 60.0) -> str:
    """Run Python ``code`` in a fresh interpreter (a run that may "crash"); return stdout."""
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout
