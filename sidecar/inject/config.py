"""Injection settings: what the chart decides for every pod, read from its inject-config file.

One frozen dataclass, :class:`InjectConfig`, with camelCase keys in the file (the
chart renders them from values). Unknown keys and wrong types fail loudly when the
webhook starts, so a typo in values.yaml never silently injects a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from sidecar import __version__
from sidecar.inject.annotations import CAPTURE_LISTS, list_item_problem
from sidecar.policy import COLOR_NAME_RE

# Kernel >= 5.8 splits what needed SYS_ADMIN into these. Checked on this project's
# machines: the classifier compiles, loads and attaches with exactly these three;
# without PERFMON the verifier refuses its packet pointer arithmetic
# ("pointer arithmetic ... prohibited for !root"). See the chart README.
DATAPATH_CAPABILITIES = ("NET_ADMIN", "BPF", "PERFMON")

# First Kubernetes minor whose init containers may be sidecars (restartPolicy: Always)
# by default (beta, feature gate on, in 1.29).
NATIVE_SIDECAR_MINOR = 29

_VERSION_RE = re.compile(r"v?(?P<major>\d+)\.(?P<minor>\d+)")


def _list_of(kind: type) -> Any:
    return field(default_factory=tuple, metadata={"list": kind})


@dataclass(frozen=True)
class InjectConfig:
    """What the injected containers look like; the chart renders it from values."""

    image: str = f"traffic-color:{__version__}"
    image_pull_policy: str = "IfNotPresent"
    default_color: str = "stable"
    policy_config_map: str = "traffic-color-policy"
    # True/False force the sidecar's form; None picks native sidecars when
    # kube_version (the chart's .Capabilities.KubeVersion) is 1.29 or later.
    native_sidecar: bool | None = None
    kube_version: str = ""
    # Capture (nftables redirect installed by an init container) or HTTP_PROXY mode.
    capture: bool = True
    exclude_outbound_ports: tuple[str, ...] = _list_of(str)
    exclude_outbound_cidrs: tuple[str, ...] = _list_of(str)
    include_outbound_cidrs: tuple[str, ...] = _list_of(str)
    exclude_inbound_ports: tuple[str, ...] = _list_of(str)
    # HTTP_PROXY mode only: the app's proxy variables.
    proxy_env: bool = True
    cluster_domain: str = "cluster.local"
    # True: NO_PROXY lists .svc and .<cluster_domain>, so in-cluster calls go direct
    # (uncolored): off by default, since that defeats the product's purpose.
    bypass_cluster_domain: bool = False
    no_proxy_extra: tuple[str, ...] = _list_of(str)
    # The pods' policy turns the kernel data path on: the sidecar then gets
    # capabilities and host mounts, unless a node agent does the kernel's part.
    datapath: bool = False
    datapath_capabilities: tuple[str, ...] = _list_of(str)
    node_agent: bool = False
    # Point prometheus.io/* at the sidecar, which serves the app's metrics too.
    merge_metrics: bool = True
    resources: Mapping[str, Any] = field(
        default_factory=lambda: {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"memory": "128Mi"},
        }
    )
    datapath_resources: Mapping[str, Any] = field(
        default_factory=lambda: {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"memory": "256Mi"},
        }
    )
    capture_resources: Mapping[str, Any] = field(
        default_factory=lambda: {
            "requests": {"cpu": "10m", "memory": "32Mi"},
            "limits": {"memory": "64Mi"},
        }
    )

    def __post_init__(self) -> None:
        # The default becomes a label value and TRAFFIC_COLOR: it must be a color name.
        if not COLOR_NAME_RE.match(self.default_color):
            raise ValueError(
                f"default color '{self.default_color}' is not a color name "
                "(lower-case letters, digits and '-', at most 32)"
            )
        if not self.datapath_capabilities:
            object.__setattr__(self, "datapath_capabilities", DATAPATH_CAPABILITIES)
        for name in CAPTURE_LISTS:
            for item in getattr(self, name):
                why = list_item_problem(name, item)
                if why:
                    raise ValueError(f"{_camel(name)}: {why}")
        if self.kube_version and kube_minor(self.kube_version) is None:
            raise ValueError(f"kubeVersion: '{self.kube_version}' is not a Kubernetes version")

    # ------------------------------------------------------------- decisions

    def native(self) -> bool:
        """Native sidecar (init container, restartPolicy: Always) or a regular container."""
        if self.native_sidecar is not None:
            return self.native_sidecar
        minor = kube_minor(self.kube_version)
        return minor is not None and minor >= NATIVE_SIDECAR_MINOR

    def kernel_in_pod(self) -> bool:
        """The sidecar loads the classifier itself (capabilities, host mounts)."""
        return self.datapath and not self.node_agent

    def digest(self) -> str:
        """Digest of every setting plus the version: equal digests inject equal sidecars."""
        data = dataclasses.asdict(self)
        data["version"] = __version__
        text = json.dumps(data, sort_keys=True, default=list)
        return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]

    # ---------------------------------------------------------------- input

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> InjectConfig:
        """Build from a YAML/JSON mapping with camelCase keys (the chart's config file)."""
        names = {f.name: f for f in fields(cls)}
        camel = {_camel(n): n for n in names}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            name = camel.get(key, key if key in names else None)
            if name is None:
                raise ValueError(
                    f"unknown injection setting '{key}' (known: {', '.join(sorted(camel))})"
                )
            kwargs[name] = _checked(key, names[name], value)
        return cls(**kwargs)


def _checked(key: str, f: dataclasses.Field, value: Any) -> Any:
    """The value for field ``f`` from a config file, or ValueError naming ``key``."""
    expected = str(f.type)
    if "list" in f.metadata:
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, str | int) and not isinstance(v, bool) for v in value
        ):
            raise ValueError(f"{key}: expected a list of strings")
        return tuple(str(v) for v in value)
    if f.name == "native_sidecar":
        if value in (None, "auto"):
            return None
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true, false or auto, got {value!r}")
        return value
    if expected == "bool" and not isinstance(value, bool):
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if expected == "str" and not isinstance(value, str):
        raise ValueError(f"{key}: expected a string, got {value!r}")
    if expected.startswith("Mapping") and not isinstance(value, Mapping):
        raise ValueError(f"{key}: expected a mapping")
    return value


def kube_minor(version: str) -> int | None:
    """Minor version of a Kubernetes 1.x version string (``v1.29.3-gke.1``), else None."""
    m = _VERSION_RE.match(version.strip())
    if m is None or m.group("major") != "1":
        return None
    return int(m.group("minor"))


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)
