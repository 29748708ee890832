"""The pod mutation: golden files per workload kind and mode, idempotence, opt-outs, schemas.

Golden files were produced by ``inject`` and reviewed by hand; set
``UPDATE_GOLDEN=1`` to rewrite them after an intended change, then review the diff.
A case's name ends with the settings it is injected with (``-native``,
``-datapath``, ``-node-agent``); the rest use the defaults.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

import pytest
import yaml

from sidecar import __version__
from sidecar.inject.cli import inject_stream
from sidecar.inject.config import DATAPATH_CAPABILITIES
from sidecar.inject.mutation import (
    ADMIN_PORT,
    APP_METRICS_ENV,
    CAPTURE_NAME,
    INBOUND_PORT,
    LABEL_COLOR,
    OUTBOUND_PORT,
    AnnotationError,
    InjectConfig,
    inject_object,
    inject_pod,
    json_patch,
    no_proxy_value,
)
from tests.inject import pss
from tests.inject.k8s import apply_patch, schema_errors

GOLDEN = Path(__file__).parent / "golden"
CONFIG = InjectConfig(image="registry.example/traffic-color:test")
NATIVE = dataclasses.replace(CONFIG, native_sidecar=True)
DATAPATH = dataclasses.replace(CONFIG, datapath=True)
NODE_AGENT = dataclasses.replace(CONFIG, datapath=True, node_agent=True)
CASES = sorted(p.name.removesuffix(".in.yaml") for p in GOLDEN.glob("*.in.yaml"))


def _config_for(case: str) -> InjectConfig:
    for suffix, config in (
        ("-native", NATIVE),
        ("-datapath", DATAPATH),
        ("-node-agent", NODE_AGENT),
    ):
        if case.endswith(suffix):
            return config
    return CONFIG


def _inject_text(text: str, config: InjectConfig) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    inject_stream(text, config, out, err)
    return out.getvalue(), err.getvalue()


def _pod(annotations: dict | None = None, **spec_extra: object) -> dict:
    meta: dict = {"name": "p", "namespace": "ns", "labels": {"app": "a"}}
    if annotations is not None:
        meta["annotations"] = annotations
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"containers": [{"name": "app", "image": "example/app:1"}], **spec_extra},
    }


def _all_containers(pod: dict) -> list[dict]:
    spec = pod["spec"]
    return spec.get("initContainers", []) + spec.get("containers", [])


def _sidecar(pod: dict) -> dict:
    found = [c for c in _all_containers(pod) if c["name"] == "traffic-color"]
    assert len(found) == 1, "exactly one sidecar expected"
    return found[0]


def _capture(pod: dict) -> dict | None:
    found = [c for c in pod["spec"].get("initContainers", []) if c["name"] == CAPTURE_NAME]
    assert len(found) <= 1
    return found[0] if found else None


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _status(pod: dict) -> dict:
    return json.loads(pod["metadata"]["annotations"]["traffic-color.io/status"])


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

HTTP_PROXY_MODE = {"traffic-color.io/capture": "false"}


def test_sidecar_ports_probes_and_no_privilege_by_default() -> None:
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
    ctx = side["securityContext"]
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert (ctx["runAsUser"], ctx["runAsGroup"], ctx["runAsNonRoot"]) == (1337, 1337, True)
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "privileged" not in ctx
    assert not any("hostPath" in v for v in new["spec"]["volumes"])
    assert {m["mountPath"] for m in side["volumeMounts"]} == {"/etc/traffic-color", "/tmp"}


def test_without_native_sidecars_the_app_waits_for_the_sidecar() -> None:
    new, _ = inject_pod(_pod(), CONFIG)
    names = [c["name"] for c in new["spec"]["containers"]]
    assert names == ["traffic-color", "app"]  # the kubelet starts them in this order
    hook = new["spec"]["containers"][0]["lifecycle"]["postStart"]["exec"]["command"]
    assert hook[:2] == ["traffic-color", "wait-ready"]
    assert "startupProbe" not in new["spec"]["containers"][0]
    # kubectl exec/logs without -c still mean the app.
    assert new["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "app"
    assert _status(new)["sidecar"] == "container"


def test_native_sidecar_starts_before_the_apps_init_containers() -> None:
    new, _ = inject_pod(_pod(initContainers=[{"name": "init", "image": "x"}]), NATIVE)
    names = [c["name"] for c in new["spec"]["initContainers"]]
    assert names == [CAPTURE_NAME, "traffic-color", "init"]
    side = new["spec"]["initContainers"][1]
    assert side["restartPolicy"] == "Always"
    assert side["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "tc-admin"}
    assert side["startupProbe"]["periodSeconds"] * side["startupProbe"]["failureThreshold"] >= 60
    assert "lifecycle" not in side
    assert [c["name"] for c in new["spec"]["containers"]] == ["app"]
    assert "restartPolicy" not in _capture(new)  # a plain init container: runs, exits
    assert _status(new)["sidecar"] == "native"


@pytest.mark.parametrize(
    "kube_version, forced, native",
    [
        ("", None, False),
        ("v1.28.9", None, False),
        ("v1.29.0", None, True),
        ("v1.33.1-gke.1200", None, True),
        ("v1.30.0", False, False),
        ("v1.25.0", True, True),
    ],
)
def test_native_sidecars_where_kubernetes_has_them(
    kube_version: str, forced: bool | None, native: bool
) -> None:
    config = dataclasses.replace(CONFIG, kube_version=kube_version, native_sidecar=forced)
    new, _ = inject_pod(_pod(), config)
    assert (_sidecar(new).get("restartPolicy") == "Always") is native
    assert _status(new)["sidecar"] == ("native" if native else "container")


def test_capture_init_container_has_two_capabilities_and_the_pods_policy() -> None:
    new, _ = inject_pod(_pod(initContainers=[{"name": "init", "image": "x"}]), CONFIG)
    # Without native sidecars no proxy runs during init containers: capture comes last.
    assert [c["name"] for c in new["spec"]["initContainers"]] == ["init", CAPTURE_NAME]
    init = _capture(new)
    assert init["image"] == CONFIG.image
    assert init["args"] == ["capture", "install", "--policy", "/etc/traffic-color/policy.yaml"]
    ctx = init["securityContext"]
    assert ctx["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
    assert ctx["runAsUser"] == 0 and ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert init["volumeMounts"] == [
        {"name": "tc-policy", "mountPath": "/etc/traffic-color", "readOnly": True}
    ]
    assert "HTTP_PROXY" not in _env(new["spec"]["containers"][1])  # capture needs no proxy env
    assert _status(new)["traffic"] == "capture"


def test_capture_lists_come_from_the_chart_and_annotations_replace_them() -> None:
    config = dataclasses.replace(
        CONFIG, exclude_outbound_ports=("25",), exclude_outbound_cidrs=("169.254.0.0/16",)
    )
    init = _capture(inject_pod(_pod(), config)[0])
    assert init["args"][4:] == [
        "--exclude-outbound-ports=25",
        "--exclude-outbound-cidrs=169.254.0.0/16",
    ]
    pod = _pod(
        {
            "traffic-color.io/exclude-outbound-ports": "5432, 6379",
            "traffic-color.io/include-outbound-cidrs": "10.0.0.0/8,fd00::/8",
            "traffic-color.io/exclude-inbound-ports": "9090",
        }
    )
    init = _capture(inject_pod(pod, config)[0])
    assert init["args"][4:] == [
        "--exclude-outbound-ports=5432,6379",
        "--exclude-outbound-cidrs=169.254.0.0/16",
        "--include-outbound-cidrs=10.0.0.0/8,fd00::/8",
        "--exclude-inbound-ports=9090",
    ]


@pytest.mark.parametrize(
    "annotation, value, complaint",
    [
        ("exclude-outbound-ports", "5432,http", "bad item 'http'"),
        ("exclude-inbound-ports", "70000", "bad item '70000'"),
        ("exclude-outbound-cidrs", "10.0.0.0/33", "is not a list of CIDRs"),
        ("include-outbound-cidrs", "everything", "is not a list of CIDRs"),
        ("proxy-memory", "12 GB", "is not a positive Kubernetes quantity"),
        ("proxy-cpu", "-1", "is not a positive Kubernetes quantity"),
        ("proxy-memory", "1Gi", "memory request 1Gi above its limit 128Mi"),
    ],
)
def test_bad_annotations_are_refused_with_the_reason(
    annotation: str, value: str, complaint: str
) -> None:
    with pytest.raises(AnnotationError, match=complaint) as err:
        inject_pod(_pod({f"traffic-color.io/{annotation}": value}), CONFIG)
    assert str(err.value).startswith(f"annotation traffic-color.io/{annotation}: ")


def test_bad_chart_lists_fail_when_the_settings_load() -> None:
    with pytest.raises(ValueError, match="excludeOutboundPorts: is not a list of TCP ports"):
        InjectConfig.from_mapping({"excludeOutboundPorts": ["smtp"]})


def test_resource_annotations_override_the_chart() -> None:
    pod = _pod(
        {
            "traffic-color.io/proxy-cpu": "200m",
            "traffic-color.io/proxy-memory": "96Mi",
            "traffic-color.io/proxy-cpu-limit": "1",
            "traffic-color.io/proxy-memory-limit": "192Mi",
        }
    )
    assert _sidecar(inject_pod(pod, CONFIG)[0])["resources"] == {
        "requests": {"cpu": "200m", "memory": "96Mi"},
        "limits": {"cpu": "1", "memory": "192Mi"},
    }
    # A request may rise above the chart's limit when the limit rises with it.
    pod = _pod(
        {"traffic-color.io/proxy-memory": "1Gi", "traffic-color.io/proxy-memory-limit": "2Gi"}
    )
    assert _sidecar(inject_pod(pod, CONFIG)[0])["resources"]["limits"]["memory"] == "2Gi"


def test_datapath_in_the_pod_gets_its_capabilities_host_mounts_and_memory() -> None:
    new, _ = inject_pod(_pod(), DATAPATH)
    side = _sidecar(new)
    ctx = side["securityContext"]
    assert ctx["capabilities"] == {"add": list(DATAPATH_CAPABILITIES), "drop": ["ALL"]}
    assert sorted(DATAPATH_CAPABILITIES) == ["BPF", "NET_ADMIN", "PERFMON"]
    # Root: Kubernetes gives a non-root container no effective capabilities.
    assert (ctx["runAsUser"], ctx["runAsNonRoot"], ctx["runAsGroup"]) == (0, False, 1337)
    mounts = {m["mountPath"]: m for m in side["volumeMounts"]}
    for host_path in ("/lib/modules", "/usr/src", "/sys/fs/bpf"):
        assert mounts[host_path]["readOnly"] is True
        volume = next(v for v in new["spec"]["volumes"] if v["name"] == mounts[host_path]["name"])
        assert volume["hostPath"]["path"] == host_path
    # The compile child's peak and the maps' locked memory fit under the limit.
    assert side["resources"] == DATAPATH.datapath_resources
    assert _status(new)["kernel"] == "pod"


def test_with_the_node_agent_the_sidecar_gets_no_capability_at_all() -> None:
    new, _ = inject_pod(_pod(), NODE_AGENT)
    side = _sidecar(new)
    assert side["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert side["securityContext"]["runAsUser"] == 1337
    assert not any("hostPath" in v for v in new["spec"]["volumes"])
    assert side["resources"] == NODE_AGENT.resources
    assert _capture(new)["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
    assert _status(new)["kernel"] == "node-agent"


def test_status_records_version_modes_and_the_settings_digest() -> None:
    status = _status(inject_pod(_pod(), CONFIG)[0])
    assert status == {
        "state": "injected",
        "version": __version__,
        "sidecar": "container",
        "traffic": "capture",
        "kernel": "off",
        "config": CONFIG.digest(),
    }
    assert CONFIG.digest().startswith("sha256:")
    other = dataclasses.replace(CONFIG, image="registry.example/traffic-color:next")
    assert _status(inject_pod(_pod(), other)[0])["config"] != status["config"]
    same = InjectConfig.from_mapping({"image": CONFIG.image})
    assert same.digest() == CONFIG.digest()


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
    new, _ = inject_pod(_pod({"traffic-color.io/policy-configmap": "other"}), CONFIG)
    vols = {v["name"]: v for v in new["spec"]["volumes"]}
    assert vols["tc-policy"]["configMap"]["name"] == "other"


# ------------------------------------------------------------------ metrics


def test_pods_without_scrape_annotations_get_the_sidecars() -> None:
    new, _ = inject_pod(_pod(), CONFIG)
    ann = new["metadata"]["annotations"]
    assert (ann["prometheus.io/scrape"], ann["prometheus.io/port"], ann["prometheus.io/path"]) == (
        "true",
        "15090",
        "/metrics",
    )
    assert APP_METRICS_ENV not in _env(_sidecar(new))


def test_bookinfo_productpage_metrics_are_merged_into_the_sidecars() -> None:
    doc = yaml.safe_load((GOLDEN / "bookinfo-productpage-native.in.yaml").read_text())
    new, _ = inject_object(doc, CONFIG)
    pod = new["spec"]["template"]
    ann = pod["metadata"]["annotations"]
    assert (ann["prometheus.io/scrape"], ann["prometheus.io/port"], ann["prometheus.io/path"]) == (
        "true",
        "15090",
        "/metrics",
    )
    assert _env(_sidecar(pod))[APP_METRICS_ENV] == "http://127.0.0.1:9080/metrics"


@pytest.mark.parametrize(
    "annotations, env, port",
    [
        # No port annotation: the app's first declared port, default path.
        ({"prometheus.io/scrape": "true"}, "http://127.0.0.1:8080/metrics", "15090"),
        (
            {"prometheus.io/scrape": "true", "prometheus.io/path": "stats"},
            "http://127.0.0.1:8080/stats",
            "15090",
        ),
        # The pod asked not to be scraped: left alone.
        ({"prometheus.io/scrape": "false", "prometheus.io/port": "9100"}, None, "9100"),
        # Merging off by annotation, and metrics the sidecar cannot fetch: left alone.
        ({"prometheus.io/port": "9100", "traffic-color.io/merge-metrics": "false"}, None, "9100"),
        ({"prometheus.io/port": "9100", "prometheus.io/scheme": "https"}, None, "9100"),
    ],
)
def test_app_metrics_merging(annotations: dict, env: str | None, port: str) -> None:
    pod = _pod(dict(annotations))
    pod["spec"]["containers"][0]["ports"] = [{"containerPort": 8080}]
    new, _ = inject_pod(pod, CONFIG)
    assert _env(_sidecar(new)).get(APP_METRICS_ENV) == env
    assert new["metadata"]["annotations"].get("prometheus.io/port") == port


def test_merging_off_in_the_settings_keeps_the_apps_annotations() -> None:
    pod = _pod({"prometheus.io/scrape": "true", "prometheus.io/port": "9100"})
    new, _ = inject_pod(pod, dataclasses.replace(CONFIG, merge_metrics=False))
    assert new["metadata"]["annotations"]["prometheus.io/port"] == "9100"
    assert "prometheus.io/path" not in new["metadata"]["annotations"]
    assert APP_METRICS_ENV not in _env(_sidecar(new))


# --------------------------------------------------------------- HTTP_PROXY mode


def test_proxy_env_in_app_containers_keeps_what_the_app_set() -> None:
    pod = _pod(dict(HTTP_PROXY_MODE))
    pod["spec"]["containers"].append(
        {"name": "second", "image": "x", "env": [{"name": "NO_PROXY", "value": "mine"}]}
    )
    new, _ = inject_pod(pod, CONFIG)
    assert _capture(new) is None
    assert _status(new)["traffic"] == "http-proxy"
    first, second = (_env(c) for c in new["spec"]["containers"][1:])
    assert first["HTTP_PROXY"] == first["http_proxy"] == "http://127.0.0.1:15001"
    assert first["NO_PROXY"] == first["no_proxy"] == no_proxy_value(CONFIG)
    assert second["NO_PROXY"] == "mine"
    assert "no_proxy" not in second  # the pair stays as the app set it
    assert second["http_proxy"] == "http://127.0.0.1:15001"
    assert "HTTP_PROXY" not in _env(_sidecar(new))  # the sidecar never proxies itself


def test_http_proxy_mode_from_the_settings() -> None:
    new, _ = inject_pod(_pod(), dataclasses.replace(CONFIG, capture=False))
    assert _capture(new) is None
    assert "HTTP_PROXY" in _env(new["spec"]["containers"][1])
    # capture: "true" on the pod turns it back on.
    new, _ = inject_pod(
        _pod({"traffic-color.io/capture": "true"}), dataclasses.replace(CONFIG, capture=False)
    )
    assert _capture(new) is not None


def test_no_proxy_no_longer_bypasses_the_cluster_domain_by_default() -> None:
    assert no_proxy_value(CONFIG) == "localhost,127.0.0.1,::1"
    value = no_proxy_value(
        dataclasses.replace(
            CONFIG,
            cluster_domain="corp.local",
            bypass_cluster_domain=True,
            no_proxy_extra=("10.0.0.0/8",),
        )
    )
    assert value.split(",") == [
        "localhost",
        "127.0.0.1",
        "::1",
        ".svc",
        ".corp.local",
        "10.0.0.0/8",
    ]


@pytest.mark.parametrize("how", ["annotation", "config"])
def test_proxy_env_opt_out(how: str) -> None:
    pod, config = _pod(dict(HTTP_PROXY_MODE)), CONFIG
    if how == "annotation":
        pod["metadata"]["annotations"]["traffic-color.io/proxy-env"] = "false"
    else:
        config = dataclasses.replace(CONFIG, proxy_env=False)
    new, _ = inject_pod(pod, config)
    assert "env" not in new["spec"]["containers"][1]
    assert _sidecar(new)


# ------------------------------------------------------------------ skipping


@pytest.mark.parametrize("value", ["false", "False", "no", "disabled"])
def test_opt_out_annotation(value: str) -> None:
    pod = _pod({"traffic-color.io/inject": value})
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
        ({"nativeSidecar": "yes"}, "nativeSidecar: expected true, false or auto"),
        ({"capture": "yes"}, "capture: expected true or false"),
        ({"kubeVersion": "latest"}, "kubeVersion: 'latest' is not a Kubernetes version"),
        ({"resources": []}, "resources: expected a mapping"),
        ({"image": 3}, "image: expected a string"),
        ({"noProxyExtra": "a,b"}, "noProxyExtra: expected a list of strings"),
        ({"defaultColor": "Canary"}, "default color 'Canary' is not a color name"),
    ],
)
def test_config_rejects_typos_and_wrong_types(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InjectConfig.from_mapping(data)


# ---------------------------------------------------------- pod security


RESTRICTED_APP = {
    "name": "app",
    "image": "example/app:1",
    "securityContext": {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    },
}


@pytest.mark.parametrize(
    "config, annotations, expected",
    [
        # The levels the chart README states, for an app that is restricted itself.
        (CONFIG, HTTP_PROXY_MODE, "restricted"),
        (NODE_AGENT, HTTP_PROXY_MODE, "restricted"),
        (CONFIG, {}, "privileged"),  # the capture init container adds NET_ADMIN, NET_RAW
        (NATIVE, {}, "privileged"),
        (DATAPATH, HTTP_PROXY_MODE, "privileged"),  # capabilities and hostPath
    ],
    ids=["http-proxy", "http-proxy-node-agent", "capture", "capture-native", "datapath"],
)
def test_pod_security_level_per_mode(
    config: InjectConfig, annotations: dict, expected: str
) -> None:
    pod = _pod(dict(annotations))
    pod["spec"]["containers"] = [RESTRICTED_APP]
    assert pss.level(pod["spec"]) == "restricted"
    new, _ = inject_pod(pod, config)
    assert pss.level(new["spec"]) == expected, pss.restricted_problems(new["spec"])
    if expected == "privileged":
        # Only what the mode needs is what breaks the lower levels.
        problems = pss.baseline_problems(new["spec"])
        allowed = {
            "traffic-color-capture: adds NET_ADMIN",
            "traffic-color-capture: adds NET_RAW",
            "traffic-color: adds NET_ADMIN",
            "traffic-color: adds BPF",
            "traffic-color: adds PERFMON",
            "volume tc-lib-modules: hostPath",
            "volume tc-usr-src: hostPath",
            "volume tc-bpffs: hostPath",
        }
        assert problems and set(problems) <= allowed
