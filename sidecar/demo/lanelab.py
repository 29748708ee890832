"""One network namespace with names of its own, services and sidecars in it: where lanes run.

``ip netns exec NAME`` bind-mounts ``/etc/netns/NAME/hosts`` and
``/etc/netns/NAME/resolv.conf`` over the real ones for the command it runs, so every
process started here (sidecars, services, curl) resolves the names this lab
writes: service names to loopback addresses (``127.0.0.0/8`` is all local inside
the namespace, so each "pod" gets its own address), and every other name from a
``dnsmasq`` of the lab's own on ``127.0.0.53``, which answers NXDOMAIN for unknown
names, NODATA for names declared empty, a TTL of ``DNS_TTL`` for the addresses it
serves, and logs each query (the tests count lookups there). Nothing leaves the
namespace; ``close()`` ends every process started here, then deletes the namespace
and its ``/etc/netns`` directory, on errors too.

The demo's second act (``chain.py``) and ``tests/netns/test_lanes.py`` use it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DNS_ADDRESS = "127.0.0.53"
DNS_TTL = 2  # seconds, for addresses the lab's DNS serves (its negative answers too)
READY_TIMEOUT = 20.0


class LabError(RuntimeError):
    """A step of the lab failed; the message says which and the detail shows output."""


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if proc.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


class LaneLab:
    """A namespace ``PREFIX<hex>`` with loopback up; a context manager."""

    def __init__(self, prefix: str, workdir: Path) -> None:
        self.name = f"{prefix}{os.getpid() % 10000:04d}{secrets.token_hex(2)}"
        self.workdir = workdir
        self.etc = Path("/etc/netns") / self.name
        self.procs: list[subprocess.Popen[Any]] = []
        self.dns_log = workdir / "dnsmasq.log"
        self._made = False

    def __enter__(self) -> LaneLab:
        _ip("netns", "add", self.name)
        self._made = True
        _ip("-n", self.name, "link", "set", "lo", "up")
        self.etc.mkdir(parents=True, exist_ok=True)
        (self.etc / "resolv.conf").write_text(f"nameserver {DNS_ADDRESS}\noptions attempts:1\n")
        (self.etc / "hosts").write_text("127.0.0.1 localhost\n")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Processes first, then the namespace and its files. Safe twice."""
        while self.procs:
            proc = self.procs.pop()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        if self._made:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=20)
            self._made = False
        shutil.rmtree(self.etc, ignore_errors=True)

    # ------------------------------------------------------------ names

    def names(
        self,
        hosts: dict[str, str | tuple[str, ...]],
        dns: dict[str, str] | None = None,
        empty: tuple[str, ...] = (),
    ) -> None:
        """``hosts``: the namespace's /etc/hosts (a tuple: several addresses, in order);
        ``dns``: names its DNS serves with a TTL; ``empty``: names that exist in DNS with
        no address (NODATA). Others: NXDOMAIN."""
        lines = ["127.0.0.1 localhost"]
        for name, addrs in hosts.items():
            lines += (f"{addr} {name}" for addr in ((addrs,) if isinstance(addrs, str) else addrs))
        (self.etc / "hosts").write_text("\n".join(lines) + "\n")
        served = self.workdir / "dns.hosts"
        served.write_text("".join(f"{addr} {name}\n" for name, addr in (dns or {}).items()))
        argv = [
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            f"--addn-hosts={served}",
            f"--listen-address={DNS_ADDRESS}",
            "--bind-interfaces",
            "--port=53",
            f"--local-ttl={DNS_TTL}",
            f"--neg-ttl={DNS_TTL}",
            "--address=/#/",  # everything not served: NXDOMAIN
            "--log-queries",
            f"--log-facility={self.dns_log}",
            "--pid-file=",
            "--user=root",
            *(f"--txt-record={name},empty" for name in empty),
        ]
        if shutil.which("dnsmasq") is None:
            raise LabError("dnsmasq is not installed (apt-get install dnsmasq-base)")
        self.spawn(argv, self.workdir / "dnsmasq.out")
        deadline = time.monotonic() + 5
        while "started" not in self._read(self.dns_log) and time.monotonic() < deadline:
            time.sleep(0.05)

    def dns_queries(self, name: str, qtype: str = "A") -> int:
        """How many ``qtype`` queries for ``name`` the lab's DNS has answered."""
        needle = f"query[{qtype}] {name} "
        return sum(1 for line in self._read(self.dns_log).splitlines() if needle in line)

    @staticmethod
    def _read(path: Path) -> str:
        try:
            return path.read_text(errors="replace")
        except OSError:
            return ""

    # ------------------------------------------------------------ processes

    def argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def spawn(
        self, argv: list[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                self.argv(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env if env is not None else _clean_env(),
            )
        self.procs.append(proc)
        return proc

    def service(
        self, name: str, listen: str, *, next_url: str | None = None, how: str = "", proxy: str = ""
    ) -> subprocess.Popen:
        """A ``chainapp`` service; ``how``: "" (copies nothing), "otel" or "copy-color"."""
        argv = [sys.executable, "-m", "sidecar.demo.chainapp", "--name", name, "--listen", listen]
        if next_url:
            argv += ["--next", next_url]
        if how:
            argv.append(f"--{how}")
        env = _clean_env()
        if proxy:
            env["http_proxy"] = env["HTTP_PROXY"] = proxy
        proc = self.spawn(argv, self.workdir / f"{name}.log", env)
        self.wait_http(f"http://{listen}/healthz", proc, name)
        return proc

    def sidecar(self, name: str, policy: str, color: str, admin: str) -> subprocess.Popen:
        """``traffic-color run`` with ``policy`` (text); waits until ``/readyz`` is 200."""
        path = self.workdir / f"{name}.yaml"
        path.write_text(policy)
        argv = [sys.executable, "-m", "sidecar", "run", "--policy", str(path), "--color", color]
        proc = self.spawn(argv, self.workdir / f"{name}.log")
        self.wait_http(f"http://{admin}/readyz", proc, name)
        return proc

    def wait_http(self, url: str, proc: subprocess.Popen, name: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(f"{name} exited with code {proc.returncode}", self.log(name))
            if self.curl(url, "-o", "/dev/null", "-w", "%{http_code}").stdout == "200":
                return
            time.sleep(0.1)
        raise LabError(f"{name} did not answer {url} within {READY_TIMEOUT:g}s", self.log(name))

    def log(self, name: str) -> str:
        return self._read(self.workdir / f"{name}.log")[-3000:]

    # ------------------------------------------------------------ clients

    def curl(self, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(["curl", "-sS", "--max-time", str(timeout), *args]),
            capture_output=True,
            text=True,
            timeout=timeout + 10,
            env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
        )

    def get_json(self, url: str, *headers: str, proxy: str | None = None) -> tuple[int, dict]:
        """GET ``url`` (through the sidecar's outbound port when ``proxy``): status, JSON."""
        args = [url, "-w", "\n%{http_code}"]
        for h in headers:
            args += ["-H", h]
        if proxy:
            args += ["-x", proxy]
        proc = self.curl(*args)
        if proc.returncode != 0:
            raise LabError(f"curl {url}: {proc.stderr.strip()}")
        body, _, code = proc.stdout.rpartition("\n")
        try:
            data = json.loads(body) if body.strip() else {}
        except ValueError:
            data = {"text": body}
        return int(code), data

    def metrics(self, admin: str) -> str:
        return self.curl(f"http://{admin}/metrics").stdout


def _clean_env() -> dict[str, str]:
    """Ours without anything that would steer a child's proxying, policy or telemetry."""
    drop = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in drop and not k.startswith(("TRAFFIC_COLOR", "OTEL_"))
    }
    env["NO_PROXY"] = env["no_proxy"] = ""
    # The OpenTelemetry SDK exports nowhere: no collector in the lab.
    env["OTEL_TRACES_EXPORTER"] = env["OTEL_METRICS_EXPORTER"] = env["OTEL_LOGS_EXPORTER"] = "none"
    return env
