"""Kubernetes manifests on disk: objects with the file and line they start on.

``check`` reads a policy out of a ConfigMap (the form users keep in Git) and
must report lines of that file, not of the embedded text; ``analyze`` names
each finding's object by file and line. Both read documents here. Nothing is
sent anywhere: files in, plain dicts out.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sidecar.errors import PolicyError, PolicyIssue
from sidecar.policy import Policy, parse_policy

POLICY_KEY = "policy.yaml"  # the data key injection mounts (sidecar/inject/mutation.py)
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(frozen=True)
class Doc:
    """One object of a manifest file; ``node`` keeps the YAML positions."""

    obj: Any
    node: yaml.Node
    path: str
    line: int  # 1-based line of the document's first node

    @property
    def kind(self) -> str:
        return self.obj.get("kind", "") if isinstance(self.obj, dict) else ""

    @property
    def name(self) -> str:
        return str(_meta(self.obj).get("name", ""))

    @property
    def namespace(self) -> str:
        return str(_meta(self.obj).get("namespace") or "default")

    def ref(self) -> str:
        """``Kind namespace/name``, as kubectl and istioctl name an object."""
        ns = "" if self.kind == "Namespace" else f"{self.namespace}/"
        return f"{self.kind} {ns}{self.name}"


@dataclass(frozen=True)
class EmbeddedPolicy:
    """A policy inside a ConfigMap: its text and where its first line sits in the file."""

    doc: Doc
    key: str
    text: str
    first_line: int | None  # file line of the text's line 1; None when the style hides it
    key_line: int


def _meta(obj: Any) -> dict:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    return meta if isinstance(meta, dict) else {}


def looks_like_manifest(obj: Any) -> bool:
    """Kubernetes objects carry apiVersion and kind; a policy has neither."""
    return isinstance(obj, dict) and "kind" in obj and "apiVersion" in obj


def load_text(text: str, path: str) -> list[Doc]:
    """Every non-empty document of ``text``; a ``List``'s items become documents too."""
    loader = yaml.SafeLoader(text)
    docs: list[Doc] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            obj = loader.construct_document(node)
            if obj is None:
                continue
            docs.extend(_flatten(Doc(obj, node, path, node.start_mark.line + 1)))
    finally:
        loader.dispose()
    return docs


def _flatten(doc: Doc) -> Iterator[Doc]:
    if doc.kind.endswith("List") and isinstance(doc.obj.get("items"), list):
        items = _value_node(doc.node, "items")
        nodes = items.value if isinstance(items, yaml.SequenceNode) else []
        for i, item in enumerate(doc.obj["items"]):
            node = nodes[i] if i < len(nodes) else doc.node
            yield from _flatten(Doc(item, node, doc.path, node.start_mark.line + 1))
    else:
        yield doc


def _value_node(node: yaml.Node, key: str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return v
    return None


def manifest_files(paths: Iterable[str]) -> list[Path]:
    """Files named, and manifest files under directories named (sorted, recursive)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.suffix in MANIFEST_SUFFIXES))
        else:
            out.append(p)
    return out


def embedded_policies(doc: Doc, key: str = POLICY_KEY) -> list[EmbeddedPolicy]:
    """The policy under ``data[key]`` of a ConfigMap (empty list for other objects)."""
    if doc.kind != "ConfigMap":
        return []
    data = doc.obj.get("data")
    data_node = _value_node(doc.node, "data")
    if not isinstance(data, dict) or key not in data or not isinstance(data[key], str):
        return []
    value = _value_node(data_node, key) if data_node is not None else None
    key_line = value.start_mark.line + 1 if value is not None else doc.line
    first = None
    # A literal block (``|``) keeps its lines one for one, starting below the indicator.
    if isinstance(value, yaml.ScalarNode) and value.style == "|":
        first = value.start_mark.line + 2
    return [EmbeddedPolicy(doc, key, data[key], first, key_line)]


def relocate(err: PolicyError, emb: EmbeddedPolicy) -> PolicyError:
    """The same issues, with lines of the manifest file instead of the embedded text."""
    source = emb.doc.path
    where = f"{emb.doc.ref()} data.{emb.key}"
    issues = [
        PolicyIssue(
            emb.first_line + issue.line - 1 if emb.first_line else emb.key_line,
            f"{issue.message} ({where})",
        )
        for issue in err.issues
    ]
    return PolicyError(source, issues)


def policies_in(text: str, path: str, key: str = POLICY_KEY) -> list[tuple[str, Policy]]:
    """(label, Policy) for a policy file, or for each policy ConfigMap of a manifest file.

    Raises ``PolicyError`` with lines of ``path`` itself, all issues of every
    ConfigMap at once; a manifest file with no ConfigMap holding ``key`` is an
    error too (a typo in the key would otherwise check nothing).
    """
    try:
        docs = load_text(text, path)
    except yaml.YAMLError:
        docs = []  # parse_policy reports the syntax error with its line
    if not any(looks_like_manifest(d.obj) for d in docs):
        return [("", parse_policy(text, path))]
    embedded = [e for d in docs for e in embedded_policies(d, key)]
    if not embedded:
        maps = [d.ref() for d in docs if d.kind == "ConfigMap"]
        found = f" (ConfigMaps: {', '.join(maps)})" if maps else ""
        raise PolicyError(path, [PolicyIssue(1, f"no ConfigMap with data key '{key}'{found}")])
    out, issues = [], []
    for emb in embedded:
        try:
            out.append((f"{emb.doc.ref()} data.{emb.key}", parse_policy(emb.text, path)))
        except PolicyError as exc:
            issues.extend(relocate(exc, emb).issues)
    if issues:
        raise PolicyError(path, issues)
    return out
