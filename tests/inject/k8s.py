"""Helpers for the injection tests: an RFC 6902 applier and schema validation.

The applier is written here, independently of ``json_patch``, so a patch is
judged by what it does to the object, not by how it was built.
"""

from __future__ import annotations

import copy
from typing import Any

from tests.ship.tools import module

KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def apply_patch(doc: Any, patch: list[dict[str, Any]]) -> Any:
    """Apply add/remove/replace operations (the ones an admission patch uses)."""
    out = copy.deepcopy(doc)
    for op in patch:
        tokens = [_unescape(t) for t in op["path"].split("/")[1:]]
        parent = out
        for token in tokens[:-1]:
            parent = parent[int(token)] if isinstance(parent, list) else parent[token]
        last = tokens[-1]
        if op["op"] == "add":
            if isinstance(parent, list):
                parent.insert(len(parent) if last == "-" else int(last), op["value"])
            else:
                parent[last] = op["value"]
        elif op["op"] == "replace":
            if isinstance(parent, list):
                parent[int(last)] = op["value"]
            else:
                assert last in parent, f"replace of missing member {op['path']}"
                parent[last] = op["value"]
        elif op["op"] == "remove":
            del parent[int(last) if isinstance(parent, list) else last]
        else:
            raise AssertionError(f"unexpected op {op['op']}")
    return out


def schema_errors(obj: dict[str, Any]) -> list[str]:
    """Strict schema validation against every supported Kubernetes version."""
    kubernetes_validate = module("kubernetes_validate")
    errors = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{version}: {exc.message} at {'/'.join(map(str, exc.path))}")
    return errors
