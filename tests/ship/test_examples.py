"""examples/: the documented policy parses and shows every key; the demo app is coherent."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from sidecar.inject.mutation import (
    INBOUND_PORT,
    LABEL_COLOR,
    PORT_NAMES,
    InjectConfig,
    inject_object,
)
from sidecar.policy import Timeouts, parse_policy
from tests.inject.k8s import schema_errors
from tests.ship.tools import REPO

EXAMPLES = REPO / "examples"
K8S = sorted((EXAMPLES / "k8s").glob("*.yaml"))

# Every key the policy format has (sidecar/policy.py), by section.
POLICY_KEYS = {
    "top": [
        "version",
        "header",
        "default_color",
        "mark_mask",
        "colors",
        "inbound",
        "outbound",
        "admin",
        "timeouts",
        "datapath",
        "baggage",
    ],
    "outbound": ["listen", "routes", "cluster_domain"],
    "outbound.routes[]": ["host", "lanes", "fallback"],
    "baggage": ["key"],
    "colors.NAME": ["mark", "priority", "dscp"],
    "inbound": ["listen", "app", "trust_header", "trusted_sources", "rules"],
    "inbound.rules[]": [
        "match",
        "color",
        "split",
        "sticky_key",
        "header",
        "cookie",
        "name",
        "value",
    ],
    "timeouts": list(Timeouts.__dataclass_fields__),
    "datapath": ["enabled", "required", "flow_table_size", "attach", "routing"],
    "datapath.attach[]": ["interface", "direction", "netns"],
    "datapath.routing": [
        "netns",
        "rule_priority",
        "colors",
        "table",
        "routes",
        "dst",
        "via",
        "dev",
    ],
}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_example_policy_parses() -> None:
    text = (EXAMPLES / "policy.yaml").read_text()
    policy = parse_policy(text, "examples/policy.yaml")
    assert set(policy.colors) == {"stable", "canary", "lane-blue"}
    assert policy.datapath.enabled
    assert policy.datapath.routing.colors["canary"].table == 102
    assert len(policy.inbound.rules) == 3
    assert [r.host for r in policy.routes] == ["reviews"]
    assert policy.baggage_key == "traffic-color"


@pytest.mark.parametrize("section", POLICY_KEYS)
def test_example_policy_shows_every_key_with_a_comment(section: str) -> None:
    lines = (EXAMPLES / "policy.yaml").read_text().splitlines()
    for key in POLICY_KEYS[section]:
        pattern = re.compile(rf"^\s*(#\s*)?(- )?{key}:")
        hits = [
            i
            for i, line in enumerate(lines)
            if pattern.match(line) or re.search(rf"[{{,]\s*{key}:", line)
        ]
        assert hits, f"{section}.{key} is not in examples/policy.yaml"
        commented = any("#" in lines[i] or lines[i - 1].strip().startswith("#") for i in hits)
        assert commented, f"{section}.{key} has no comment"


@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_demo_manifests_validate_strictly(path: Path) -> None:
    for doc in _docs(path):
        assert schema_errors(doc) == [], f"{path.name}: {doc['kind']}"
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "traffic-demo"


def _demo() -> tuple[dict, dict, dict]:
    docs = _docs(EXAMPLES / "k8s" / "demo-app.yaml")
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    service = next(d for d in docs if d["kind"] == "Service")
    return deployments["demo-stable"], deployments["demo-canary"], service


def test_stable_and_canary_differ_only_by_the_color_label() -> None:
    stable, canary, _ = _demo()
    s_pod, c_pod = stable["spec"]["template"], canary["spec"]["template"]
    assert s_pod["metadata"]["labels"][LABEL_COLOR] == "stable"
    assert c_pod["metadata"]["labels"][LABEL_COLOR] == "canary"
    assert s_pod["spec"] == c_pod["spec"]


def test_service_targets_the_sidecar_inbound_port_of_both_colors() -> None:
    stable, canary, service = _demo()
    assert service["spec"]["ports"][0]["targetPort"] == PORT_NAMES[INBOUND_PORT]
    for deployment in (stable, canary):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        injected, notes = inject_object(deployment, InjectConfig())
        assert notes == [f"Deployment/{deployment['metadata']['name']}: injected"]
        ports = [
            p["name"]
            for c in injected["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        ]
        assert service["spec"]["ports"][0]["targetPort"] in ports
        assert schema_errors(injected) == []


def test_demo_policy_sends_inbound_traffic_to_the_demo_app() -> None:
    cm = _docs(EXAMPLES / "k8s" / "policy.yaml")[0]
    assert cm["metadata"]["name"] == InjectConfig().policy_config_map
    policy = parse_policy(cm["data"]["policy.yaml"], "examples/k8s/policy.yaml")
    stable, _, _ = _demo()
    app_port = stable["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    assert policy.inbound.app.port == app_port
    assert policy.inbound.listen.port == INBOUND_PORT
    assert {"stable", "canary"} <= set(policy.colors)


def test_walkthrough_uses_the_files_it_names() -> None:
    readme = (EXAMPLES / "README.md").read_text()
    for path in K8S:
        assert f"examples/k8s/{path.name}" in readme
    assert "traffic-color.io/inject=enabled" in readme
    assert "x-traffic-color" in readme
