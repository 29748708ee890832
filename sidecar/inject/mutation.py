"""Add the traffic-color sidecar to a pod: one pure mutation behind two doors.

``traffic-color inject`` (files, like ``istioctl kube-inject``) and the admission
webhook (``POST /mutate``) both call :func:`inject_pod`; the CLI walks workload
objects down to their pod template, the webhook turns the result into a JSONPatch
with :func:`json_patch`. Nothing here does I/O, so every decision is testable with
plain dicts, and the two doors cannot drift apart.

Injection is idempotent: a pod that already has a container called
``traffic-color`` (regular or native sidecar) is returned unchanged, so running
``inject`` twice, or a webhook being reinvoked, changes nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from sidecar import __version__
from sidecar.policy import COLOR_NAME_RE

SIDECAR_NAME = "traffic-color"

# Keys the user sets.
LABEL_COLOR = "traffic-color.io/color"
NAMESPACE_LABEL = "traffic-color.io/inject"  # namespace opt-in: "enabled"
ANNOTATION_INJECT = "traffic-color.io/inject"  # pod opt-out: "false"
ANNOTATION_PROXY_ENV = "traffic-color.io/proxy-env"  # "false": leave app env alone
ANNOTATION_POLICY = "traffic-color.io/policy-configmap"  # per-pod ConfigMap name
# Key the mutation sets, so an operator can see what happened.
ANNOTATION_STATUS = "traffic-color.io/status"

# Ports match the default policy (sidecar/policy.py). Names are IANA service
# names (at most 15 characters) so a Service can say ``targetPort: tc-inbound``.
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
ADMIN_PORT = 15090
PORT_NAMES = {OUTBOUND_PORT: "tc-outbound", INBOUND_PORT: "tc-inbound", ADMIN_PORT: "tc-admin"}

POLICY_DIR = "/etc/traffic-color"
POLICY_FILE = "policy.yaml"

# Why each capability: see charts/traffic-color/README.md ("Capabilities").
CAPABILITIES = ("NET_ADMIN", "BPF", "PERFMON", "SYS_ADMIN")

# Host paths the data path reads: kernel headers for BCC's compile, and bpffs.
HOST_MOUNTS = (
    ("tc-lib-modules", "/lib/modules"),
    ("tc-usr-src", "/usr/src"),
    ("tc-bpffs", "/sys/fs/bpf"),
)
POLICY_VOLUME = "tc-policy"
TMP_VOLUME = "tc-tmp"

FALSE_VALUES = frozenset({"false", "no", "off", "0", "disabled"})
WORKLOAD_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


@dataclass(frozen=True)
class InjectConfig:
    """What the injected container looks like; the chart renders it from values."""

    image: str = f"traffic-color:{__version__}"
    image_pull_policy: str = "IfNotPresent"
    default_color: str = "stable"
    policy_config_map: str = "traffic-color-policy"
    native_sidecar: bool = False
    proxy_env: bool = True
    cluster_domain: str = "cluster.local"
    # True: NO_PROXY lists .svc and .<cluster_domain>, so in-cluster calls go direct.
    bypass_cluster_domain: bool = True
    no_proxy_extra: tuple[str, ...] = ()
    resources: Mapping[str, Any] = field(
        default_factory=lambda: {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"memory": "256Mi"},
        }
    )

    def __post_init__(self) -> None:
        # The default becomes a label value and TRAFFIC_COLOR: it must be a color name.
        if not COLOR_NAME_RE.match(self.default_color):
            raise ValueError(
                f"default color '{self.default_color}' is not a color name "
                "(lower-case letters, digits and '-', at most 32)"
            )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> InjectConfig:
        """Build from a YAML/JSON mapping with camelCase keys (the chart's config file).

        Unknown keys are an error: a typo in values.yaml should fail loudly at
        webhook start, not silently inject the default.
        """
        names = {f.name: f for f in fields(cls)}
        camel = {_camel(n): n for n in names}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            name = camel.get(key, key if key in names else None)
            if name is None:
                raise ValueError(
                    f"unknown injection setting '{key}' (known: {', '.join(sorted(camel))})"
                )
            expected = names[name].type
            if name == "no_proxy_extra":
                if not isinstance(value, list | tuple) or not all(
                    isinstance(v, str) for v in value
                ):
                    raise ValueError(f"{key}: expected a list of strings")
                value = tuple(value)
            elif expected == "bool" and not isinstance(value, bool):
                raise ValueError(f"{key}: expected true or false, got {value!r}")
            elif expected == "str" and not isinstance(value, str):
                raise ValueError(f"{key}: expected a string, got {value!r}")
            elif name == "resources" and not isinstance(value, Mapping):
                raise ValueError(f"{key}: expected a mapping")
            kwargs[name] = value
        return cls(**kwargs)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


# ----------------------------------------------------------------- decisions


def skip_reason(pod_meta: Mapping[str, Any], pod_spec: Mapping[str, Any]) -> str | None:
    """Why this pod must not get a sidecar, or None when it should.

    Already injected is a reason too: that is what makes injection idempotent.
    """
    annotations = pod_meta.get("annotations") or {}
    if str(annotations.get(ANNOTATION_INJECT, "")).lower() in FALSE_VALUES:
        return f"opted out by annotation {ANNOTATION_INJECT}"
    names = [c.get("name") for c in (pod_spec.get("containers") or [])]
    names += [c.get("name") for c in (pod_spec.get("initContainers") or [])]
    if SIDECAR_NAME in names:
        return "already injected"
    if pod_spec.get("hostNetwork"):
        # The sidecar would attach tc programs and policy rules to the node's
        # own interfaces; refuse rather than surprise the node.
        return "pod uses hostNetwork"
    return None


def no_proxy_value(config: InjectConfig) -> str:
    """NO_PROXY: loopback always; the cluster's service domain unless told otherwise."""
    hosts = ["localhost", "127.0.0.1", "::1"]
    if config.bypass_cluster_domain:
        hosts += [".svc", f".{config.cluster_domain}"]
    hosts += [h for h in config.no_proxy_extra if h not in hosts]
    return ",".join(hosts)


def sidecar_container(config: InjectConfig, policy_path: str) -> dict[str, Any]:
    """The sidecar container spec (also used as a native sidecar init container)."""
    container: dict[str, Any] = {
        "name": SIDECAR_NAME,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "args": ["run"],
        "env": [
            {
                "name": "TRAFFIC_COLOR",
                "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{LABEL_COLOR}']"}},
            },
            {"name": "TRAFFIC_COLOR_POLICY", "value": policy_path},
        ],
        "ports": [
            {"name": PORT_NAMES[port], "containerPort": port, "protocol": "TCP"}
            for port in (OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT)
        ],
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": PORT_NAMES[ADMIN_PORT]},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": PORT_NAMES[ADMIN_PORT]},
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
        "resources": copy.deepcopy(dict(config.resources)),
        "securityContext": {
            # Root with a short capability list, not privileged: see the chart README.
            "runAsUser": 0,
            "runAsNonRoot": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"add": list(CAPABILITIES), "drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": POLICY_VOLUME, "mountPath": POLICY_DIR, "readOnly": True},
            {"name": TMP_VOLUME, "mountPath": "/tmp"},
        ]
        + [{"name": name, "mountPath": path, "readOnly": True} for name, path in HOST_MOUNTS],
    }
    if config.native_sidecar:
        # Kubernetes >= 1.29: an init container that keeps running starts before
        # the app and stops after it, so the app never runs without its proxy.
        container["restartPolicy"] = "Always"
    return container


def sidecar_volumes(policy_config_map: str) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": POLICY_VOLUME, "configMap": {"name": policy_config_map}},
        {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": "64Mi"}},
    ]
    volumes += [{"name": name, "hostPath": {"path": path}} for name, path in HOST_MOUNTS]
    return volumes


def _proxy_env(container: dict[str, Any], config: InjectConfig) -> None:
    """Point an app container's HTTP client at the outbound port, keeping what it set.

    Variables come in pairs (clients read either case); a pair the app set
    either half of is left alone, so the two halves never disagree.
    """
    env = container.setdefault("env", [])
    present = {e.get("name") for e in env}
    proxy = f"http://127.0.0.1:{OUTBOUND_PORT}"
    no_proxy = no_proxy_value(config)
    for upper, value in (("HTTP_PROXY", proxy), ("NO_PROXY", no_proxy)):
        pair = (upper, upper.lower())
        if not present.intersection(pair):
            env += [{"name": name, "value": value} for name in pair]


# ------------------------------------------------------------------ the mutation


def inject_pod(pod: Mapping[str, Any], config: InjectConfig) -> tuple[dict[str, Any], str | None]:
    """Return ``(new_pod, skip_reason)``; the input is never modified.

    ``pod`` is a Pod or a pod template (``metadata`` + ``spec``). When a reason
    is returned, ``new_pod`` equals the input.
    """
    reason = skip_reason(pod.get("metadata") or {}, pod.get("spec") or {})
    if reason is not None:
        return copy.deepcopy(dict(pod)), reason
    out = copy.deepcopy(dict(pod))
    meta = out.get("metadata") or {}
    out["metadata"] = meta
    spec = out.get("spec") or {}
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}

    # The color label feeds TRAFFIC_COLOR through the downward API; a pod
    # without one gets the default, so `kubectl get pods -L` shows every color.
    if not labels.get(LABEL_COLOR):
        labels[LABEL_COLOR] = config.default_color
    meta["labels"] = labels

    # Scrape annotations only when the pod has none: they name one port per pod,
    # and the app's own metrics must not be silently replaced.
    if "prometheus.io/scrape" not in annotations and "prometheus.io/port" not in annotations:
        annotations["prometheus.io/scrape"] = "true"
        annotations["prometheus.io/port"] = str(ADMIN_PORT)
        annotations["prometheus.io/path"] = "/metrics"
    annotations[ANNOTATION_STATUS] = "injected"
    meta["annotations"] = annotations

    policy_cm = str(annotations.get(ANNOTATION_POLICY) or config.policy_config_map)
    sidecar = sidecar_container(config, f"{POLICY_DIR}/{POLICY_FILE}")
    want_env = config.proxy_env and (
        str(annotations.get(ANNOTATION_PROXY_ENV, "")).lower() not in FALSE_VALUES
    )
    containers = spec.setdefault("containers", [])
    if want_env:
        for container in containers:
            _proxy_env(container, config)
    if config.native_sidecar:
        spec["initContainers"] = [sidecar, *(spec.get("initContainers") or [])]
    else:
        containers.append(sidecar)
    taken = {v.get("name") for v in spec.get("volumes") or []}
    new_volumes = [v for v in sidecar_volumes(policy_cm) if v["name"] not in taken]
    spec["volumes"] = [*(spec.get("volumes") or []), *new_volumes]
    out["spec"] = spec
    return out, None


def inject_object(obj: Mapping[str, Any], config: InjectConfig) -> tuple[dict[str, Any], list[str]]:
    """Inject into any manifest object; return it and one note per pod template seen.

    Pods and workload kinds are mutated through their pod template; a ``List``
    (or any ``*List``) is walked item by item; other kinds pass through unchanged.
    """
    kind = obj.get("kind", "")
    name = (obj.get("metadata") or {}).get("name", "?")
    if kind == "List" or (kind.endswith("List") and isinstance(obj.get("items"), list)):
        out = copy.deepcopy(dict(obj))
        notes: list[str] = []
        items = []
        for item in obj.get("items") or []:
            new, item_notes = inject_object(item, config)
            items.append(new)
            notes += item_notes
        out["items"] = items
        return out, notes
    if kind == "Pod":
        new, reason = inject_pod(obj, config)
        return new, [f"Pod/{name}: {reason or 'injected'}"]
    path = WORKLOAD_TEMPLATE_PATHS.get(kind)
    if path is None:
        return copy.deepcopy(dict(obj)), []
    out = copy.deepcopy(dict(obj))
    parent = out
    for key in path[:-1]:
        parent = parent.setdefault(key, {})
    template = parent.get(path[-1]) or {}
    new_template, reason = inject_pod(template, config)
    parent[path[-1]] = new_template
    return out, [f"{kind}/{name}: {reason or 'injected'}"]


# ------------------------------------------------------------------- JSONPatch


def _pointer(parts: list[str]) -> str:
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def json_patch(before: Any, after: Any, _path: list[str] | None = None) -> list[dict[str, Any]]:
    """RFC 6902 operations turning ``before`` into ``after``.

    Mappings are compared key by key (so annotation keys with '/' are escaped
    as '~1'); lists and scalars are replaced whole. A pod's container list is
    therefore sent complete, which keeps the patch valid whatever order other
    webhooks ran in.
    """
    path = _path or []
    if isinstance(before, Mapping) and isinstance(after, Mapping):
        ops: list[dict[str, Any]] = []
        for key in before:
            if key not in after:
                ops.append({"op": "remove", "path": _pointer([*path, key])})
        for key, value in after.items():
            if key not in before:
                ops.append({"op": "add", "path": _pointer([*path, key]), "value": value})
            else:
                ops += json_patch(before[key], value, [*path, key])
        return ops
    if before == after and type(before) is type(after):
        return []
    return [{"op": "replace", "path": _pointer(path), "value": after}]
