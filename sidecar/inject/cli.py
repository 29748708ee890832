"""``traffic-color inject -f FILE|-``: print manifests with the sidecar added.

Reads one or more YAML (or JSON) documents, injects every pod template it finds
and writes YAML to stdout, one note per workload to stderr. The same settings
file that the chart mounts into the webhook can be passed with ``--config``, so
injecting by hand gives what the cluster would give.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import yaml

from sidecar.inject.mutation import InjectConfig, inject_object


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by ``inject`` and ``webhook`` that shape the injected container."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="injection settings (YAML, camelCase keys; the chart's inject-config ConfigMap)",
    )
    parser.add_argument("--image", help="sidecar image (default: traffic-color:VERSION)")
    parser.add_argument(
        "--color",
        dest="default_color",
        help="color for pods without a traffic-color.io/color label",
    )
    parser.add_argument(
        "--policy-configmap", dest="policy_config_map", help="ConfigMap holding policy.yaml"
    )
    parser.add_argument(
        "--native-sidecar",
        action="store_true",
        default=None,
        help="inject an init container with restartPolicy: Always (Kubernetes >= 1.29)",
    )
    parser.add_argument(
        "--kube-version",
        help="the cluster's Kubernetes version: native sidecars from 1.29 unless set otherwise",
    )
    parser.add_argument(
        "--no-proxy-env",
        dest="proxy_env",
        action="store_false",
        default=None,
        help="do not set HTTP_PROXY/NO_PROXY in app containers",
    )


CONFIG_KEY = "inject.json"  # the data key of the chart's inject-config ConfigMap


class ConfigError(ValueError):
    """The ``--config`` file cannot be used; the message names the file."""


def _settings(path: str) -> Mapping[str, Any]:
    """The settings mapping of ``path``: a settings file, or the chart's ConfigMap.

    The ConfigMap may come alone or inside ``helm template``'s whole output:
    the one whose data holds ``inject.json`` is used, as the webhook mounts it.
    """
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d is not None]
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not YAML or JSON: {exc}") from None
    maps = [d for d in docs if isinstance(d, Mapping) and d.get("kind") == "ConfigMap"]
    if not maps:
        if len(docs) > 1 or (docs and not isinstance(docs[0], Mapping)):
            raise ConfigError(f"{path}: expected a mapping of injection settings")
        return docs[0] if docs else {}
    holding = [m for m in maps if CONFIG_KEY in (m.get("data") or {})]
    if len(holding) != 1:
        names = ", ".join(str((m.get("metadata") or {}).get("name")) for m in maps)
        raise ConfigError(
            f"{path}: expected one ConfigMap with data key '{CONFIG_KEY}', "
            f"found {len(holding)} among ConfigMaps {names}"
        )
    name = (holding[0].get("metadata") or {}).get("name")
    try:
        loaded = yaml.safe_load(holding[0]["data"][CONFIG_KEY]) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: ConfigMap {name} data.{CONFIG_KEY}: {exc}") from None
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"{path}: ConfigMap {name} data.{CONFIG_KEY}: expected a mapping")
    return loaded


def config_from_args(args: argparse.Namespace) -> InjectConfig:
    """Settings file first, then flags on top; missing attributes mean 'not given'."""
    data: dict[str, Any] = {}
    path = getattr(args, "config", None)
    if path:
        data.update(_settings(path))
    try:
        config = InjectConfig.from_mapping(data)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
    overrides = {}
    for name in ("image", "default_color", "policy_config_map", "native_sidecar", "proxy_env"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if getattr(args, "kube_version", None):
        overrides["kube_version"] = args.kube_version
    return dataclasses.replace(config, **overrides)


def inject_stream(text: str, config: InjectConfig, out: TextIO, err: TextIO) -> int:
    """Inject every document in ``text``; write YAML to ``out``. Returns how many were pods."""
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    results = []
    count = 0
    for doc in docs:
        if not isinstance(doc, Mapping):
            raise ValueError(f"expected Kubernetes objects, got a {type(doc).__name__}")
        new, notes = inject_object(doc, config)
        results.append(new)
        count += len(notes)
        for note in notes:
            print(f"traffic-color inject: {note}", file=err)
    yaml.safe_dump_all(
        results, out, sort_keys=False, default_flow_style=False, explicit_start=len(results) > 1
    )
    return count


def run_inject(args: argparse.Namespace) -> int:
    """Entry point of ``traffic-color inject``; 0 on success, 2 on bad input."""
    source = getattr(args, "file", "-") or "-"
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"traffic-color inject: {exc}", file=sys.stderr)
        return 2
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
        inject_stream(text, config, sys.stdout, sys.stderr)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"traffic-color inject: {source}: {exc}", file=sys.stderr)
        return 2
    return 0
