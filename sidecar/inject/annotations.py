"""Per-pod annotations that change what gets injected, parsed and checked. Pure.

Bad values are an :class:`AnnotationError` naming the annotation and the reason:
the webhook refuses such a pod with that message (the user asked for something
specific that cannot be honoured, so starting the pod with defaults would hide it),
and ``traffic-color inject`` exits 2 with it.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

PREFIX = "traffic-color.io/"
INJECT = PREFIX + "inject"  # pod opt-out: "false"
PROXY_ENV = PREFIX + "proxy-env"  # "false": leave the app's env alone (HTTP_PROXY mode)
POLICY = PREFIX + "policy-configmap"  # per-pod ConfigMap name
CAPTURE = PREFIX + "capture"  # "false": HTTP_PROXY mode instead of capture
MERGE_METRICS = PREFIX + "merge-metrics"  # "false": leave prometheus.io/* alone
STATUS = PREFIX + "status"  # set by the mutation: what was injected

# Capture lists, as Istio's traffic.sidecar.istio.io/* annotations: each replaces
# the chart's value for this pod; the policy's own lists apply on top.
CAPTURE_LISTS = {
    "exclude_outbound_ports": PREFIX + "exclude-outbound-ports",
    "exclude_outbound_cidrs": PREFIX + "exclude-outbound-cidrs",
    "include_outbound_cidrs": PREFIX + "include-outbound-cidrs",
    "exclude_inbound_ports": PREFIX + "exclude-inbound-ports",
}

# The sidecar's resources: annotation -> (section, resource).
RESOURCES = {
    PREFIX + "proxy-cpu": ("requests", "cpu"),
    PREFIX + "proxy-memory": ("requests", "memory"),
    PREFIX + "proxy-cpu-limit": ("limits", "cpu"),
    PREFIX + "proxy-memory-limit": ("limits", "memory"),
}

FALSE_VALUES = frozenset({"false", "no", "off", "0", "disabled"})

_QUANTITY_RE = re.compile(
    r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
    r"(?P<suffix>Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?\Z"
)
_SUFFIX = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    **{s: Decimal(1024**i) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"), start=1)},
}


class AnnotationError(ValueError):
    """A traffic-color.io annotation whose value cannot be honoured."""

    def __init__(self, annotation: str, value: object, why: str) -> None:
        super().__init__(f"annotation {annotation}: {value!r} {why}")
        self.annotation = annotation


def is_false(annotations: Mapping[str, Any], key: str) -> bool:
    return str(annotations.get(key, "")).strip().lower() in FALSE_VALUES


def quantity(text: str) -> Decimal | None:
    """A Kubernetes resource quantity's value (``250m``, ``1.5Gi``, ``1e3``), else None."""
    m = _QUANTITY_RE.match(text.strip())
    if m is None:
        return None
    suffix = m.group("suffix") or ""
    if suffix[:1] in ("e", "E"):
        return Decimal(m.group("num")) * Decimal(10) ** int(suffix[1:])
    return Decimal(m.group("num")) * _SUFFIX[suffix]


def resources(base: Mapping[str, Any], annotations: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with the proxy-cpu/-memory(-limit) annotations applied and checked.

    A request above its limit is refused here with the annotations to change,
    rather than by the API server with a message about a container the user
    never wrote.
    """
    out = copy.deepcopy(dict(base))
    given: dict[tuple[str, str], str] = {}
    for key, (section, name) in RESOURCES.items():
        if key not in annotations:
            continue
        value = str(annotations[key]).strip()
        amount = quantity(value)
        if amount is None or amount <= 0:
            raise AnnotationError(key, annotations[key], "is not a positive Kubernetes quantity")
        out.setdefault(section, {})[name] = value
        given[(section, name)] = key
    for name in ("cpu", "memory"):
        req = (out.get("requests") or {}).get(name)
        lim = (out.get("limits") or {}).get(name)
        if req is None or lim is None:
            continue
        if quantity(str(req)) > quantity(str(lim)):  # type: ignore[operator]
            key = given.get(("requests", name)) or given.get(("limits", name))
            if key is None:
                continue  # the chart's own values: the API server will say so
            raise AnnotationError(
                key,
                annotations[key],
                f"leaves the {name} request {req} above its limit {lim} "
                f"(set {PREFIX}proxy-{name}-limit too)",
            )
    return out


def capture_lists(
    defaults: Mapping[str, tuple[str, ...]], annotations: Mapping[str, Any]
) -> dict[str, tuple[str, ...]]:
    """The four capture lists for this pod: an annotation replaces the chart's value."""
    out: dict[str, tuple[str, ...]] = {}
    for name, key in CAPTURE_LISTS.items():
        if key not in annotations:
            out[name] = tuple(defaults.get(name, ()))
            continue
        items = tuple(i.strip() for i in str(annotations[key]).split(",") if i.strip())
        for item in items:
            why = list_item_problem(name, item)
            if why:
                raise AnnotationError(key, annotations[key], why)
        out[name] = items
    return out


def list_item_problem(name: str, item: str) -> str | None:
    """Why ``item`` cannot be in capture list ``name`` (ports or CIDRs), else None."""
    return _port(item) if name.endswith("ports") else _cidr(item)


def _port(text: str) -> str | None:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        return f"is not a list of TCP ports (1-65535): bad item '{text}'"
    return None


def _cidr(text: str) -> str | None:
    if text == "*":
        return None
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return f"is not a list of CIDRs: bad item '{text}'"
    return None
