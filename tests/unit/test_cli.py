"""The command line as a user runs it: exit codes and what is printed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sidecar import __version__


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_version() -> None:
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"traffic-color {__version__}"


def test_check_accepts_a_valid_policy(tmp_path: Path) -> None:
    f = tmp_path / "ok.yaml"
    f.write_text("colors:\n  stable: {mark: 1}\n  canary: {mark: 2}\n")
    out = run("check", str(f))
    assert out.returncode == 0, out.stderr
    assert "ok (2 colors" in out.stdout


def test_check_prints_file_line_reason_for_each_error(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("colors:\n  stable: {mark: 1}\n  canary: {mark: 0x1ff}\nextra: true\n")
    out = run("check", str(f))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith(f"{f}:3: colors.canary.mark: 0x1ff has bits outside mark_mask")
    assert lines[1].startswith(f"{f}:4: policy: unknown key 'extra'")


def test_check_rejects_an_undefined_pod_color(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("colors:\n  stable: {mark: 1}\n")
    out = run("check", str(f), env={"TRAFFIC_COLOR": "canary"})
    assert out.returncode == 1
    assert "pod color 'canary' (TRAFFIC_COLOR) is not defined" in out.stderr


def test_check_of_a_missing_file(tmp_path: Path) -> None:
    out = run("check", str(tmp_path / "nope.yaml"))
    assert out.returncode == 1 and "cannot read" in out.stderr


def test_run_refuses_an_undefined_pod_color() -> None:
    out = run("run", "--color", "gold")
    assert out.returncode == 1
    assert "pod color 'gold'" in out.stderr
