"""``traffic-color inject -f FILE|-`` as a user runs it: a subprocess, stdin or a file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"


def _inject(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "inject", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


def test_reads_stdin_and_writes_injected_yaml() -> None:
    text = (GOLDEN / "deployment.in.yaml").read_text()
    result = _inject("-f", "-", stdin=text)
    assert result.returncode == 0, result.stderr
    doc = yaml.safe_load(result.stdout)
    names = [c["name"] for c in doc["spec"]["template"]["spec"]["containers"]]
    assert names == ["traffic-color", "web"]  # first, so the app waits for it
    assert result.stderr == "traffic-color inject: Deployment/shop: injected\n"


def test_reads_a_file_with_several_documents(tmp_path: Path) -> None:
    path = tmp_path / "two.yaml"
    path.write_text(
        (GOLDEN / "pod.in.yaml").read_text() + "---\n" + (GOLDEN / "job.in.yaml").read_text()
    )
    result = _inject("-f", str(path))
    assert result.returncode == 0, result.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(result.stdout)]
    assert kinds == ["Pod", "Job"]
    assert result.stderr.splitlines() == [
        "traffic-color inject: Pod/debug: injected",
        "traffic-color inject: Job/migrate: injected",
    ]


def test_settings_file_shapes_the_sidecar(tmp_path: Path) -> None:
    settings = tmp_path / "inject.yaml"
    settings.write_text("image: registry.example/tc:9\nnativeSidecar: true\n")
    result = _inject("-f", str(GOLDEN / "pod.in.yaml"), "--config", str(settings))
    assert result.returncode == 0, result.stderr
    pod = yaml.safe_load(result.stdout)
    assert pod["spec"]["initContainers"][0]["image"] == "registry.example/tc:9"


def test_kube_version_picks_native_sidecars() -> None:
    pod = (GOLDEN / "pod.in.yaml").read_text()
    native = yaml.safe_load(_inject("-f", "-", "--kube-version", "v1.30.2", stdin=pod).stdout)
    assert [c["name"] for c in native["spec"]["initContainers"]] == [
        "traffic-color-capture",
        "traffic-color",
    ]
    old = yaml.safe_load(_inject("-f", "-", "--kube-version", "1.28", stdin=pod).stdout)
    assert [c["name"] for c in old["spec"]["containers"]] == ["traffic-color", "shell"]


def test_a_bad_annotation_names_the_object_and_exits_2() -> None:
    doc = yaml.safe_load((GOLDEN / "deployment.in.yaml").read_text())
    doc["spec"]["template"]["metadata"]["annotations"] = {"traffic-color.io/proxy-cpu": "lots"}
    result = _inject("-f", "-", stdin=yaml.safe_dump(doc))
    assert result.returncode == 2
    assert result.stderr == (
        "traffic-color inject: -: Deployment/shop: annotation traffic-color.io/proxy-cpu: "
        "'lots' is not a positive Kubernetes quantity\n"
    )
    assert result.stdout == ""


def test_bad_input_exits_2_with_the_reason(tmp_path: Path) -> None:
    result = _inject("-f", "-", stdin="a: [\n")
    assert result.returncode == 2
    assert result.stderr.startswith("traffic-color inject: -: ")
    missing = _inject("-f", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2
    assert "No such file" in missing.stderr
    typo = tmp_path / "typo.yaml"
    typo.write_text("imagee: x\n")
    bad = _inject("-f", str(GOLDEN / "pod.in.yaml"), "--config", str(typo))
    assert bad.returncode == 2
    assert "unknown injection setting 'imagee'" in bad.stderr
