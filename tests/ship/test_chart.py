"""The Helm chart, checked offline: lint, render, schemas, and what the objects say.

Five renders: the default values, every optional feature on
(``ci/all-features-values.yaml``), cert-manager with an existing ClusterIssuer
(``ci/cluster-issuer-values.yaml``), the node agent on
(``ci/node-agent-values.yaml``) and the examples' node agent
(``examples/node-agent-values.yaml``). Built-in kinds are validated by
``kubernetes-validate --strict`` for Kubernetes 1.29 and 1.33 with no warning
allowed; cert-manager and prometheus-operator objects by ``crd_schemas``.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from sidecar.inject.mutation import InjectConfig, inject_pod
from sidecar.policy import parse_policy
from tests.inject import pss
from tests.inject.k8s import KUBERNETES_VERSIONS, schema_errors
from tests.ship.crd_schemas import SCHEMAS
from tests.ship.tools import REPO, module, tool

CHART = REPO / "charts" / "traffic-color"
NAMESPACE = "tc-system"
SCENARIOS = {
    "default": [],
    "all-features": [CHART / "ci" / "all-features-values.yaml"],
    "cluster-issuer": [CHART / "ci" / "cluster-issuer-values.yaml"],
    "node-agent": [CHART / "ci" / "node-agent-values.yaml"],
    # The walk-through's canary egress path (examples/README.md).
    "example-node-agent": [REPO / "examples" / "node-agent-values.yaml"],
}


def _helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("helm"), *args], capture_output=True, text=True, timeout=120, check=check
    )


@cache
def _render_text(scenario: str, *extra: str) -> str:
    values = [a for f in SCENARIOS[scenario] for a in ("-f", str(f))]
    return _helm("template", "tc", str(CHART), "--namespace", NAMESPACE, *values, *extra).stdout


def render(scenario: str, *extra: str) -> list[dict[str, Any]]:
    """The chart's objects; ``extra`` are more ``helm template`` arguments."""
    return [d for d in yaml.safe_load_all(_render_text(scenario, *extra)) if d]


def inject_config(docs: list[dict[str, Any]]) -> InjectConfig:
    cm = next(d for d in find(docs, "ConfigMap") if "inject.json" in d["data"])
    return InjectConfig.from_mapping(json.loads(cm["data"]["inject.json"]))


def find(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = find(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


# --------------------------------------------------------------- lint, schemas


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint_strict(scenario: str) -> None:
    values = [a for f in SCENARIOS[scenario] for a in ("-f", str(f))]
    result = _helm("lint", "--strict", str(CHART), *values, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rendered_objects_validate_strictly(scenario: str, version: str, tmp_path: Path) -> None:
    docs = render(scenario)
    core = [d for d in docs if (d["apiVersion"], d["kind"]) not in SCHEMAS]
    custom = [d for d in docs if (d["apiVersion"], d["kind"]) in SCHEMAS]
    path = tmp_path / "core.yaml"
    path.write_text(yaml.safe_dump_all(core))
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", version, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 0, "\n".join(lines)
    problems = [line for line in lines if not line.startswith("INFO ")]
    assert problems == []
    assert len([line for line in lines if " passed for resource " in line]) == len(core)
    jsonschema = module("jsonschema")
    for doc in custom:
        jsonschema.validate(doc, SCHEMAS[(doc["apiVersion"], doc["kind"])])


def test_custom_resources_appear_only_when_enabled() -> None:
    kinds = {d["kind"] for d in render("default")}
    assert kinds == {
        "ServiceAccount",
        "Secret",
        "ConfigMap",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
        "MutatingWebhookConfiguration",
    }
    assert "DaemonSet" in {d["kind"] for d in render("node-agent")}
    kinds = {d["kind"] for d in render("all-features")}
    assert {"Certificate", "Issuer", "ServiceMonitor", "PodMonitor"} <= kinds
    assert "Secret" not in kinds  # cert-manager writes it


def _merge(base: Any, override: Any) -> Any:
    """Helm's values merge: mappings merge key by key, anything else replaces."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in override.items()}}
    return override


def test_values_match_their_schema(tmp_path: Path) -> None:
    """values.yaml as shipped, and merged with each ci/ file as helm would merge them."""
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    files = [CHART / "values.yaml"]
    for extra in sorted((CHART / "ci").glob("*.yaml")):
        merged = tmp_path / extra.name
        merged.write_text(yaml.safe_dump(_merge(defaults, yaml.safe_load(extra.read_text()))))
        files.append(merged)
    result = subprocess.run(
        [
            tool("check-jsonschema"),
            "--schemafile",
            str(CHART / "values.schema.json"),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "override, complaint",
    [
        ("webhook.failurePolicy=Sometimes", "webhook.failurePolicy"),
        ("injection.defaultColor=Blue!", "injection.defaultColor"),
        ("webhook.tmeoutSeconds=3", "tmeoutSeconds"),
        ("webhook.timeoutSeconds=31", "webhook.timeoutSeconds"),
    ],
)
def test_schema_rejects_bad_values(override: str, complaint: str) -> None:
    result = _helm("template", "tc", str(CHART), "--set", override, check=False)
    assert result.returncode != 0
    assert complaint in result.stderr


def _leaf_paths(value: Any, prefix: str = "") -> list[str]:
    """Dotted paths of values.yaml's leaves; resources and node selectors count as one value."""
    whole = prefix.lower().endswith("resources.") or prefix.endswith("nodeSelector.")
    if isinstance(value, dict) and value and not whole:
        return [p for k, v in value.items() for p in _leaf_paths(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")]


def test_readme_documents_every_value() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (CHART / "README.md").read_text().split("\n## Values\n", 1)[1]
    documented = set(re.findall(r"^\| `([^`]+)` \|", readme, flags=re.M))
    missing = [p for p in _leaf_paths(values) if p not in documented]
    assert missing == []
    stale = [p for p in documented if p not in _leaf_paths(values)]
    assert stale == []


# --------------------------------------------------------------- the objects


def _load_cert(b64: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(base64.b64decode(b64))


def _signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    key = ca.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(
                cert.signature,
                cert.tbs_certificate_bytes,
                padding.PKCS1v15(),
                cert.signature_hash_algorithm,
            )
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(
                cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
            )
        else:
            return False
    except Exception:
        return False
    return cert.issuer == ca.subject


def test_generated_certificate_is_trusted_by_the_webhook_configuration() -> None:
    docs = render("default")
    secret = one(docs, "Secret")
    mwc = one(docs, "MutatingWebhookConfiguration")
    service = one(docs, "Service")
    ca_bundle = mwc["webhooks"][0]["clientConfig"]["caBundle"]
    assert ca_bundle == secret["data"]["ca.crt"]
    ca, cert = _load_cert(ca_bundle), _load_cert(secret["data"]["tls.crt"])
    assert _signed_by(cert, ca)
    assert not _signed_by(cert, cert)  # a leaf, not a self-signed certificate
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    name = service["metadata"]["name"]
    # The API server calls https://NAME.NAMESPACE.svc:443/mutate.
    assert f"{name}.{NAMESPACE}.svc" in sans.get_values_for_type(x509.DNSName)


def test_cert_manager_issues_the_secret_and_injects_the_ca() -> None:
    for scenario in ("all-features", "cluster-issuer"):
        docs = render(scenario)
        certificate = one(docs, "Certificate")
        mwc = one(docs, "MutatingWebhookConfiguration")
        deployment = one(docs, "Deployment")
        meta = certificate["metadata"]
        assert mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == (
            f"{meta['namespace']}/{meta['name']}"
        )
        assert "caBundle" not in mwc["webhooks"][0]["clientConfig"]
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == certificate["spec"]["secretName"]
        service = one(docs, "Service")["metadata"]["name"]
        assert f"{service}.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
    issuer_ref = one(render("cluster-issuer"), "Certificate")["spec"]["issuerRef"]
    assert issuer_ref == {
        "name": "internal-ca",
        "kind": "ClusterIssuer",
        "group": "cert-manager.io",
    }
    assert find(render("cluster-issuer"), "Issuer") == []


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_webhook_wiring(scenario: str) -> None:
    docs = render(scenario)
    mwc = one(docs, "MutatingWebhookConfiguration")
    service = one(docs, "Service")
    deployment = one(docs, "Deployment")
    hook = mwc["webhooks"][0]
    assert hook["clientConfig"]["service"] == {
        "name": service["metadata"]["name"],
        "namespace": NAMESPACE,
        "path": "/mutate",
        "port": service["spec"]["ports"][0]["port"],
    }
    excluded = ["kube-system", "kube-public", NAMESPACE]
    if scenario == "all-features":
        excluded.append("monitoring")
    assert hook["namespaceSelector"] == {
        "matchLabels": {"traffic-color.io/inject": "enabled"},
        "matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": excluded}
        ],
    }
    assert hook["rules"][0]["resources"] == ["pods"]
    assert hook["rules"][0]["operations"] == ["CREATE"]
    assert hook["failurePolicy"] == ("Fail" if scenario == "all-features" else "Ignore")
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    container = pod["spec"]["containers"][0]
    port_names = {p["name"] for p in container["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] in port_names
    args = container["args"]
    assert args[0] == "webhook"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert f"--tls-cert={mounts['tls']}/tls.crt" in args
    assert f"--tls-key={mounts['tls']}/tls.key" in args
    assert f"--config={mounts['inject-config']}/inject.json" in args
    # The injector is never injected, and runs with no privilege at all.
    assert pod["metadata"]["annotations"]["traffic-color.io/inject"] == "false"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert find(docs, "Role") == find(docs, "ClusterRole") == []


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rendered_inject_settings_drive_the_mutation(scenario: str) -> None:
    config = inject_config(render(scenario))
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert config.image == f"traffic-color:{chart['appVersion']}"
    # helm template sees Kubernetes 1.25 unless told; the node-agent file pins 1.30.
    assert config.native() is (scenario in ("all-features", "node-agent"))
    assert config.node_agent is scenario.endswith("node-agent")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "app", "image": "a"}]},
    }
    new, reason = inject_pod(pod, config)
    assert reason is None
    assert schema_errors(new) == []


def test_policy_configmaps_land_in_every_listed_namespace() -> None:
    for scenario, namespaces in (
        ("default", [NAMESPACE]),
        ("all-features", [NAMESPACE, "demo", "shop"]),
        ("cluster-issuer", []),
    ):
        cms = [
            d
            for d in find(render(scenario), "ConfigMap")
            if d["metadata"]["name"] == "traffic-color-policy"
        ]
        assert [c["metadata"]["namespace"] for c in cms] == namespaces
        for cm in cms:
            policy = parse_policy(cm["data"]["policy.yaml"], "chart policy")
            assert set(policy.colors) == {"stable", "canary"}


def test_notes_tell_how_to_label_a_namespace_and_check_injection(tmp_path: Path) -> None:
    """helm template skips NOTES.txt, so render a copy of it as an ordinary template."""
    import shutil

    chart = tmp_path / "traffic-color"
    shutil.copytree(CHART, chart)
    (chart / "templates" / "NOTES.txt").rename(chart / "notes.txt")
    (chart / "templates" / "notes-as-configmap.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\ndata:\n  notes: |\n"
        '{{ tpl (.Files.Get "notes.txt") . | indent 4 }}\n'
    )
    rendered = _helm(
        "template",
        "tc",
        str(chart),
        "--namespace",
        NAMESPACE,
        "--set",
        "policy.namespaces={shop}",
        "--show-only",
        "templates/notes-as-configmap.yaml",
    ).stdout
    notes = yaml.safe_load(rendered)["data"]["notes"]
    webhook = one(render("default"), "Deployment")["metadata"]["name"]
    assert "kubectl label namespace NAMESPACE traffic-color.io/inject=enabled" in notes
    assert "traffic-color\\.io/status" in notes  # escaped for custom-columns
    assert f"logs deploy/{webhook}" in notes
    assert f"{NAMESPACE}, shop" in notes
    assert "targetPort: tc-inbound" in notes  # for HTTP_PROXY mode
    assert "Services keep their app's own targetPort" in notes


# ------------------------------------------------------------- safety rails


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_webhook_pods_are_spread_and_kept_by_a_disruption_budget(scenario: str) -> None:
    docs = render(scenario)
    deployment = one(docs, "Deployment")
    pdb = one(docs, "PodDisruptionBudget")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # A drain evicts fewer webhook pods than there are: injection keeps working.
    assert pdb["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread, "webhook pods are spread by default"
    for constraint in spread:
        assert constraint["labelSelector"]["matchLabels"].items() <= pod_labels.items()
    keys = [c["topologyKey"] for c in spread]
    assert keys == (
        ["topology.kubernetes.io/zone"]
        if scenario == "all-features"
        else ["kubernetes.io/hostname"]
    )


def test_the_disruption_budget_can_be_turned_off() -> None:
    docs = render("default", "--set", "webhook.podDisruptionBudget.enabled=false")
    assert find(docs, "PodDisruptionBudget") == []


@pytest.mark.parametrize(
    "args, native",
    [
        (("--kube-version", "1.28.9"), False),
        (("--kube-version", "1.29.0"), True),
        (("--kube-version", "1.33.0"), True),
        (("--kube-version", "1.33.0", "--set", "injection.nativeSidecar=false"), False),
        (("--kube-version", "1.27.0", "--set", "injection.nativeSidecar=true"), True),
        (("--kube-version", "1.27.0", "--set", "injection.kubeVersion=v1.30.1"), True),
    ],
)
def test_native_sidecars_follow_the_clusters_version(args: tuple[str, ...], native: bool) -> None:
    config = inject_config(render("default", *args))
    new, _ = inject_pod(_app_pod(), config)
    sidecar = next(
        c
        for c in new["spec"].get("initContainers", []) + new["spec"]["containers"]
        if c["name"] == "traffic-color"
    )
    assert (sidecar.get("restartPolicy") == "Always") is native
    assert ("startupProbe" in sidecar) is native
    assert ("lifecycle" in sidecar) is not native
    assert json.loads(new["metadata"]["annotations"]["traffic-color.io/status"])["sidecar"] == (
        "native" if native else "container"
    )
    assert schema_errors(new) == []


def _app_pod() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "app", "image": "a"}]},
    }


def test_chart_capture_values_reach_the_init_container() -> None:
    config = inject_config(render("all-features"))
    new, _ = inject_pod(_app_pod(), config)
    capture = new["spec"]["initContainers"][0]
    assert capture["name"] == "traffic-color-capture"
    assert capture["args"][4:] == [
        "--exclude-outbound-ports=5432,6379",
        "--exclude-outbound-cidrs=169.254.169.254/32",
        "--include-outbound-cidrs=10.0.0.0/8,fd00::/8",
        "--exclude-inbound-ports=9100",
    ]


def test_datapath_follows_the_charts_policy_unless_set() -> None:
    assert inject_config(render("default")).datapath is False
    on = render(
        "default",
        "--set-string",
        "policy.content=colors: {stable: {mark: 1}}\ndatapath: {enabled: true}\n",
    )
    assert inject_config(on).datapath is True
    forced = render("default", "--set", "injection.datapath=true")
    config = inject_config(forced)
    new, _ = inject_pod(_app_pod(), config)
    sidecar = new["spec"]["containers"][0]
    assert sidecar["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "BPF", "PERFMON"]


# --------------------------------------------------------------- node agent


def _agent(docs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    daemonset = one(docs, "DaemonSet")
    name = daemonset["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"]
    cm = next(d for d in find(docs, "ConfigMap") if d["metadata"]["name"] == name)
    return daemonset, cm


def test_node_agent_daemonset_has_the_host_network_and_three_capabilities() -> None:
    docs = render("node-agent")
    daemonset, cm = _agent(docs)
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["tolerations"] == [{"operator": "Exists"}]  # every node
    (agent,) = pod["containers"]
    ctx = agent["securityContext"]
    assert ctx["capabilities"] == {"add": ["NET_ADMIN", "BPF", "PERFMON"], "drop": ["ALL"]}
    assert "privileged" not in ctx and ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for host_path in ("/lib/modules", "/usr/src"):
        assert mounts[host_path]["readOnly"] is True
        assert volumes[mounts[host_path]["name"]]["hostPath"]["path"] == host_path
    policy_file = agent["args"][agent["args"].index("--policy") + 1]
    assert agent["args"][0] == "node"
    assert str(Path(policy_file).parent) == next(
        m["mountPath"] for m in agent["volumeMounts"] if m["name"] == pod["volumes"][0]["name"]
    )
    # The probes ask the port the agent's policy listens on.
    agent_policy = yaml.safe_load(cm["data"]["policy.yaml"])
    port = int(agent_policy["node"]["admin_listen"].rsplit(":", 1)[1])
    assert agent["ports"][0]["containerPort"] == port
    assert agent["readinessProbe"]["httpGet"]["port"] == agent["ports"][0]["name"]
    assert daemonset["spec"]["template"]["metadata"]["annotations"]["traffic-color.io/inject"] == (
        "false"
    )


def test_node_agent_port_must_match_its_policy() -> None:
    result = _helm(
        "template",
        "tc",
        str(CHART),
        "--set",
        "nodeAgent.enabled=true",
        "--set",
        "nodeAgent.adminPort=15099",
        check=False,
    )
    assert result.returncode != 0
    assert 'nodeAgent.adminPort 15099 does not match node.admin_listen "0.0.0.0:15091"' in (
        result.stderr
    )


def test_node_agent_reads_the_colors_the_pods_set() -> None:
    """The node maps DSCP back to colors: its colors must be the sidecars' colors."""
    docs = render("default", "--set", "nodeAgent.enabled=true")
    _, cm = _agent(docs)
    agent = yaml.safe_load(cm["data"]["policy.yaml"])
    pods = parse_policy(_default_policy(), "policy.content")
    assert {n: c.get("dscp") for n, c in agent["colors"].items()} == {
        n: c.dscp for n, c in pods.colors.items()
    }
    assert any(c.dscp for c in pods.colors.values()), "a color must carry DSCP to the node"
    assert agent["node"]["interfaces"]


def _default_policy() -> str:
    return yaml.safe_load((CHART / "values.yaml").read_text())["policy"]["content"]


def _values_policy(scenario: str, key: str) -> str:
    """The policy text a scenario's values give (``nodeAgent.policy``, ``policy.content``)."""
    section, field = key.split(".")
    text = yaml.safe_load((CHART / "values.yaml").read_text())[section][field]
    for f in SCENARIOS[scenario]:
        text = (yaml.safe_load(f.read_text()).get(section) or {}).get(field, text)
    return text


@pytest.mark.parametrize(
    ("scenario", "extra"),
    [
        ("default", ("--set", "nodeAgent.enabled=true")),
        ("node-agent", ()),
        ("example-node-agent", ()),
    ],
)
def test_node_agent_policy_configmap_is_one_the_agent_accepts(
    scenario: str, extra: tuple[str, ...]
) -> None:
    """What the DaemonSet mounts parses as the agent would parse it, and says what values say."""
    from sidecar.node import check_node_policy

    docs = render(scenario, *extra)
    daemonset, cm = _agent(docs)
    text = cm["data"]["policy.yaml"]
    given = _values_policy(scenario, "nodeAgent.policy")
    # Byte for byte (but the block scalar's last newline): a line number in the agent's
    # complaint is a line of the values file's nodeAgent.policy.
    assert text.rstrip("\n") == given.rstrip("\n")
    policy = parse_policy(text, "nodeAgent.policy")
    assert check_node_policy(policy) is None
    want = yaml.safe_load(given)
    assert policy.node.interfaces == tuple(want["node"]["interfaces"])
    assert {n: (c.mark, c.dscp) for n, c in policy.colors.items()} == {
        n: (c["mark"], c.get("dscp")) for n, c in want["colors"].items()
    }
    (agent,) = daemonset["spec"]["template"]["spec"]["containers"]
    assert policy.node.admin_listen.port == agent["ports"][0]["containerPort"]
    routes = {
        n: (cr.table, [(str(r.dst), str(r.via)) for r in cr.routes])
        for n, cr in policy.datapath.routing.colors.items()
    }
    assert routes == {
        n: (c["table"], [(r["dst"], r["via"]) for r in c.get("routes", [])])
        for n, c in (want["datapath"]["routing"]["colors"] or {}).items()
    }
    # The pods' policy of the same release: every color a sidecar marks with DSCP is
    # one the agent maps back, with the same DSCP.
    (pods_cm,) = [
        d
        for d in find(docs, "ConfigMap")
        if d["metadata"]["name"] == "traffic-color-policy"
        and d["metadata"]["namespace"] == NAMESPACE
    ]
    pods = parse_policy(pods_cm["data"]["policy.yaml"], "policy.content")
    assert pods_cm["data"]["policy.yaml"].rstrip("\n") == (
        _values_policy(scenario, "policy.content").rstrip("\n")
    )
    carried = {n: c.dscp for n, c in pods.colors.items() if c.dscp is not None}
    assert carried and carried == {n: policy.colors[n].dscp for n in carried}


def test_with_the_node_agent_injected_sidecars_get_no_capability() -> None:
    config = inject_config(render("node-agent"))
    assert config.datapath is True  # the pods' policy turns the classifier on...
    new, _ = inject_pod(_app_pod(), config)
    capture, sidecar = new["spec"]["initContainers"]
    # ...yet the node does the kernel's part: nothing but capture's two capabilities.
    assert sidecar["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert sidecar["securityContext"]["runAsUser"] == 1337
    assert capture["securityContext"]["capabilities"]["add"] == ["NET_ADMIN", "NET_RAW"]
    assert not any("hostPath" in v for v in new["spec"]["volumes"])
    assert schema_errors(new) == []


def test_pod_security_levels_of_the_charts_own_pods() -> None:
    docs = render("node-agent")
    webhook = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pss.level(webhook) == "restricted"
    agent = one(docs, "DaemonSet")["spec"]["template"]["spec"]
    assert pss.level(agent) == "privileged"  # host network, host paths, capabilities
