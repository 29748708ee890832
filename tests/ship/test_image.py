"""The image, built for real by ``make image``'s script (buildah, no Docker engine).

One build per session (``.ci/image.sh``: debootstrap base cached under
/var/cache/traffic-color, ``buildah bud`` with vfs storage and chroot
isolation), then ``buildah run`` answers what a user would ask the image.
Needs root; in CI it always runs (a skip there is a failure).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar import __version__
from tests.conftest import require_root
from tests.ship.tools import REPO

pytestmark = [pytest.mark.image, pytest.mark.root]

CACHE = Path(os.environ.get("TRAFFIC_COLOR_CACHE", "/var/cache/traffic-color"))
# A tag of this run's own, removed at the end: runs side by side (other sessions, CI
# jobs on one machine) share the storage, and must not retag or prune each other's.
IMAGE = f"localhost/traffic-color:{__version__}-test-{os.getpid()}-{secrets.token_hex(3)}"
STORAGE = [
    "--root",
    str(CACHE / "storage"),
    "--runroot",
    str(CACHE / "run"),
    "--storage-driver",
    "vfs",
]
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")


@dataclass
class Built:
    output: str
    seconds: float
    container: str

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["buildah", *STORAGE, "run", "--isolation", "chroot", self.container, "--", *command],
            capture_output=True,
            text=True,
            timeout=120,
            check=check,
        )


@pytest.fixture(scope="session")
def built() -> Iterator[Built]:
    require_root("building the image needs root (debootstrap, buildah chroot isolation)")
    start = time.monotonic()
    env = {**os.environ, "IMAGE": IMAGE}
    result = subprocess.run(
        ["bash", ".ci/image.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800
    )
    try:
        seconds = time.monotonic() - start
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-4000:]
        print(f"\n.ci/image.sh took {seconds:.0f} s")
        ctr = subprocess.run(
            ["buildah", *STORAGE, "from", "--pull-never", IMAGE],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        ).stdout.strip()
        try:
            yield Built(output, seconds, ctr)
        finally:
            subprocess.run(["buildah", *STORAGE, "rm", ctr], capture_output=True, timeout=120)
    finally:
        # Our tag only (the layers stay cached), while no build beside us prunes.
        subprocess.run(
            ["flock", "-w", "1800", str(CACHE / "build.lock"), "buildah", *STORAGE, "rmi", IMAGE],
            capture_output=True,
            timeout=1900,
        )


def test_smoke_answers_version_and_checks_the_example_policy(built: Built) -> None:
    assert f"traffic-color {__version__}\n" in built.output
    assert "/etc/traffic-color/policy.yaml: ok (3 colors" in built.output


def image_config() -> dict:
    """The built image's OCI config (entrypoint, cmd, labels, ports)."""
    info = subprocess.run(
        ["buildah", *STORAGE, "inspect", "--type", "image", IMAGE],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return json.loads(info)["OCIv1"]["config"]


def test_entrypoint_cmd_and_labels(built: Built) -> None:
    config = image_config()
    assert config["Entrypoint"] == ["traffic-color"]
    assert config["Cmd"] == ["run"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.title"] == "traffic-color"
    assert {"15001/tcp", "15006/tcp", "15090/tcp"} <= set(config["ExposedPorts"])


def test_venv_imports_debian_bcc_and_the_package(built: Built) -> None:
    result = built.run(
        "python",
        "-c",
        "import bcc, sidecar, sidecar.bpf, importlib.resources as r;"
        "print(bcc.__file__);"
        "print(sorted(p.name for p in r.files('sidecar.bpf').iterdir()"
        " if p.name.endswith(('.c', '.h'))))",
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith("/opt/traffic-color/lib/python3.11/site-packages/bcc/")
    assert "classifier.c" in lines[1]
    libs = built.run("sh", "-c", "ls /usr/lib/x86_64-linux-gnu/ | grep -E '^lib(bcc|bpf)\\.so'")
    assert "libbcc.so.0" in libs.stdout and "libbpf.so.1" in libs.stdout
    assert built.run("ip", "-V").returncode == 0


def test_no_build_tools_in_the_final_image(built: Built) -> None:
    for name in ("gcc", "cc", "make", "pip", "pip3", "apt-get install"):
        found = built.run("sh", "-c", f"command -v {name.split()[0]}", check=False)
        if name.startswith("apt-get"):
            continue  # apt itself is part of any Debian base
        assert found.returncode != 0, f"{name} found at {found.stdout.strip()}"
    assert built.run("test", "-e", "/opt/traffic-color/bin/pip", check=False).returncode != 0
    assert built.run("test", "-e", "/src", check=False).returncode != 0


def test_build_ca_bundle_is_not_in_the_image(built: Built) -> None:
    assert built.run("test", "-e", "/run/secrets/ca-bundle", check=False).returncode != 0
    digest = hashlib.sha256(HOST_CA.read_bytes()).hexdigest()
    sums = built.run(
        "sh",
        "-c",
        "find /etc /opt /run /usr/local /root /tmp -type f -size +10k "
        "-exec sha256sum {} + 2>/dev/null || true",
    )
    assert digest not in sums.stdout


def test_the_commands_injection_writes_into_pods_run_in_the_image(
    built: Built, tmp_path: Path
) -> None:
    """The capture init container's args, the postStart hook and the sidecar's args,
    as injected, run in the image as the uid each one runs as, with the chart's policy
    where the pod mounts it."""
    import yaml

    from sidecar.inject.mutation import POLICY_DIR, InjectConfig, inject_pod

    pod = {
        "metadata": {
            "name": "p",
            "annotations": {"traffic-color.io/exclude-outbound-ports": "5432"},
        },
        "spec": {"containers": [{"name": "a", "image": "a"}]},
    }
    injected, _ = inject_pod(pod, InjectConfig(image=IMAGE))
    (capture,) = injected["spec"]["initContainers"]
    sidecar = injected["spec"]["containers"][0]
    values = yaml.safe_load((REPO / "charts/traffic-color/values.yaml").read_text())
    (tmp_path / "policy.yaml").write_text(values["policy"]["content"])
    (tmp_path / "policy.yaml").chmod(0o644)
    tmp_path.chmod(0o755)

    def run_as(container: dict, *command: str) -> subprocess.CompletedProcess[str]:
        uid = container["securityContext"]["runAsUser"]
        return subprocess.run(
            [
                *("buildah", *STORAGE, "run", "--isolation", "chroot"),
                *("--user", f"{uid}:{uid}", "--volume", f"{tmp_path}:{POLICY_DIR}:ro"),
                *(built.container, "--", *command),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )

    # The image's entrypoint is traffic-color: args are a command of it.
    dry = run_as(capture, "traffic-color", *capture["args"], "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "redirect" in dry.stdout and "5432" in dry.stdout
    # Nothing serves /readyz in the build container: the hook waits, then says why.
    hook = sidecar["lifecycle"]["postStart"]["exec"]["command"]
    assert hook[-2] == "--timeout"
    waited = run_as(sidecar, *hook[:-1], "1")
    assert waited.returncode == 1, waited.stderr
    assert "wait-ready: http://127.0.0.1:15090/readyz not ready after 1 s" in waited.stderr
    args = run_as(sidecar, "traffic-color", *sidecar["args"], "--help")
    assert args.returncode == 0 and "--policy" in args.stdout


# ------------------------------------------------------- the chart's node agent


# linux/capability.h, in bit order.
LINUX_CAPS = (
    *("CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID"),
    *("SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST"),
    *("NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO"),
    *("SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE"),
    *("SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE"),
    *("AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM"),
    *("BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE"),
)


def _container_run_args(pod: dict, container: dict, configmaps: dict, tmp: Path) -> list[str]:
    """``buildah run`` options for what the pod spec gives the container.

    Its user and capabilities (every other dropped), each volume mount (a
    ConfigMap as a directory of its keys, an emptyDir as a fresh directory, a
    hostPath as itself; read-only where the spec says so) and its env.
    """
    ctx = container["securityContext"]
    uid = ctx["runAsUser"]
    assert ctx["capabilities"]["drop"] == ["ALL"]
    add = ctx["capabilities"]["add"]
    # buildah applies --cap-drop after --cap-add (so "all" would drop the added ones too):
    # name every other capability instead.
    out = ["--user", f"{uid}:{uid}", *(f"--cap-add=CAP_{c}" for c in add)]
    out += [f"--cap-drop=CAP_{c}" for c in LINUX_CAPS if c not in add]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for mount in container["volumeMounts"]:
        vol = volumes[mount["name"]]
        if "configMap" in vol:
            src = tmp / mount["name"]
            src.mkdir(mode=0o755)
            for key, text in configmaps[vol["configMap"]["name"]].items():
                (src / key).write_text(text)
                (src / key).chmod(0o644)
        elif "emptyDir" in vol:
            src = tmp / mount["name"]
            src.mkdir(mode=0o1777)
        else:
            src = Path(vol["hostPath"]["path"])
        ro = ":ro" if mount.get("readOnly") else ""
        out += ["--volume", f"{src}:{mount['mountPath']}{ro}"]
    for env in container.get("env", []):
        out += ["--env", f"{env['name']}={env['value']}"]
    return out


def _runtime_default_seccomp(path: Path) -> Path:
    """The host's containers-common default profile, with bpf() and perf_event_open()
    allowed for CAP_BPF and CAP_PERFMON as moby's RuntimeDefault allows them.

    containers-common 0.50 (Debian 12's, which buildah applies) allows both only
    with CAP_SYS_ADMIN; a RuntimeDefault that predates CAP_BPF refuses the chart's
    three capabilities the same way (see the chart's README).
    """
    profile = json.loads(Path("/usr/share/containers/seccomp.json").read_text())
    gated = ("bpf", "perf_event_open")
    for rule in profile["syscalls"]:
        if rule["action"] != "SCMP_ACT_ALLOW":
            rule["names"] = [n for n in rule["names"] if n not in gated]
    profile["syscalls"] = [r for r in profile["syscalls"] if r["names"]]
    for name, cap in zip(gated, ("CAP_BPF", "CAP_PERFMON"), strict=True):
        profile["syscalls"].append(
            {"names": [name], "action": "SCMP_ACT_ALLOW", "includes": {"caps": [cap]}}
        )
    path.write_text(json.dumps(profile))
    return path


def _in_netns_http(netns: str, port: int, path: str) -> tuple[int, str]:
    from tests.netns.netnsutil import ns_http_get

    return ns_http_get(netns, port, path)


def _ours_in(netns: str) -> list[str]:
    """Every filter, rule and route of ours in ``netns``, and every process left there."""
    from tests.netns.netnsutil import ip, tc

    out = []
    for line in ip("-o", "link", netns=netns).splitlines():
        dev = line.split(":")[1].strip().split("@")[0]
        shown = tc("filter", "show", "dev", dev, "ingress", netns=netns, check=False)
        out += [f"{dev}: {x}" for x in shown.splitlines() if "traffic-color" in x]
        if "clsact" in tc("qdisc", "show", "dev", dev, netns=netns, check=False):
            out.append(f"{dev}: clsact")
    for fam in ("-4", "-6"):
        out += [x for x in ip(fam, "rule", netns=netns).splitlines() if "proto 165" in x]
        routes = ip(fam, "route", "show", "table", "all", netns=netns)
        out += [x for x in routes.splitlines() if "proto 165" in x]
    pids = subprocess.run(
        ["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=20
    ).stdout.split()
    return out + [f"pid {p} still in the node namespace" for p in pids]


@dataclass
class NodeAgentPod:
    """The chart's node agent DaemonSet, its container started from the image in ``node``."""

    pod: dict
    container: dict
    node: str
    proc: subprocess.Popen
    log: Path

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    @property
    def port(self) -> int:
        return self.container["ports"][0]["containerPort"]


@contextlib.contextmanager
def node_agent_pod(tmp_path: Path, seccomp: Path | None) -> Iterator[NodeAgentPod]:
    """The walk-through's values (examples/node-agent-values.yaml), rendered and run.

    ``node`` is a namespace built here, as the host network the DaemonSet asks
    for: a pod's host-side veth (``veth*``) and the canary gateway's network.
    The container runs with the image's entrypoint and the container's args,
    user, capabilities and mounts (``_container_run_args``) under ``seccomp``
    (None: the host's containers-common default, which buildah applies).
    """
    from tests.netns.netnsutil import Lab, ip
    from tests.ship.test_chart import _agent, find, render

    docs = render("example-node-agent")
    daemonset, _ = _agent(docs)
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True  # the node's namespace: here, one built below
    (container,) = pod["containers"]
    configmaps = {cm["metadata"]["name"]: cm["data"] for cm in find(docs, "ConfigMap")}
    tmp_path.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp_path.chmod(0o755)
    run_args = _container_run_args(pod, container, configmaps, tmp_path)
    command = [*image_config()["Entrypoint"], *container.get("command", []), *container["args"]]
    opts = ["--security-opt", f"seccomp={seccomp}"] if seccomp else []
    ctr = subprocess.run(
        [
            *("buildah", *STORAGE, "from", "--pull-never", *opts),
            *("--name", f"tcnode-{secrets.token_hex(4)}", IMAGE),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout.strip()
    with contextlib.ExitStack() as cleanup, Lab() as lab:
        cleanup.callback(
            subprocess.run, ["buildah", *STORAGE, "rm", ctr], capture_output=True, timeout=120
        )
        node, app, gateway = lab.netns("tcdsn"), lab.netns("tcdsp"), lab.netns("tcdsg")
        lab.veth(app, "eth0", node, "veth-app")
        lab.veth(node, "uplink", gateway, "gw0")
        ip("addr", "add", "10.0.0.1/24", "dev", "uplink", netns=node)
        log = tmp_path / "agent.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [
                    *("ip", "netns", "exec", node, "buildah", *STORAGE, "run"),
                    *("--isolation", "chroot", *run_args, ctr, "--", *command),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            yield NodeAgentPod(pod, container, node, proc, log)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_the_charts_node_agent_runs_as_its_daemonset_says(built: Built, tmp_path: Path) -> None:
    """With a RuntimeDefault that knows CAP_BPF: ready, attached, routed, clean on SIGTERM.

    The agent compiles its classifier with the host's headers through the
    mounts the chart gives, holds the chart's three capabilities and no other,
    attaches to the pod interface its globs name, installs the canary route,
    answers /readyz on the port the probes ask, and leaves nothing on SIGTERM.
    """
    from tests.netns.netnsutil import ip

    seccomp = _runtime_default_seccomp(tmp_path / "seccomp.json")
    with node_agent_pod(tmp_path / "pod", seccomp) as agent:
        probe = agent.container["readinessProbe"]["httpGet"]
        assert probe["port"] == agent.container["ports"][0]["name"]
        deadline = time.monotonic() + 180
        while True:
            assert agent.proc.poll() is None, agent.tail()
            assert time.monotonic() < deadline, agent.tail()
            with contextlib.suppress(OSError, ValueError, IndexError):
                if _in_netns_http(agent.node, agent.port, probe["path"])[0] == 200:
                    break
            time.sleep(0.2)
        status = json.loads(_in_netns_http(agent.node, agent.port, "/status")[1])
        assert {i["interface"] for i in status["datapath"]["interfaces"]} == {"veth-app"}
        assert "203.0.113.0/24 via 10.0.0.254 dev uplink proto 165" in ip(
            "route", "show", "table", "102", netns=agent.node
        )
        assert _ours_in(agent.node) != [], "the check below must be able to fail"
        # What kubelet does at a pod's deletion: SIGTERM to the container's process
        # (the venv's python running the entrypoint; buildah-chroot-exec is its parent).
        entry = [b"/opt/traffic-color/bin/python3", b"/opt/traffic-color/bin/traffic-color"]
        agents = [
            int(p)
            for p in subprocess.run(
                ["ip", "netns", "pids", agent.node], capture_output=True, text=True, timeout=20
            ).stdout.split()
            if Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[:3] == [*entry, b"node"]
        ]
        assert len(agents) == 1, agents
        # The securityContext, as the kernel sees it: the chart's capabilities, no other.
        status_lines = Path(f"/proc/{agents[0]}/status").read_text().splitlines()
        eff = int(next(x for x in status_lines if x.startswith("CapEff:")).split()[1], 16)
        add = agent.container["securityContext"]["capabilities"]["add"]
        assert eff == sum(1 << LINUX_CAPS.index(c) for c in add), f"{eff:#x}"
        os.kill(agents[0], signal.SIGTERM)
        code = agent.proc.wait(agent.pod["terminationGracePeriodSeconds"])
        assert code == 0, agent.tail()
        assert _ours_in(agent.node) == [], agent.tail()


def test_a_runtime_default_without_cap_bpf_gets_told_why(built: Built, tmp_path: Path) -> None:
    """containers-common 0.50's profile (bpf() only with CAP_SYS_ADMIN) refuses the chart's
    three capabilities: the agent exits, says it is the seccomp filter, leaves nothing."""
    with node_agent_pod(tmp_path / "pod", None) as agent:
        code = agent.proc.wait(180)
        text = agent.log.read_text(errors="replace")
        assert code != 0, text[-4000:]
        assert "node agent cannot start: compile: the kernel refused" in text, text[-4000:]
        assert "yet bpf() was refused under a seccomp filter" in text, text[-4000:]
        assert _ours_in(agent.node) == [], text[-4000:]
