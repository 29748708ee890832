"""``traffic-color check`` on ConfigMap manifests: the policy inside, lines of the file."""

from __future__ import annotations

from pathlib import Path

from tests.unit.test_cli import run

REPO = Path(__file__).resolve().parents[2]

BAD = """\
# the app's manifests, with the policy ConfigMap among them
apiVersion: v1
kind: Service
metadata: {name: shop}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: traffic-color-policy
  namespace: shop
data:
  other.txt: hello
  policy.yaml: |
    colors:
      stable: {mark: 0x1}
      canary: {mark: 0x1ff}
    timeouts: {drain_accept: -2}
"""


def test_check_reads_the_shipped_example_configmap() -> None:
    f = REPO / "examples/k8s/policy.yaml"
    out = run("check", str(f))
    assert out.returncode == 0, out.stderr
    assert "(ConfigMap traffic-demo/traffic-color-policy data.policy.yaml): ok" in out.stdout


def test_errors_point_at_lines_of_the_manifest_file(tmp_path: Path) -> None:
    f = tmp_path / "shop.yaml"
    f.write_text(BAD)
    out = run("check", str(f))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith(f"{f}:17: colors.canary.mark: 0x1ff has bits outside mark_mask")
    assert lines[1].startswith(f"{f}:18: timeouts.drain_accept: expected a positive number")
    assert lines[0].endswith("(ConfigMap shop/traffic-color-policy data.policy.yaml)")
    assert len(lines) == 2


def test_a_manifest_without_the_policy_key_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "cm.yaml"
    f.write_text(BAD.replace("policy.yaml: |", "policy.yml: |"))
    out = run("check", str(f))
    assert out.returncode == 1
    assert "no ConfigMap with data key 'policy.yaml'" in out.stderr
    assert "ConfigMap shop/traffic-color-policy" in out.stderr
    out = run("check", "--key", "policy.yml", str(f))
    assert out.returncode == 1 and f"{f}:17: colors.canary.mark" in out.stderr


def test_a_quoted_policy_value_reports_the_key_line(tmp_path: Path) -> None:
    f = tmp_path / "cm.yaml"
    f.write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: p}\ndata:\n"
        '  policy.yaml: "colors: {stable: {mark: 0x1ff}}"\n'
    )
    out = run("check", str(f))
    assert out.returncode == 1
    assert out.stderr.startswith(f"{f}:5: colors.stable.mark: 0x1ff has bits outside")
