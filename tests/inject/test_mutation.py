"""The pod mutation: golden files per workload kind, idempotence, opt-outs, schemas.

Golden files were produced by ``inject`` and reviewed by hand; set
``UPDATE_GOLDEN=1`` to rewrite them after an intended change, then review the diff.
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

import pytest
import yaml

from sidecar.inject.cli import inject_stream
from sidecar.inject.mutation import (
    ADMIN_PORT,
    CAPABILITIES,
    INBOUND_PORT,
    LABEL_COLOR,
    OUTBOUND_PORT,
    InjectConfig,
    inject_object,
    inject_pod,
    json_patch,
    no_proxy_value,
)
from tests.inject.k8s import apply_patch, schema_errors

GOLDEN = Path(__file__).parent / "golden"
CONFIG = InjectConfig(image="registry.example/traffic-color:test")
NATIVE = dataclasses.replace(CONFIG, native_sidecar=True)
CASES = sorted(p.name.removesuffix(".in.yaml") for p in GOLDEN.glob("*.in.yaml"))


def _config_for(case: str) -> InjectConfig:
    return NATIVE if case.endswith("-native") else CONFIG


def _inject_text(text: str, config: InjectConfig) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    inject_stream(text, config, out, err)
    return out.getvalue(), err.getvalue()


def _pod(**spec_extra: object) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": "ns", "labels": {"app": "a"}},
        "spec": {"containers": [{"name": "app", "image": "example/app:1"}], **spec_extra},
    }


def _sidecar(pod: dict) -> dict:
    spec = pod["spec"]
    found = [
        c
        for c in spec.get("containers", []) + spec.get("initContainers", [])
        if c["name"] == "traffic-color"
    ]
    assert len(found) == 1, "exactly one sidecar expected"
    return found[0]


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# ------------------------------------------------------------------- golden


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str) -> None:
    text = (GOLDEN / f"{case}.in.yaml").read_text()
    got, _ = _inject_text(text, _config_for(case))
    expected_path = GOLDEN / f"{case}.out.yaml"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        expected_path.write_text(got)
    assert got == expected_path.read_text()


@pytest.mark.parametrize("case", CASES)
def test_injecting_twice_changes_nothing(case: str) -> None:
    once, _ = _inject_text((GOLDEN / f"{case}.in.yaml").read_text(), _config_for(case))
    twice, notes = _inject_text(once, _config_for(case))
    assert twice == once
    assert "injected" not in notes.replace("already injected", "")


@pytest.mark.parametrize("case", CASES)
def test_injected_objects_validate_against_kubernetes_schemas(case: str) -> None:
    out, _ = _inject_text((GOLDEN / f"{case}.in.yaml").read_text(), _config_for(case))
    docs = list(yaml.safe_load_all(out))
    for doc in docs:
        for obj in doc["items"] if doc["kind"] == "List" else [doc]:
            assert schema_errors(obj) == [], obj["kind"]


def test_every_workload_kind_gets_one_sidecar() -> None:
    for case in ("deployment", "statefulset", "daemonset", "job", "pod"):
        doc = yaml.safe_load((GOLDEN / f"{case}.in.yaml").read_text())
        new, notes = inject_object(doc, CONFIG)
        pod = new if doc["kind"] == "Pod" else new["spec"]["template"]
        assert _sidecar(pod)["image"] == CONFIG.image, case
        assert notes == [f"{doc['kind']}/{doc['metadata']['name']}: injected"]


def test_list_walks_items_and_leaves_other_kinds_alone() -> None:
    doc = yaml.safe_load((GOLDEN / "list.in.yaml").read_text())
    new, notes = inject_object(doc, CONFIG)
    service, opted_out, cronjob = new["items"]
    assert service == doc["items"][0]
    assert opted_out == doc["items"][1]
    assert _sidecar(cronjob["spec"]["jobTemplate"]["spec"]["template"])
    assert notes == [
        "Pod/opted-out: opted out by annotation traffic-color.io/inject",
        "CronJob/nightly: injected",
    ]


# ------------------------------------------------------------ the container


def test_sidecar_ports_probes_and_capabilities() -> None:
    new, reason = inject_pod(_pod(), CONFIG)
    assert reason is None
    side = _sidecar(new)
    ports = {p["name"]: p["containerPort"] for p in side["ports"]}
    assert ports == {
        "tc-outbound": OUTBOUND_PORT,
        "tc-inbound": INBOUND_PORT,
        "tc-admin": ADMIN_PORT,
    }
    assert side["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "tc-admin"}
    assert side["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "tc-admin"}
    caps = side["securityContext"]["capabilities"]
    assert (
        sorted(caps["add"]) == sorted(CAPABILITIES) == ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"]
    )
    assert caps["drop"] == ["ALL"]
    assert "privileged" not in side["securityContext"]
    mounts = {m["mountPath"]: m for m in side["volumeMounts"]}
    for host_path in ("/lib/modules", "/usr/src", "/sys/fs/bpf"):
        assert mounts[host_path]["readOnly"] is True
        volume = next(v for v in new["spec"]["volumes"] if v["name"] == mounts[host_path]["name"])
        assert volume["hostPath"]["path"] == host_path


def test_color_comes_from_the_label_through_the_downward_api() -> None:
    new, _ = inject_pod(_pod(), dataclasses.replace(CONFIG, default_color="blue"))
    assert new["metadata"]["labels"][LABEL_COLOR] == "blue"  # default filled in
    env = _env(_sidecar(new))
    assert env["TRAFFIC_COLOR"] == {
        "fieldRef": {"fieldPath": "metadata.labels['traffic-color.io/color']"}
    }
    assert env["TRAFFIC_COLOR_POLICY"] == "/etc/traffic-color/policy.yaml"

    labelled = _pod()
    labelled["metadata"]["labels"][LABEL_COLOR] = "canary"
    new, _ = inject_pod(labelled, dataclasses.replace(CONFIG, default_color="blue"))
    assert new["metadata"]["labels"][LABEL_COLOR] == "canary"


def test_policy_configmap_default_and_annotation_override() -> None:
    new, _ = inject_pod(_pod(), CONFIG)
    vols = {v["name"]: v for v in new["spec"]["volumes"]}
    assert vols["tc-policy"]["configMap"]["name"] == "traffic-color-policy"
    pod = _pod()
    pod["metadata"]["annotations"] = {"traffic-color.io/policy-configmap": "other"}
    new, _ = inject_pod(pod, CONFIG)
    vols = {v["name"]: v for v in new["spec"]["volumes"]}
    assert vols["tc-policy"]["configMap"]["name"] == "other"


def test_prometheus_annotations_added_but_never_replaced() -> None:
    new, _ = inject_pod(_pod(), CONFIG)
    ann = new["metadata"]["annotations"]
    assert (ann["prometheus.io/scrape"], ann["prometheus.io/port"], ann["prometheus.io/path"]) == (
        "true",
        "15090",
        "/metrics",
    )
    pod = _pod()
    pod["metadata"]["annotations"] = {"prometheus.io/scrape": "true", "prometheus.io/port": "9100"}
    new, _ = inject_pod(pod, CONFIG)
    assert new["metadata"]["annotations"]["prometheus.io/port"] == "9100"
    assert "prometheus.io/path" not in new["metadata"]["annotations"]


def test_proxy_env_in_app_containers_keeps_what_the_app_set() -> None:
    pod = _pod()
    pod["spec"]["containers"].append(
        {"name": "second", "image": "x", "env": [{"name": "NO_PROXY", "value": "mine"}]}
    )
    new, _ = inject_pod(pod, CONFIG)
    first, second = (_env(c) for c in new["spec"]["containers"][:2])
    assert first["HTTP_PROXY"] == first["http_proxy"] == "http://127.0.0.1:15001"
    assert first["NO_PROXY"] == first["no_proxy"] == no_proxy_value(CONFIG)
    assert second["NO_PROXY"] == "mine"
    assert "no_proxy" not in second  # the pair stays as the app set it
    assert second["http_proxy"] == "http://127.0.0.1:15001"
    assert "HTTP_PROXY" not in _env(_sidecar(new))  # the sidecar never proxies itself


def test_no_proxy_covers_loopback_and_the_cluster_domain() -> None:
    value = no_proxy_value(
        dataclasses.replace(CONFIG, cluster_domain="corp.local", no_proxy_extra=("10.0.0.0/8",))
    )
    assert value.split(",") == [
        "localhost",
        "127.0.0.1",
        "::1",
        ".svc",
        ".corp.local",
        "10.0.0.0/8",
    ]
    direct = no_proxy_value(dataclasses.replace(CONFIG, bypass_cluster_domain=False))
    assert direct == "localhost,127.0.0.1,::1"


@pytest.mark.parametrize("how", ["annotation", "config"])
def test_proxy_env_opt_out(how: str) -> None:
    pod, config = _pod(), CONFIG
    if how == "annotation":
        pod["metadata"]["annotations"] = {"traffic-color.io/proxy-env": "false"}
    else:
        config = dataclasses.replace(CONFIG, proxy_env=False)
    new, _ = inject_pod(pod, config)
    assert "env" not in new["spec"]["containers"][0]
    assert _sidecar(new)


def test_native_sidecar_is_the_first_init_container() -> None:
    new, _ = inject_pod(_pod(initContainers=[{"name": "init", "image": "x"}]), NATIVE)
    names = [c["name"] for c in new["spec"]["initContainers"]]
    assert names == ["traffic-color", "init"]
    assert new["spec"]["initContainers"][0]["restartPolicy"] == "Always"
    assert [c["name"] for c in new["spec"]["containers"]] == ["app"]
    regular, _ = inject_pod(_pod(), CONFIG)
    assert "restartPolicy" not in _sidecar(regular)


@pytest.mark.parametrize("value", ["false", "False", "no", "disabled"])
def test_opt_out_annotation(value: str) -> None:
    pod = _pod()
    pod["metadata"]["annotations"] = {"traffic-color.io/inject": value}
    new, reason = inject_pod(pod, CONFIG)
    assert new == pod
    assert reason == "opted out by annotation traffic-color.io/inject"


def test_host_network_pods_are_skipped() -> None:
    pod = _pod(hostNetwork=True)
    new, reason = inject_pod(pod, CONFIG)
    assert (new, reason) == (pod, "pod uses hostNetwork")


def test_input_is_never_modified() -> None:
    pod = _pod(volumes=[{"name": "data", "emptyDir": {}}])
    snapshot = yaml.safe_dump(pod)
    inject_pod(pod, CONFIG)
    assert yaml.safe_dump(pod) == snapshot


def test_volume_name_clash_keeps_the_apps_volume() -> None:
    pod = _pod(volumes=[{"name": "tc-tmp", "emptyDir": {"medium": "Memory"}}])
    new, _ = inject_pod(pod, CONFIG)
    tmp = [v for v in new["spec"]["volumes"] if v["name"] == "tc-tmp"]
    assert tmp == [{"name": "tc-tmp", "emptyDir": {"medium": "Memory"}}]


# ---------------------------------------------------------------- JSONPatch


@pytest.mark.parametrize("config", [CONFIG, NATIVE], ids=["container", "native"])
def test_json_patch_reproduces_the_mutation(config: InjectConfig) -> None:
    pod = _pod()
    pod["metadata"]["annotations"] = {"keep/me": "1", "a~b": "2"}
    new, _ = inject_pod(pod, config)
    patch = json_patch(pod, new)
    assert apply_patch(pod, patch) == new
    assert schema_errors(apply_patch(pod, patch)) == []
    # Annotation keys hold '/' and '~': they must be escaped, not split.
    paths = {op["path"] for op in patch}
    assert "/metadata/annotations/traffic-color.io~1status" in paths
    assert "/metadata/labels/traffic-color.io~1color" in paths


def test_json_patch_of_a_pod_without_labels_or_annotations() -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "x-"},
        "spec": {"containers": [{"name": "app", "image": "i"}]},
    }
    new, _ = inject_pod(pod, CONFIG)
    assert apply_patch(pod, json_patch(pod, new)) == new


def test_json_patch_of_equal_objects_is_empty() -> None:
    pod = _pod()
    assert json_patch(pod, yaml.safe_load(yaml.safe_dump(pod))) == []
    assert json_patch({"a": 1}, {"a": True}) == [{"op": "replace", "path": "/a", "value": True}]
    assert json_patch({"a": 1, "b": 2}, {"a": 1}) == [{"op": "remove", "path": "/b"}]


# ----------------------------------------------------------------- settings


def test_config_from_camel_case_mapping() -> None:
    config = InjectConfig.from_mapping(
        {"image": "r/i:1", "nativeSidecar": True, "noProxyExtra": ["a"], "policyConfigMap": "p"}
    )
    assert (
        config.image,
        config.native_sidecar,
        config.no_proxy_extra,
        config.policy_config_map,
    ) == ("r/i:1", True, ("a",), "p")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"imagee": "x"}, "unknown injection setting 'imagee'"),
        ({"nativeSidecar": "yes"}, "nativeSidecar: expected true or false"),
        ({"image": 3}, "image: expected a string"),
        ({"noProxyExtra": "a,b"}, "noProxyExtra: expected a list of strings"),
        ({"defaultColor": "Canary"}, "default color 'Canary' is not a color name"),
    ],
)
def test_config_rejects_typos_and_wrong_types(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InjectConfig.from_mapping(data)
