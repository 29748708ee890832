"""The image, built for real by ``make image``'s script (buildah, no Docker engine).

One build per session (``.ci/image.sh``: debootstrap base cached under
/var/cache/traffic-color, ``buildah bud`` with vfs storage and chroot
isolation), then ``buildah run`` answers what a user would ask the image.
Needs root; in CI it always runs (a skip there is a failure).
"""

from __future__ import annotations

import hashlib
import json
import os
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
IMAGE = f"localhost/traffic-color:{__version__}"
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
    result = subprocess.run(
        ["bash", ".ci/image.sh"], cwd=REPO, capture_output=True, text=True, timeout=1800
    )
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


def test_smoke_answers_version_and_checks_the_example_policy(built: Built) -> None:
    assert f"traffic-color {__version__}\n" in built.output
    assert "/etc/traffic-color/policy.yaml: ok (3 colors" in built.output


def test_entrypoint_cmd_and_labels(built: Built) -> None:
    info = json.loads(
        subprocess.run(
            ["buildah", *STORAGE, "inspect", "--type", "image", IMAGE],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    )
    config = info["OCIv1"]["config"]
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
