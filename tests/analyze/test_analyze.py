"""``traffic-color analyze`` on Istio's Bookinfo manifests, clean and broken one way at a time.

``bookinfo/bookinfo.yaml`` restates the public sample's objects (Services,
ServiceAccounts, Deployments of productpage, details, ratings and reviews
v1-v3); ``bookinfo/mesh.yaml`` is what a user adds: the namespace opted in, the
policy ConfigMap with a lane route for reviews, and the lane's Service. Each
broken case edits the text the way a user's mistake would and asserts the
finding it must produce: object, file, line, level and exit code.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.analyze import Finding, analyze, load

FIXTURE = Path(__file__).parent / "bookinfo"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    dst = tmp_path / "bookinfo"
    shutil.copytree(FIXTURE, dst)
    return dst


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} not exactly once in {path.name}"
    path.write_text(text.replace(old, new))


def line_of(path: Path, text: str, after: str = "") -> int:
    """1-based line of the first ``text`` at or after the first ``after``."""
    lines = path.read_text().splitlines()
    start = next(i for i, ln in enumerate(lines) if after in ln) if after else 0
    return next(i for i in range(start, len(lines)) if text in lines[i]) + 1


def _doc_start(path: Path, marker: str) -> int:
    lines = path.read_text().splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.strip() == marker)
    while not lines[at].startswith("apiVersion"):
        at -= 1
    return at + 1


def findings(tree: Path) -> list[Finding]:
    docs, bad, _ = load([str(tree)])
    return bad + analyze(docs)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "analyze", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_bookinfo_with_its_policy_is_clean() -> None:
    out = cli("-f", str(FIXTURE))
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "no problems found in 17 objects of 2 file(s)"
    out = cli("-f", str(FIXTURE / "bookinfo.yaml"), "-f", str(FIXTURE / "mesh.yaml"), "--json")
    assert out.returncode == 0
    body = json.loads(out.stdout)
    assert body["findings"] == [] and body["objects"] == 17 and body["files"] == 2


def test_bookinfo_alone_is_not_injected_anywhere() -> None:
    # No Namespace in the set says it is injected: nothing to report.
    assert cli("-f", str(FIXTURE / "bookinfo.yaml")).returncode == 0


def test_labelled_namespace_without_the_policy_configmap(tree: Path) -> None:
    mesh = tree / "mesh.yaml"
    edit(mesh, "name: traffic-color-policy", "name: traffic-color-polcy")
    [f] = findings(tree)
    assert (f.level, f.code, f.object) == ("error", "TC101", "Namespace default")
    assert f.path == str(mesh) and f.line == 3
    assert "no ConfigMap default/traffic-color-policy" in f.message
    assert "Deployment default/reviews-v3" in f.message and "cannot start" in f.message
    out = cli("-f", str(tree))
    assert out.returncode == 1
    assert out.stdout.startswith("Error [TC101] (Namespace default ")


def test_pod_color_the_policy_lacks(tree: Path) -> None:
    info = tree / "bookinfo.yaml"
    for version, color in (("v3", "gold"), ("v2", "canary")):
        labels = f"      labels: {{app: reviews, version: {version}"
        edit(info, labels + "}", labels + f", traffic-color.io/color: {color}}}")
    [f] = findings(tree)
    assert (f.level, f.code, f.object) == ("error", "TC103", "Deployment default/reviews-v3")
    assert f.line == _doc_start(info, "name: reviews-v3")
    assert "pod color 'gold'" in f.message and "(stable, canary)" in f.message


def test_opt_out_in_an_injected_namespace_is_a_warning(tree: Path) -> None:
    info = tree / "bookinfo.yaml"
    edit(
        info,
        "      labels: {app: ratings, version: v1}",
        "      labels: {app: ratings, version: v1}\n"
        '      annotations: {traffic-color.io/inject: "false"}',
    )
    [f] = findings(tree)
    assert (f.level, f.code, f.object) == ("warning", "TC104", "Deployment default/ratings-v1")
    assert f.line == _doc_start(info, "name: ratings-v1")
    out = cli("-f", str(tree))
    assert out.returncode == 0, "warnings alone exit 0"
    assert out.stdout.startswith("Warning [TC104] (Deployment default/ratings-v1 ")


def test_service_bypasses_the_sidecar_where_capture_is_off(tree: Path) -> None:
    info = tree / "bookinfo.yaml"
    edit(
        info,
        '        prometheus.io/scrape: "true"',
        '        prometheus.io/scrape: "true"\n        traffic-color.io/capture: "false"',
    )
    [f] = findings(tree)
    assert (f.level, f.code, f.object) == ("warning", "TC105", "Service default/productpage")
    assert f.line == _doc_start(info, "name: productpage")
    assert "port 9080 goes to targetPort 9080 of Deployment default/productpage-v1" in f.message
    # Pointing the Service at the sidecar's inbound port is the fix.
    edit(
        info,
        "    - {name: http, port: 9080}\n  selector: {app: productpage}",
        "    - {name: http, port: 9080, targetPort: tc-inbound}\n  selector: {app: productpage}",
    )
    assert findings(tree) == []


def test_lane_route_to_a_service_not_in_the_set(tree: Path) -> None:
    mesh = tree / "mesh.yaml"
    edit(
        mesh,
        "            canary: reviews-v2:9080",
        "            canary: reviews-v2:9080\n"
        "            blue: reviews-v3.default.svc.cluster.local",
    )
    edit(
        mesh, "      canary: {mark: 0x2}\n", "      canary: {mark: 0x2}\n      blue: {mark: 0x4}\n"
    )
    [f] = findings(tree)
    assert (f.level, f.code) == ("error", "TC106")
    assert f.object == "ConfigMap default/traffic-color-policy"
    assert f.line == line_of(mesh, "blue: reviews-v3")
    assert "Service default/reviews-v3 is not in the set" in f.message
    # Removing the lane's Service breaks the canary lane too.
    edit(mesh, "  name: reviews-v2\n", "  name: reviews-v2-old\n")
    assert [x.code for x in findings(tree)] == ["TC106", "TC106"]


def test_rejected_policy_points_at_the_manifest_line(tree: Path) -> None:
    mesh = tree / "mesh.yaml"
    edit(mesh, "      canary: {mark: 0x2}", "      canary: {mark: 0x1}")
    [f] = findings(tree)
    assert (f.level, f.code) == ("error", "TC102")
    assert f.line == line_of(mesh, "canary: {mark: 0x1}")
    assert "duplicate mark 0x1" in f.message


def test_unreadable_yaml_is_an_error_with_its_line(tree: Path) -> None:
    bad = tree / "broken.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: [x\n")
    [f] = findings(tree)
    assert (f.level, f.code, f.path) == ("error", "TC100", str(bad))
    assert f.line == 4 and "flow sequence started at line 3" in f.message


def test_already_injected_manifests_are_read_by_their_sidecar(tree: Path) -> None:
    injected = subprocess.run(
        [sys.executable, "-m", "sidecar", "inject", "-f", str(tree / "bookinfo.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=True,
    ).stdout
    (tree / "bookinfo.yaml").write_text(injected)
    assert findings(tree) == []
    # The sidecars mount the policy ConfigMap whether or not the namespace is labelled.
    edit(tree / "mesh.yaml", "traffic-color.io/inject: enabled", "team: books")
    edit(tree / "mesh.yaml", "name: traffic-color-policy", "name: other-policy")
    [f] = findings(tree)
    assert f.code == "TC101" and f.object == "Deployment default/details-v1"
    assert "Deployment default/productpage-v1" in f.message


def test_a_lane_without_namespace_takes_the_routes(tree: Path) -> None:
    mesh = tree / "mesh.yaml"
    edit(
        mesh,
        "            canary: reviews-v2:9080\n",
        "            canary: reviews-v2:9080\n"
        "        - host: ratings.books\n"
        "          lanes: {canary: ratings-v2}\n",
    )
    [f] = findings(tree)
    assert f.code == "TC106" and "Service books/ratings-v2 is not in the set" in f.message
    assert f.line == line_of(mesh, "lanes: {canary: ratings-v2}")
