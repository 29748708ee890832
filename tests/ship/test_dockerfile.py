"""The Dockerfile: hadolint at warning level, and the promises the image makes."""

from __future__ import annotations

import json
import re
import subprocess

from tests.ship.tools import REPO, tool

DOCKERFILE = REPO / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_clean_at_warning_level() -> None:
    result = subprocess.run(
        [
            tool("hadolint"),
            "--config",
            str(REPO / ".hadolint.yaml"),
            "--failure-threshold",
            "warning",
            str(DOCKERFILE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_is_a_build_arg_defaulting_to_bookworm_slim() -> None:
    ins = _instructions()
    assert ins[0] == ("ARG", "BASE=debian:bookworm-slim")
    froms = [rest for word, rest in ins if word == "FROM"]
    assert froms == ["${BASE} AS build", "${BASE}"]


def test_entrypoint_and_cmd() -> None:
    ins = dict(_instructions()[::-1])  # last one wins, as in Docker
    assert json.loads(ins["ENTRYPOINT"]) == ["traffic-color"]
    assert json.loads(ins["CMD"]) == ["run"]


def test_run_time_packages_and_no_build_tools_in_the_final_stage() -> None:
    ins = _instructions()
    final = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM") :]
    runs = " ".join(rest for word, rest in final if word == "RUN")
    for package in ("python3-bpfcc", "libbpfcc", "libbpf1", "iproute2", "python3-nftables"):
        assert re.search(rf"\b{package}\b", runs), package
    for tool_name in ("gcc", "build-essential", "python3-pip", "python3-venv", "pip install"):
        assert tool_name not in runs, tool_name
    assert "--no-install-recommends" in runs
    assert "/usr/lib/python3/dist-packages/bcc" in runs  # Debian's bcc linked into the venv
    assert "/usr/lib/python3/dist-packages/nftables" in runs  # and its nftables (capture)
    labels = " ".join(rest for word, rest in final if word == "LABEL")
    for key in ("title", "description", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_ca_bundle_is_an_arg_never_copied_or_set_in_env() -> None:
    ins = _instructions()
    assert ("ARG", 'CA_BUNDLE=""') in ins
    pip_runs = [rest for word, rest in ins if word == "RUN" and "pip install" in rest]
    assert len(pip_runs) == 1
    assert pip_runs[0].startswith("--mount=type=secret,id=ca-bundle,required=false ")
    for word, rest in ins:
        if word in ("ENV", "COPY", "ADD", "LABEL"):
            assert "CA_BUNDLE" not in rest and "ca-certificates.crt" not in rest, (word, rest)


def test_dockerignore_sends_only_the_package() -> None:
    lines = [
        x for x in (REPO / ".dockerignore").read_text().splitlines() if x and not x.startswith("#")
    ]
    assert lines[0] == "*"
    assert {x[1:].rstrip("/") for x in lines if x.startswith("!")} == {
        "pyproject.toml",
        "setup.py",  # builds the nghttp2 binding
        "README.md",
        "sidecar",
        "bpf",
    }
