"""``traffic-color inject --config`` with the chart's rendered inject-config ConfigMap.

The chart renders the webhook's settings into a ConfigMap (data key
``inject.json``); given that ConfigMap, alone or inside helm's whole output,
offline injection is the webhook's mutation, image and all. Errors name the
settings file.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from sidecar.inject.mutation import InjectConfig, inject_object
from tests.inject.test_inject_command import GOLDEN, _inject
from tests.ship.test_chart import CHART, NAMESPACE, _helm


def helm_template(tmp_path: Path, *sets: str) -> Path:
    args = [a for s in sets for a in ("--set", s)]
    out = _helm("template", "tc", str(CHART), "--namespace", NAMESPACE, *args).stdout
    path = tmp_path / "rendered.yaml"
    path.write_text(out)
    return path


def inject_configmap(rendered: Path) -> dict:
    [cm] = [
        d
        for d in yaml.safe_load_all(rendered.read_text())
        if d and d["kind"] == "ConfigMap" and "inject.json" in d.get("data", {})
    ]
    return cm


def test_rendered_configmap_gives_the_webhooks_mutation(tmp_path: Path) -> None:
    rendered = helm_template(
        tmp_path,
        "image.repository=registry.example/tc",
        "image.tag=7.1",
        "injection.nativeSidecar=true",
    )
    cm = inject_configmap(rendered)
    alone = tmp_path / "inject-config.yaml"
    alone.write_text(yaml.safe_dump(cm))
    webhook_config = InjectConfig.from_mapping(json.loads(cm["data"]["inject.json"]))
    source = yaml.safe_load((GOLDEN / "deployment.in.yaml").read_text())
    expected, _ = inject_object(source, webhook_config)
    for config in (alone, rendered):  # the ConfigMap alone, or helm's whole output
        result = _inject("-f", str(GOLDEN / "deployment.in.yaml"), "--config", str(config))
        assert result.returncode == 0, result.stderr
        got = yaml.safe_load(result.stdout)
        assert got == expected
        [sidecar] = got["spec"]["template"]["spec"]["initContainers"][-1:]
        assert sidecar["image"] == "registry.example/tc:7.1"


def test_errors_name_the_settings_file(tmp_path: Path) -> None:
    cm = inject_configmap(helm_template(tmp_path))
    settings = json.loads(cm["data"]["inject.json"])
    settings["imageTag"] = "x"  # a typo of a key
    cm["data"]["inject.json"] = json.dumps(settings)
    bad = tmp_path / "bad-config.yaml"
    bad.write_text(yaml.safe_dump(cm))
    result = _inject("-f", str(GOLDEN / "deployment.in.yaml"), "--config", str(bad))
    assert result.returncode == 2
    assert result.stderr.startswith(f"traffic-color inject: {bad}: unknown injection setting")

    cm["data"] = {"other.json": "{}"}
    bad.write_text(yaml.safe_dump(cm))
    result = _inject("-f", str(GOLDEN / "deployment.in.yaml"), "--config", str(bad))
    assert result.returncode == 2
    assert f"{bad}: expected one ConfigMap with data key 'inject.json'" in result.stderr

    missing = tmp_path / "nope.yaml"
    result = _inject("-f", str(GOLDEN / "deployment.in.yaml"), "--config", str(missing))
    assert result.returncode == 2 and f"{missing}: cannot read" in result.stderr
