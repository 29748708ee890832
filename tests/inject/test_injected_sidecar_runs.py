"""The injected sidecar, run as the kubelet would run it, in a network namespace of its own.

The container the mutation writes is taken literally: its args (the image's
entrypoint is ``traffic-color``), its env (downward API resolved from the pod's
labels), its securityContext (uid, gid, added capabilities, no_new_privs, applied
with ``setpriv``), the policy the chart ships, then its postStart hook or
startupProbe, and its probes on the ports they name. So a wrong uid, a missing
capability, a hook the image cannot run or a probe on the wrong port fails here,
not in a user's cluster.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.inject.mutation import POLICY_DIR, InjectConfig, inject_pod

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
CHART_POLICY = yaml.safe_load((REPO / "charts/traffic-color/values.yaml").read_text())["policy"][
    "content"
]
DATAPATH_POLICY = re.sub(
    r"datapath:\n  enabled: false\n",
    "datapath:\n  enabled: true\n  required: true\n"
    "  attach:\n    - {interface: eth0, direction: egress}\n",
    CHART_POLICY,
)
CONFIG = InjectConfig(image="registry.example/traffic-color:test")


@pytest.fixture
def netns() -> Iterator[str]:
    """A pod's network namespace: loopback and an ``eth0`` (a veth, its peer inside too)."""
    name = f"tc16k-pod-{os.getpid()}-{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for argv in (
            ["link", "set", "lo", "up"],
            ["link", "add", "eth0", "type", "veth", "peer", "name", "peer0"],
            ["addr", "add", "198.18.99.2/24", "dev", "eth0"],
            ["link", "set", "peer0", "up"],
            ["link", "set", "eth0", "up"],
        ):
            subprocess.run(["ip", "-n", name, *argv], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _pod(color: str = "canary") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "labels": {"app": "web", "traffic-color.io/color": color}},
        "spec": {"containers": [{"name": "web", "image": "example/web:1"}]},
    }


def _sidecar(pod: dict[str, Any]) -> dict[str, Any]:
    spec = pod["spec"]
    return next(
        c
        for c in spec.get("initContainers", []) + spec["containers"]
        if c["name"] == "traffic-color"
    )


def _setpriv(ctx: dict[str, Any]) -> list[str]:
    """``setpriv`` arguments that give a process what this securityContext gives a container."""
    caps = [c.lower() for c in (ctx.get("capabilities") or {}).get("add", [])]
    assert (ctx.get("capabilities") or {}).get("drop") == ["ALL"]
    bounding = ",".join(["-all", *(f"+{c}" for c in caps)])
    argv = [
        "setpriv",
        f"--reuid={ctx['runAsUser']}",
        f"--regid={ctx['runAsGroup']}",
        "--clear-groups",
        f"--bounding-set={bounding}",
        "--inh-caps=-all",
    ]
    if ctx.get("allowPrivilegeEscalation") is False:
        argv.append("--no-new-privs")
    return argv


def _env(container: dict[str, Any], pod: dict[str, Any], policy_dir: Path) -> dict[str, str]:
    env = {"PATH": os.environ["PATH"]}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"].replace(POLICY_DIR, str(policy_dir))
            continue
        path = item["valueFrom"]["fieldRef"]["fieldPath"]
        label = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
        assert label, path
        env[item["name"]] = pod["metadata"]["labels"][label.group(1)]
    return env


def _image_command(argv: list[str]) -> list[str]:
    """The image runs ``traffic-color ARGS``; here that is this checkout's module."""
    if argv and argv[0] == "traffic-color":
        argv = argv[1:]
    return [sys.executable, "-m", "sidecar", *argv]


def _get(
    netns: str, container: dict[str, Any], probe: dict[str, Any], host: str = "198.18.99.2"
) -> int:
    """What the kubelet's httpGet probe gets: the pod's address, the port the probe names."""
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    get = probe["httpGet"]
    port = ports.get(get["port"], get["port"])
    result = subprocess.run(
        [
            *("ip", "netns", "exec", netns, "curl", "-s", "-o", "/dev/null"),
            *("-w", "%{http_code}", "--max-time", "2", f"http://{host}:{port}{get['path']}"),
        ],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return int(result.stdout or 0)


def _capabilities(pid: int) -> tuple[int, int]:
    """(uid, effective capability mask) of a running process."""
    status = Path(f"/proc/{pid}/status").read_text()
    uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    eff = int(re.search(r"^CapEff:\s+([0-9a-f]+)", status, re.M).group(1), 16)  # type: ignore[union-attr]
    return uid, eff


CAP_BITS = {"NET_ADMIN": 12, "NET_RAW": 13, "SYS_ADMIN": 21, "PERFMON": 38, "BPF": 39}


def _run_pod(
    netns: str, tmp_path: Path, volume: Path, config: InjectConfig, policy: str
) -> tuple[dict[str, Any], subprocess.Popen[bytes], dict[str, str]]:
    pod, reason = inject_pod(_pod(), config)
    assert reason is None
    container = _sidecar(pod)
    (volume / "policy.yaml").write_text(policy)
    (volume / "policy.yaml").chmod(0o644)
    env = _env(container, pod, volume)
    log = open(tmp_path / "sidecar.log", "wb")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(
        [
            *("ip", "netns", "exec", netns),
            *_setpriv(container["securityContext"]),
            *_image_command(container["args"]),
        ],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return container, proc, env


def _stop(proc: subprocess.Popen[bytes]) -> int:
    proc.terminate()
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def _log(tmp_path: Path) -> str:
    return (tmp_path / "sidecar.log").read_text(errors="replace")[-3000:]


def test_sidecar_serves_as_uid_1337_with_no_capability_after_its_post_start_hook(
    netns: str, tmp_path: Path, volume: Path
) -> None:
    container, proc, env = _run_pod(netns, tmp_path, volume, CONFIG, CHART_POLICY)
    try:
        # The kubelet runs the postStart hook in the container, as the container.
        hook = container["lifecycle"]["postStart"]["exec"]["command"]
        waited = subprocess.run(
            [
                *("ip", "netns", "exec", netns),
                *_setpriv(container["securityContext"]),
                *_image_command(hook),
            ],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=150,
        )
        assert waited.returncode == 0, waited.stderr + _log(tmp_path)
        # Ready as soon as the hook returns: the app would start now.
        assert _get(netns, container, container["readinessProbe"]) == 200
        assert _get(netns, container, container["livenessProbe"]) == 200
        assert _capabilities(proc.pid) == (1337, 0)
    finally:
        rc = _stop(proc)
    assert rc == 0, _log(tmp_path)


def test_native_sidecar_passes_its_startup_probe(netns: str, tmp_path: Path, volume: Path) -> None:
    config = dataclasses.replace(CONFIG, kube_version="v1.30.0")
    container, proc, _ = _run_pod(netns, tmp_path, volume, config, CHART_POLICY)
    try:
        probe = container["startupProbe"]
        for _ in range(probe["failureThreshold"]):
            if proc.poll() is not None or _get(netns, container, probe) == 200:
                break
            time.sleep(probe["periodSeconds"])
        assert _get(netns, container, probe) == 200, _log(tmp_path)
        assert _get(netns, container, container["readinessProbe"]) == 200
    finally:
        assert _stop(proc) == 0, _log(tmp_path)


def test_sidecar_loading_the_data_path_needs_exactly_its_three_capabilities(
    netns: str, tmp_path: Path, volume: Path
) -> None:
    """With ``required: true`` the sidecar exits unless the classifier compiled,
    loaded and attached: ready means the injected capabilities were enough."""
    config = dataclasses.replace(CONFIG, datapath=True)
    container, proc, _ = _run_pod(netns, tmp_path, volume, config, DATAPATH_POLICY)
    try:
        ready = False
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if _get(netns, container, container["readinessProbe"]) == 200:
                ready = True
                break
            time.sleep(0.2)
        assert ready, _log(tmp_path)
        uid, eff = _capabilities(proc.pid)
        assert uid == 0
        assert eff == sum(1 << CAP_BITS[c] for c in ("NET_ADMIN", "BPF", "PERFMON"))
        tc = subprocess.run(
            ["ip", "netns", "exec", netns, "tc", "filter", "show", "dev", "eth0", "egress"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert "traffic-color" in tc.stdout
    finally:
        assert _stop(proc) == 0, _log(tmp_path)
