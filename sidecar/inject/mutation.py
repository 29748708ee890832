"""Add the traffic-color sidecar to a pod: one pure mutation behind two doors.

``traffic-color inject`` (files, like ``istioctl kube-inject``) and the admission
webhook (``POST /mutate``) both call :func:`inject_pod`; the CLI walks workload
objects down to their pod template, the webhook turns the result into a JSONPatch
with :func:`json_patch`. Nothing here does I/O, so every decision is testable with
plain dicts, and the two doors cannot drift apart.

What a pod gets (charts/traffic-color/README.md has the why of each):

- capture mode (default): an init container ``traffic-color-capture`` that runs
  ``traffic-color capture install`` with the pod's policy (NET_ADMIN and NET_RAW
  only), so every TCP connection in and out passes the sidecar; with
  ``traffic-color.io/capture: "false"``, HTTP_PROXY mode: proxy variables instead;
- the sidecar, as a native sidecar (init container with ``restartPolicy: Always``
  and a startupProbe on ``/readyz``) where Kubernetes >= 1.29, else as the first
  container with a postStart hook that holds the app until ``/readyz`` answers;
- uid 1337 and no capabilities unless the pod itself loads the kernel data path.

Injection is idempotent: a pod that already has a container called
``traffic-color`` (regular or native sidecar) is returned unchanged, so running
``inject`` twice, or a webhook being reinvoked, changes nothing.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sidecar import __version__
from sidecar.inject import annotations as ann
from sidecar.inject.annotations import AnnotationError
from sidecar.inject.config import InjectConfig

__all__ = ["AnnotationError", "InjectConfig", "inject_object", "inject_pod", "json_patch"]

SIDECAR_NAME = "traffic-color"
CAPTURE_NAME = "traffic-color-capture"
# capture.owner_uid's default: the capture rules never redirect this uid's connections.
SIDECAR_UID = 1337

# Keys the user sets (annotation names live in sidecar.inject.annotations).
LABEL_COLOR = "traffic-color.io/color"
NAMESPACE_LABEL = "traffic-color.io/inject"  # namespace opt-in: "enabled"
ANNOTATION_INJECT = ann.INJECT
ANNOTATION_PROXY_ENV = ann.PROXY_ENV
ANNOTATION_POLICY = ann.POLICY
ANNOTATION_STATUS = ann.STATUS
DEFAULT_CONTAINER = "kubectl.kubernetes.io/default-container"
# The sidecar's /metrics serves the app's metrics fetched from here (issue 12).
APP_METRICS_ENV = "TRAFFIC_COLOR_APP_METRICS"

# Ports match the default policy (sidecar/policy.py). Names are IANA service
# names (at most 15 characters) so a Service can say ``targetPort: tc-inbound``.
OUTBOUND_PORT = 15001
INBOUND_PORT = 15006
ADMIN_PORT = 15090
PORT_NAMES = {OUTBOUND_PORT: "tc-outbound", INBOUND_PORT: "tc-inbound", ADMIN_PORT: "tc-admin"}

POLICY_DIR = "/etc/traffic-color"
POLICY_FILE = "policy.yaml"
POLICY_PATH = f"{POLICY_DIR}/{POLICY_FILE}"
CAPTURE_CAPABILITIES = ("NET_ADMIN", "NET_RAW")
# How long the app is held for the sidecar (postStart hook, or startupProbe periods).
READY_WAIT_SECONDS = 120

# Host paths the data path reads: kernel headers for BCC's compile, and bpffs.
HOST_MOUNTS = (
    ("tc-lib-modules", "/lib/modules"),
    ("tc-usr-src", "/usr/src"),
    ("tc-bpffs", "/sys/fs/bpf"),
)
POLICY_VOLUME = "tc-policy"
TMP_VOLUME = "tc-tmp"

FALSE_VALUES = ann.FALSE_VALUES
WORKLOAD_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}


# ----------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Plan:
    """Everything decided about one pod before any container is built."""

    native: bool  # native sidecar (init container) or first regular container
    capture: bool  # capture init container, else HTTP_PROXY mode
    kernel: bool  # the sidecar loads the classifier: capabilities and host mounts
    proxy_env: bool  # HTTP_PROXY mode and not opted out
    capture_lists: Mapping[str, tuple[str, ...]]
    resources: Mapping[str, Any]
    policy_config_map: str
    app_metrics: str | None  # the app's metrics URL, merged into the sidecar's /metrics
    point_metrics: bool  # prometheus.io/* annotations name the sidecar


def skip_reason(pod_meta: Mapping[str, Any], pod_spec: Mapping[str, Any]) -> str | None:
    """Why this pod must not get a sidecar, or None when it should.

    Already injected is a reason too: that is what makes injection idempotent.
    """
    annotations = pod_meta.get("annotations") or {}
    if ann.is_false(annotations, ANNOTATION_INJECT):
        return f"opted out by annotation {ANNOTATION_INJECT}"
    names = [c.get("name") for c in (pod_spec.get("containers") or [])]
    names += [c.get("name") for c in (pod_spec.get("initContainers") or [])]
    if SIDECAR_NAME in names or CAPTURE_NAME in names:
        return "already injected"
    if pod_spec.get("hostNetwork"):
        # Capture rules and tc programs would land on the node's own interfaces;
        # refuse rather than surprise the node.
        return "pod uses hostNetwork"
    return None


def plan_pod(
    pod_meta: Mapping[str, Any], pod_spec: Mapping[str, Any], config: InjectConfig
) -> Plan:
    """Decide the pod's mode, resources and metrics; AnnotationError on a bad annotation."""
    annotations = pod_meta.get("annotations") or {}
    capture = config.capture
    if ann.CAPTURE in annotations:
        capture = not ann.is_false(annotations, ann.CAPTURE)
    kernel = config.kernel_in_pod()
    base = config.datapath_resources if kernel else config.resources
    defaults = {name: getattr(config, name) for name in ann.CAPTURE_LISTS}
    lists = ann.capture_lists(defaults, annotations) if capture else {}
    app_metrics, point = _metrics_plan(annotations, pod_spec, config)
    return Plan(
        native=config.native(),
        capture=capture,
        kernel=kernel,
        proxy_env=not capture and config.proxy_env and not ann.is_false(annotations, ann.PROXY_ENV),
        capture_lists=lists,
        resources=ann.resources(base, annotations),
        policy_config_map=str(annotations.get(ANNOTATION_POLICY) or config.policy_config_map),
        app_metrics=app_metrics,
        point_metrics=point,
    )


def _metrics_plan(
    annotations: Mapping[str, Any], pod_spec: Mapping[str, Any], config: InjectConfig
) -> tuple[str | None, bool]:
    """``(app metrics URL or None, point prometheus.io/* at the sidecar)``.

    The annotations name one port per pod. A pod without them gets the sidecar's.
    A pod that has its own (Istio's Bookinfo productpage does) keeps being
    scraped at the same place only if merging is off; with merging (the
    default) they point at the sidecar, which serves the app's series too, as
    Istio's metrics merging does. HTTPS app metrics cannot be fetched over
    loopback without the app's CA: those pods keep their annotations.
    """
    scrape = annotations.get("prometheus.io/scrape")
    has_own = scrape is not None or "prometheus.io/port" in annotations
    if not has_own:
        return None, True
    if str(scrape).strip().lower() in FALSE_VALUES:
        return None, False  # the pod asked not to be scraped
    if not config.merge_metrics or ann.is_false(annotations, ann.MERGE_METRICS):
        return None, False
    if str(annotations.get("prometheus.io/scheme", "http")).lower() != "http":
        return None, False
    port = str(annotations.get("prometheus.io/port", "")).strip()
    if not port:
        declared = [
            p.get("containerPort")
            for c in pod_spec.get("containers") or []
            for p in c.get("ports") or []
            if p.get("protocol", "TCP") == "TCP"
        ]
        port = str(declared[0]) if declared else ""
    if not port.isdigit() or not 0 < int(port) < 65536:
        return None, False
    path = str(annotations.get("prometheus.io/path") or "/metrics")
    if not path.startswith("/"):
        path = "/" + path
    return f"http://127.0.0.1:{port}{path}", True


def no_proxy_value(config: InjectConfig) -> str:
    """NO_PROXY: loopback always; the cluster's service domain only when asked for."""
    hosts = ["localhost", "127.0.0.1", "::1"]
    if config.bypass_cluster_domain:
        hosts += [".svc", f".{config.cluster_domain}"]
    hosts += [h for h in config.no_proxy_extra if h not in hosts]
    return ",".join(hosts)


def status_value(plan: Plan, config: InjectConfig) -> str:
    """The status annotation: what was injected, by which version and settings.

    ``config`` is the digest of the injection settings: pods whose digest differs
    from the webhook's (``traffic_color_webhook_config_info``) were injected by
    another version or other values and get the new sidecar when restarted.
    """
    return json.dumps(
        {
            "state": "injected",
            "version": __version__,
            "sidecar": "native" if plan.native else "container",
            "traffic": "capture" if plan.capture else "http-proxy",
            "kernel": "pod" if plan.kernel else ("node-agent" if config.node_agent else "off"),
            "config": config.digest(),
        },
        separators=(",", ":"),
    )


# ---------------------------------------------------------------- containers


def _security_context(privileged_uid: bool, add: tuple[str, ...]) -> dict[str, Any]:
    """Root only with added capabilities (a non-root container gets none in its
    effective set, kubernetes#56374); uid 1337 otherwise, so the capture rules
    skip the sidecar's own connections and PSS restricted is met."""
    ctx: dict[str, Any] = {
        "runAsUser": 0 if privileged_uid else SIDECAR_UID,
        "runAsGroup": SIDECAR_UID,
        "runAsNonRoot": not privileged_uid,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"add": list(add), "drop": ["ALL"]} if add else {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    return ctx


def sidecar_container(plan: Plan, config: InjectConfig) -> dict[str, Any]:
    """The sidecar container spec (also used as a native sidecar init container)."""
    env: list[dict[str, Any]] = [
        {
            "name": "TRAFFIC_COLOR",
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{LABEL_COLOR}']"}},
        },
        {"name": "TRAFFIC_COLOR_POLICY", "value": POLICY_PATH},
    ]
    if plan.app_metrics:
        env.append({"name": APP_METRICS_ENV, "value": plan.app_metrics})
    ready = {"path": "/readyz", "port": PORT_NAMES[ADMIN_PORT]}
    container: dict[str, Any] = {
        "name": SIDECAR_NAME,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "args": ["run"],
        "env": env,
        "ports": [
            {"name": PORT_NAMES[port], "containerPort": port, "protocol": "TCP"}
            for port in (OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT)
        ],
    }
    if plan.native:
        # Kubernetes >= 1.29: the next init container, and the app, start only once
        # this probe passed; the sidecar stops after the app's containers exited.
        container["restartPolicy"] = "Always"
        container["startupProbe"] = {
            "httpGet": dict(ready),
            "periodSeconds": 1,
            "failureThreshold": READY_WAIT_SECONDS,
        }
    else:
        # The kubelet starts containers in order and runs each one's postStart
        # hook before starting the next: the app waits for the sidecar's /readyz
        # (as Istio's holdApplicationUntilProxyStarts).
        container["lifecycle"] = {
            "postStart": {
                "exec": {
                    "command": [
                        "traffic-color",
                        "wait-ready",
                        "--timeout",
                        str(READY_WAIT_SECONDS),
                    ]
                }
            }
        }
    container["livenessProbe"] = {
        "httpGet": {"path": "/healthz", "port": PORT_NAMES[ADMIN_PORT]},
        "periodSeconds": 10,
        "failureThreshold": 3,
    }
    container["readinessProbe"] = {"httpGet": ready, "periodSeconds": 5, "failureThreshold": 2}
    container["resources"] = copy.deepcopy(dict(plan.resources))
    add = tuple(config.datapath_capabilities) if plan.kernel else ()
    container["securityContext"] = _security_context(plan.kernel, add)
    mounts = [
        {"name": POLICY_VOLUME, "mountPath": POLICY_DIR, "readOnly": True},
        {"name": TMP_VOLUME, "mountPath": "/tmp"},
    ]
    if plan.kernel:
        mounts += [{"name": n, "mountPath": path, "readOnly": True} for n, path in HOST_MOUNTS]
    container["volumeMounts"] = mounts
    return container


def capture_args(plan: Plan) -> list[str]:
    """``traffic-color capture install`` with the pod's policy and this pod's lists.

    ``--exclude-*`` add to the policy's own lists; ``--include-outbound-cidrs``
    replaces the policy's (``*``: every destination).
    """
    args = ["capture", "install", "--policy", POLICY_PATH]
    for name, items in plan.capture_lists.items():
        if items:
            args.append(f"--{name.replace('_', '-')}={','.join(items)}")
    return args


def capture_container(plan: Plan, config: InjectConfig) -> dict[str, Any]:
    """The init container that installs the pod's nftables redirect, then exits."""
    return {
        "name": CAPTURE_NAME,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "args": capture_args(plan),
        "resources": copy.deepcopy(dict(config.capture_resources)),
        "securityContext": _security_context(True, CAPTURE_CAPABILITIES),
        "volumeMounts": [{"name": POLICY_VOLUME, "mountPath": POLICY_DIR, "readOnly": True}],
    }


def sidecar_volumes(plan: Plan) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": POLICY_VOLUME, "configMap": {"name": plan.policy_config_map}},
        {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": "64Mi"}},
    ]
    if plan.kernel:
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
    is returned, ``new_pod`` equals the input. A bad traffic-color.io annotation
    raises :class:`AnnotationError`.
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
    plan = plan_pod(meta, spec, config)

    # The color label feeds TRAFFIC_COLOR through the downward API; a pod
    # without one gets the default, so `kubectl get pods -L` shows every color.
    if not labels.get(LABEL_COLOR):
        labels[LABEL_COLOR] = config.default_color
    meta["labels"] = labels

    if plan.point_metrics:
        annotations["prometheus.io/scrape"] = "true"
        annotations["prometheus.io/port"] = str(ADMIN_PORT)
        annotations["prometheus.io/path"] = "/metrics"
    annotations[ANNOTATION_STATUS] = status_value(plan, config)

    containers = spec.setdefault("containers", [])
    if plan.proxy_env:
        for container in containers:
            _proxy_env(container, config)
    sidecar = sidecar_container(plan, config)
    inits = list(spec.get("initContainers") or [])
    if plan.native:
        # Capture first, then the sidecar: the app's own init containers already
        # run captured, with their proxy up.
        head = [capture_container(plan, config)] if plan.capture else []
        spec["initContainers"] = [*head, sidecar, *inits]
    else:
        # No proxy runs during init containers here, so capture goes last: the
        # app's init containers keep a working (uncaptured) network.
        if plan.capture:
            spec["initContainers"] = [*inits, capture_container(plan, config)]
        if containers and DEFAULT_CONTAINER not in annotations:
            # The sidecar goes first; kubectl exec/logs should still mean the app.
            annotations[DEFAULT_CONTAINER] = containers[0].get("name")
        spec["containers"] = [sidecar, *containers]
    meta["annotations"] = annotations
    taken = {v.get("name") for v in spec.get("volumes") or []}
    new_volumes = [v for v in sidecar_volumes(plan) if v["name"] not in taken]
    spec["volumes"] = [*(spec.get("volumes") or []), *new_volumes]
    out["spec"] = spec
    return out, None


def _inject_named(
    pod: Mapping[str, Any], config: InjectConfig, what: str
) -> tuple[dict[str, Any], str | None]:
    try:
        return inject_pod(pod, config)
    except AnnotationError as exc:
        raise ValueError(f"{what}: {exc}") from exc


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
        new, reason = _inject_named(obj, config, f"Pod/{name}")
        return new, [f"Pod/{name}: {reason or 'injected'}"]
    path = WORKLOAD_TEMPLATE_PATHS.get(kind)
    if path is None:
        return copy.deepcopy(dict(obj)), []
    out = copy.deepcopy(dict(obj))
    parent = out
    for key in path[:-1]:
        parent = parent.setdefault(key, {})
    template = parent.get(path[-1]) or {}
    new_template, reason = _inject_named(template, config, f"{kind}/{name}")
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
