"""``traffic-color analyze -f DIR|FILE...``: what would go wrong if these manifests were applied.

Like ``istioctl analyze`` on files: it reads a set of manifests (Namespaces,
workloads, Services, ConfigMaps) and reports, per object and with its file and
line, what injection and the sidecar would trip over:

=====  =======  ==========================================================
code   level    finding
=====  =======  ==========================================================
TC100  error    a file that is not YAML
TC101  error    an injected namespace without the policy ConfigMap its pods mount
TC102  error    a policy ConfigMap whose policy is rejected (lines of the file)
TC103  error    a pod color (label ``traffic-color.io/color``) the policy lacks:
                the sidecar refuses to start
TC104  warning  a workload opting out of injection in an injected namespace
TC105  warning  a Service that reaches the app, not the sidecar, where capture
                is off (its targetPort is not the sidecar's inbound port)
TC106  error    a lane route whose lane Service is not in the set
=====  =======  ==========================================================

Errors exit 1, warnings alone exit 0. ``analyze`` is pure over loaded
documents; ``load`` does the reading. Only what is in the set is known: a
namespace not in the set is taken as not injected.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from sidecar.errors import PolicyError
from sidecar.inject.mutation import (
    ANNOTATION_INJECT,
    ANNOTATION_POLICY,
    FALSE_VALUES,
    INBOUND_PORT,
    LABEL_COLOR,
    NAMESPACE_LABEL,
    POLICY_VOLUME,
    PORT_NAMES,
    SIDECAR_NAME,
    WORKLOAD_TEMPLATE_PATHS,
    InjectConfig,
)
from sidecar.manifests import (
    Doc,
    EmbeddedPolicy,
    embedded_policies,
    load_text,
    manifest_files,
    relocate,
)
from sidecar.policy import COLOR_NAME_RE, Policy, parse_address, parse_policy

# Pod annotation of transparent capture (issue 12): "false" keeps HTTP_PROXY mode,
# where inbound traffic reaches the sidecar only through a Service's targetPort.
ANNOTATION_CAPTURE = "traffic-color.io/capture"
SIDECAR_INBOUND = (INBOUND_PORT, PORT_NAMES[INBOUND_PORT])
DEFAULT_POLICY_CONFIGMAP = InjectConfig().policy_config_map


@dataclass(frozen=True)
class Finding:
    level: str  # "error" or "warning"
    code: str
    object: str  # "Kind namespace/name"
    path: str
    line: int
    message: str

    def format(self) -> str:
        return (
            f"{self.level.title()} [{self.code}] ({self.object} {self.path}:{self.line}) "
            f"{self.message}"
        )


@dataclass(frozen=True)
class Workload:
    """A pod or a workload's pod template, reduced to what the checks read."""

    doc: Doc
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    spec: Mapping[str, Any]

    @property
    def has_sidecar(self) -> bool:
        spec = self.spec
        containers = [*(spec.get("containers") or []), *(spec.get("initContainers") or [])]
        return any(isinstance(c, dict) and c.get("name") == SIDECAR_NAME for c in containers)

    @property
    def opted_out(self) -> bool:
        return str(self.annotations.get(ANNOTATION_INJECT, "")).lower() in FALSE_VALUES

    @property
    def capture_off(self) -> bool:
        return str(self.annotations.get(ANNOTATION_CAPTURE, "")).lower() in FALSE_VALUES

    def policy_configmap(self, default: str) -> str:
        """The ConfigMap its sidecar mounts: annotation, injected volume, else the default."""
        named = self.annotations.get(ANNOTATION_POLICY)
        if named:
            return str(named)
        for vol in self.spec.get("volumes") or []:
            if isinstance(vol, dict) and vol.get("name") == POLICY_VOLUME:
                return str((vol.get("configMap") or {}).get("name") or default)
        return default


def _workload(doc: Doc) -> Workload | None:
    if doc.kind == "Pod":
        template: Any = doc.obj
    elif doc.kind in WORKLOAD_TEMPLATE_PATHS:
        template = doc.obj
        for key in WORKLOAD_TEMPLATE_PATHS[doc.kind]:
            template = template.get(key) if isinstance(template, dict) else None
    else:
        return None
    if not isinstance(template, dict):
        return None
    meta = template.get("metadata") if isinstance(template.get("metadata"), dict) else {}
    spec = template.get("spec") if isinstance(template.get("spec"), dict) else {}
    return Workload(
        doc,
        {str(k): str(v) for k, v in (meta.get("labels") or {}).items()},
        {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()},
        spec,
    )


class _Policies:
    """Policy ConfigMaps of the set by (namespace, name), each parsed once."""

    def __init__(self, docs: list[Doc]) -> None:
        self.found: dict[tuple[str, str], tuple[EmbeddedPolicy, Policy | None]] = {}
        self.findings: list[Finding] = []
        for doc in docs:
            for emb in embedded_policies(doc):
                self.found[(doc.namespace, doc.name)] = (emb, self._parse(emb))

    def _parse(self, emb: EmbeddedPolicy) -> Policy | None:
        try:
            return parse_policy(_model_text(emb.text), emb.doc.path)
        except PolicyError as exc:
            for issue in relocate(exc, emb).issues:
                message = f"policy rejected: {issue.message}"
                self.findings.append(_finding("error", "TC102", emb.doc, message, issue.line))
            return None


# Keys of ``outbound`` that lane routing (issue 14) adds; read from the raw YAML by
# ``_lanes`` while the policy model here does not know them yet.
LANE_KEYS = ("routes", "cluster_domain")


def _model_text(text: str) -> str:
    """``text`` with the lane keys the policy model lacks blanked out, lines kept in place."""
    missing = [k for k in LANE_KEYS if k not in Policy.__dataclass_fields__]
    if not missing:
        return text
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return text  # parse_policy reports it
    outbound = _get(root, "outbound")
    if not isinstance(outbound, yaml.MappingNode):
        return text
    drop = [
        (k, v) for k, v in outbound.value if isinstance(k, yaml.ScalarNode) and k.value in missing
    ]
    if not drop:
        return text
    if len(drop) == len(outbound.value):  # nothing else under outbound: drop the section
        drop = [
            (k, v)
            for k, v in root.value
            if isinstance(k, yaml.ScalarNode) and k.value == "outbound"
        ]
    lines = text.splitlines(keepends=True)
    for knode, vnode in drop:
        first, last = knode.start_mark.line, vnode.end_mark.line
        if vnode.end_mark.column == 0:
            last -= 1
        if knode.start_mark.column != _indent(lines[first]):
            return text  # a flow mapping on one line: leave it, and its error, alone
        for i in range(first, last + 1):
            lines[i] = "\n"
    return "".join(lines)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _finding(level: str, code: str, doc: Doc, message: str, line: int | None = None) -> Finding:
    return Finding(level, code, doc.ref(), doc.path, line or doc.line, message)


def _injected_namespaces(docs: list[Doc]) -> dict[str, Doc]:
    out = {}
    for doc in docs:
        if doc.kind != "Namespace":
            continue
        labels = (doc.obj.get("metadata") or {}).get("labels") or {}
        if isinstance(labels, dict) and labels.get(NAMESPACE_LABEL) == "enabled":
            out[doc.name] = doc
    return out


def _lane_service(host: str, namespace: str) -> tuple[str, str] | None:
    """(namespace, Service name) a lane host names in the cluster; None for other hosts."""
    addr = parse_address(host)
    name = addr.host if addr is not None else host
    labels = name.rstrip(".").split(".")
    if any(not part or part.isdigit() for part in labels) or ":" in name:
        return None  # an IP literal or a malformed name: not a Service
    if len(labels) == 1:
        return namespace, labels[0]
    if len(labels) == 2 or labels[2] == "svc":
        return labels[1], labels[0]
    return None  # a name outside the cluster


def _lanes(emb: EmbeddedPolicy) -> Iterable[tuple[str, str, str, int]]:
    """(route host, color, lane host, line) of every ``outbound.routes[].lanes`` entry.

    Read from the raw YAML, so lanes are found even where the policy has other errors.
    """
    try:
        root = yaml.compose(emb.text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return
    routes = _get(_get(root, "outbound"), "routes")
    for route in routes.value if isinstance(routes, yaml.SequenceNode) else []:
        host = _get(route, "host")
        route_host = str(host.value) if isinstance(host, yaml.ScalarNode) else ""
        lanes = _get(route, "lanes")
        for knode, vnode in lanes.value if isinstance(lanes, yaml.MappingNode) else []:
            if isinstance(vnode, yaml.ScalarNode):
                line = emb.first_line + vnode.start_mark.line if emb.first_line else emb.key_line
                yield route_host, str(knode.value), str(vnode.value), line


def _get(node: yaml.Node | None, key: str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return v
    return None


def analyze(docs: list[Doc], policy_configmap: str = DEFAULT_POLICY_CONFIGMAP) -> list[Finding]:
    """Every finding for the set ``docs``, errors first, then by file and line."""
    policies = _Policies(docs)
    findings = list(policies.findings)
    injected = _injected_namespaces(docs)
    workloads = [w for w in map(_workload, docs) if w is not None]
    services = {(d.namespace, d.name): d for d in docs if d.kind == "Service"}

    wanted: dict[tuple[str, str], list[Workload]] = {}
    for w in workloads:
        ns = w.doc.namespace
        if ns in injected and w.opted_out and not w.has_sidecar:
            findings.append(
                _finding(
                    "warning",
                    "TC104",
                    w.doc,
                    f"opts out of injection ({ANNOTATION_INJECT}: "
                    f"{w.annotations[ANNOTATION_INJECT]!r}) in injected namespace {ns}: "
                    "its traffic is neither colored nor counted",
                )
            )
        if not (w.has_sidecar or (ns in injected and not w.opted_out)):
            continue
        wanted.setdefault((ns, w.policy_configmap(policy_configmap)), []).append(w)

    for (ns, name), users in sorted(wanted.items()):
        entry = policies.found.get((ns, name))
        if entry is None:
            where = injected.get(ns) or users[0].doc
            pods = ", ".join(sorted({u.doc.ref() for u in users}))
            findings.append(
                _finding(
                    "error",
                    "TC101",
                    where,
                    f"no ConfigMap {ns}/{name} with a policy.yaml in the set, but {pods} "
                    "would mount it: their pods cannot start",
                )
            )
            continue
        policy = entry[1]
        for w in users:
            color = w.labels.get(LABEL_COLOR)
            if policy is None or color is None:
                continue
            if not COLOR_NAME_RE.match(color) or color not in policy.colors:
                findings.append(
                    _finding(
                        "error",
                        "TC103",
                        w.doc,
                        f"pod color {color!r} ({LABEL_COLOR}) is not a color of policy "
                        f"ConfigMap {ns}/{name} ({', '.join(policy.colors)}): "
                        "the sidecar refuses to start",
                    )
                )

    for (ns, _), svc in sorted(services.items()):
        findings.extend(_bypass(svc, [w for w in workloads if w.doc.namespace == ns], injected))

    for (ns, _), (emb, _) in sorted(policies.found.items()):
        for route_host, color, host, line in _lanes(emb):
            # A lane without a namespace takes the route's (reviews.shop -> shop), else
            # the namespace of the pods that mount the policy.
            parts = route_host.split(".")
            target = _lane_service(host, parts[1] if len(parts) > 1 else ns)
            if target is not None and target not in services:
                findings.append(
                    _finding(
                        "error",
                        "TC106",
                        emb.doc,
                        f"lane route for color {color!r} goes to {host}, but Service "
                        f"{target[0]}/{target[1]} is not in the set",
                        line,
                    )
                )
    order = {"error": 0, "warning": 1}
    return sorted(findings, key=lambda f: (order[f.level], f.path, f.line, f.code))


def _bypass(svc: Doc, workloads: list[Workload], injected: dict[str, Doc]) -> list[Finding]:
    spec = svc.obj.get("spec") if isinstance(svc.obj.get("spec"), dict) else {}
    selector = spec.get("selector") or {}
    if not isinstance(selector, dict) or not selector:
        return []
    chosen = [
        w
        for w in workloads
        if all(w.labels.get(str(k)) == str(v) for k, v in selector.items())
        and (w.has_sidecar or (w.doc.namespace in injected and not w.opted_out))
        and w.capture_off
    ]
    if not chosen:
        return []
    out = []
    for port in spec.get("ports") or []:
        if not isinstance(port, dict):
            continue
        target = port.get("targetPort", port.get("port"))
        if target in SIDECAR_INBOUND:
            continue
        pods = ", ".join(sorted({w.doc.ref() for w in chosen}))
        out.append(
            _finding(
                "warning",
                "TC105",
                svc,
                f"port {port.get('port')} goes to targetPort {target} of {pods}, whose capture "
                f'is off ({ANNOTATION_CAPTURE}: "false"): requests skip the sidecar\'s inbound '
                f"side; set targetPort: {PORT_NAMES[INBOUND_PORT]} or turn capture on",
            )
        )
    return out


def load(paths: Iterable[str]) -> tuple[list[Doc], list[Finding], int]:
    """Documents of every manifest file under ``paths``, findings for unreadable files, files."""
    docs: list[Doc] = []
    findings: list[Finding] = []
    files = manifest_files(paths)
    for path in files:
        try:
            text = Path(path).read_text(encoding="utf-8")
            docs.extend(d for d in load_text(text, str(path)) if isinstance(d.obj, dict))
        except OSError as exc:
            findings.append(Finding("error", "TC100", "file", str(path), 1, str(exc)))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else 1
            problem = getattr(exc, "problem", None) or str(exc)
            context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
            if context and cmark is not None:
                problem += f" ({context} started at line {cmark.line + 1})"
            findings.append(Finding("error", "TC100", "file", str(path), line, f"YAML: {problem}"))
    return docs, findings, len(files)


def run_analyze(paths: list[str], as_json: bool, policy_configmap: str) -> int:
    """Entry point of ``traffic-color analyze``: 1 when any error was found, else 0."""
    docs, findings, files = load(paths)
    findings = findings + analyze(docs, policy_configmap)
    errors = sum(f.level == "error" for f in findings)
    if as_json:
        body = {
            "findings": [asdict(f) for f in findings],
            "errors": errors,
            "warnings": len(findings) - errors,
            "objects": len(docs),
            "files": files,
        }
        print(json.dumps(body, indent=2))
    elif not findings:
        print(f"no problems found in {len(docs)} objects of {files} file(s)")
    else:
        for f in findings:
            print(f.format())
    return 1 if errors else 0
