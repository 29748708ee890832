"""``traffic-color capture`` against the kernel, in a namespace of the test's own.

Tables are read back with the ``nft`` tool, independently of the code that made them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns.netnsutil import Lab

POLICY = """\
version: 1
capture:
  enabled: true
  outbound: {exclude_ports: [22]}
"""


@pytest.fixture
def ns():
    with Lab() as lab:
        yield lab.netns("tcapt")


def _cli(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "sidecar", "capture", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _tables(ns: str) -> list[tuple[str, str]]:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-j", "list", "tables"],
        capture_output=True,
        text=True,
        check=True,
        timeout=20,
    ).stdout
    return [
        (e["table"]["family"], e["table"]["name"])
        for e in json.loads(out)["nftables"]
        if "table" in e
    ]


def _ruleset(ns: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "list", "ruleset"],
        capture_output=True,
        text=True,
        check=True,
        timeout=20,
    ).stdout


@pytest.mark.root
def test_install_is_idempotent_show_lists_it_and_remove_leaves_nothing(ns, tmp_path: Path):
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    for _ in range(2):
        proc = _cli(ns, "install", "--policy", str(policy))
        assert proc.returncode == 0, proc.stderr
    assert _tables(ns) == [("inet", "traffic_color")]
    text = _ruleset(ns)
    assert "redirect to :15001" in text and "redirect to :15006" in text
    assert text.count("chain output") == 1, "installed twice, the table holds one set of rules"
    assert "tcp dport 22 return" in text
    shown = _cli(ns, "show")
    assert shown.returncode == 0 and '"traffic_color"' in shown.stdout
    for _ in range(2):
        proc = _cli(ns, "remove")
        assert proc.returncode == 0, proc.stderr
    assert _tables(ns) == []
    assert _cli(ns, "show").returncode == 1


@pytest.mark.root
def test_other_tables_are_never_touched(ns, tmp_path: Path):
    subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "add", "table", "inet", "someone_else"],
        check=True,
        timeout=20,
    )
    assert _cli(ns, "install").returncode == 0
    assert _cli(ns, "remove").returncode == 0
    assert _tables(ns) == [("inet", "someone_else")]


@pytest.mark.root
def test_dry_run_prints_the_ruleset_and_touches_nothing(ns, tmp_path: Path):
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    before = _ruleset(ns)
    proc = _cli(ns, "install", "--policy", str(policy), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    cmds = json.loads(proc.stdout)["nftables"]
    assert {"add": {"table": {"family": "inet", "name": "traffic_color"}}} in cmds
    assert _ruleset(ns) == before == ""
    # A leftover stays through a dry-run removal too.
    assert _cli(ns, "install").returncode == 0
    assert _cli(ns, "remove", "--dry-run").returncode == 0
    assert _tables(ns) == [("inet", "traffic_color")]


@pytest.mark.root
def test_a_rejected_ruleset_keeps_the_table_there_was(ns, tmp_path: Path):
    """One transaction: when the kernel refuses part of it, nothing changes."""
    from sidecar.datapath import capture
    from sidecar.policy import Capture

    assert _cli(ns, "install").returncode == 0
    before = _ruleset(ns)
    bad = capture.ruleset(Capture(enabled=True), capture.Ports(15001, 15006, 15090))
    bad["nftables"].append(
        {
            "add": {
                "rule": {
                    "family": "inet",
                    "table": "traffic_color",
                    "chain": "nope",
                    "expr": [{"accept": None}],
                }
            }
        }
    )
    # Through the sidecar's own path: the nftables child, its answer in spawn's envelope.
    code = (
        "import json,sys\n"
        "from sidecar.datapath import capture\n"
        "from sidecar.errors import DatapathError\n"
        "try:\n    capture.run_nft_child(json.loads(sys.stdin.read()))\n"
        "except DatapathError as e:\n"
        "    print(json.dumps({'step': e.step, 'code': e.code, 'text': str(e)}))\n"
    )
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", code],
        input=json.dumps(bad),
        capture_output=True,
        text=True,
        timeout=60,
    )
    refused = json.loads(proc.stdout or "null")
    assert refused is not None, proc.stderr[-2000:]
    assert refused["step"] == "capture" and isinstance(refused["code"], int)  # nft_run_cmd rc
    # libnftables' own words, once: the child's step is not repeated in the message.
    text = refused["text"]
    assert text.startswith("capture: ") and not text.startswith("capture: capture")
    assert "Could not process rule: No such file" in text
    assert _ruleset(ns) == before
