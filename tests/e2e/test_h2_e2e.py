"""HTTP/2 end to end: two colors on one client connection, each reaching its own host at the
same service address, and the kernel counting each color's h2 flow.

The demo's namespaces, with ``nghttpd`` at port 8080 of the stable and the canary host; the
client, in the pod, opens one connection to the sidecar's outbound side and a stream per
color on it at once (raw frames: curl 7.88 cannot reuse a prior-knowledge connection across
``--next``).
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.demo import run as demo
from sidecar.demo.topology import SERVICE_V4
from tests.e2e import kernel_packets, require_kernel, start_sidecar, world
from tests.proto.h2help import (
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    PREFACE,
    SETTINGS,
    frame,
    hpack,
    request_fields,
    split_frames,
)

PORT = 8080


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    require_kernel()
    tmp = tmp_path_factory.mktemp("h2e2e")
    with world("tch2e") as topo:
        for role, name in (("stable", demo.STABLE_HOST), ("canary", demo.CANARY_HOST)):
            root = Path(tmp, role)
            root.mkdir()
            (root / "who").write_text(name)
            topo.spawn(
                role,
                ["nghttpd", "--no-tls", "-d", str(root), str(PORT)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL,
            )
        sc = start_sidecar(topo, tmp)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # both nghttpd up
                ok = [
                    topo.exec(role, ["ss", "-ltnH", f"sport = :{PORT}"]).stdout.strip()
                    for role in ("stable", "canary")
                ]
                if all(ok):
                    break
                time.sleep(0.05)
            yield topo, sc
        finally:
            sc.stop()


def interleaved(port: int, colors: list[str]) -> dict[str, str]:
    """One h2 connection, a stream per color opened together: color -> who answered it."""
    fields = request_fields(f"{SERVICE_V4}:{PORT}", "/who")
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        data = PREFACE + frame(SETTINGS, 0, 0)
        for i, color in enumerate(colors):
            block = hpack([*fields, (b"x-traffic-color", color.encode())])
            data += frame(HEADERS, END_STREAM | END_HEADERS, 1 + 2 * i, block)
        s.sendall(data)
        buf, frames, ended = b"", [], set()
        s.settimeout(5)
        while len(ended) < len(colors):
            chunk = s.recv(65536)
            if not chunk:
                break
            got, buf = split_frames(buf + chunk)
            frames += got
            ended |= {sid for k, f, sid, _ in got if k == DATA and f & END_STREAM}
    return {
        color: b"".join(p for k, _, sid, p in frames if k == DATA and sid == 1 + 2 * i).decode()
        for i, color in enumerate(colors)
    }


@pytest.mark.root
def test_two_colors_on_one_h2_connection_reach_their_hosts_and_kernel_counts(running):
    topo, sc = running
    time.sleep(0.3)
    before = {c: kernel_packets(sc, color=c, hook="ingress") for c in ("stable", "canary")}
    got = topo.call("pod", interleaved, demo.OUTBOUND_PORT, ["canary", "stable"])
    assert got == {"canary": "canary-host", "stable": "stable-host"}
    time.sleep(0.3)
    _, text = sc.get("/metrics")
    conns = {"direction": "outbound", "protocol": "http2"}
    assert demo.metric_value(text, "traffic_color_connections_total", conns) == 1
    for color in ("stable", "canary"):
        ok = {"direction": "outbound", "color": color, "code": "200"}
        assert demo.metric_value(text, "traffic_color_requests_total", ok) == 1
        # The color's own h2 flow entered the node marked with its color.
        assert kernel_packets(sc, color=color, hook="ingress") - before[color] >= 1
