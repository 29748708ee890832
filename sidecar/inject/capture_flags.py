"""The capture init container's per-pod lists, as flags of ``traffic-color capture install``.

Injection writes a pod's ``traffic-color.io/exclude-outbound-ports`` (and the other
three capture lists, see :data:`sidecar.inject.annotations.CAPTURE_LISTS`) into the
init container's args (``sidecar.inject.mutation.capture_args``); this reads them
back onto the policy's ``capture`` section. The exclusions add to the policy's own
lists; ``--include-outbound-cidrs`` replaces the policy's (``*``: every destination).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress

from sidecar.inject.annotations import CAPTURE_LISTS, list_item_problem
from sidecar.policy import Capture, Policy

FLAGS = {name: "--" + name.replace("_", "-") for name in CAPTURE_LISTS}


def add_flags(parser: argparse.ArgumentParser) -> None:
    for name, flag in FLAGS.items():
        what = "CIDRS" if name.endswith("cidrs") else "PORTS"
        verb = "replaces" if name.startswith("include") else "adds to"
        parser.add_argument(
            flag,
            dest=name,
            metavar=what,
            help=f"comma-separated; {verb} the policy's capture list (a pod's annotation)",
        )


def _items(name: str, text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [i.strip() for i in text.split(",") if i.strip()]
    for item in items:
        why = list_item_problem(name, item)
        if why:
            raise ValueError(f"{FLAGS[name]}: {text!r} {why}")
    return items


def apply(capture: Capture, args: argparse.Namespace) -> Capture:
    """``capture`` with the flags in ``args`` applied; ValueError names a bad flag."""
    given = {name: _items(name, getattr(args, name, None)) for name in FLAGS}
    out, inb = capture.outbound, capture.inbound
    if given["exclude_outbound_ports"]:
        extra = tuple(int(p) for p in given["exclude_outbound_ports"])
        out = dataclasses.replace(out, exclude_ports=_union(out.exclude_ports, extra))
    if given["exclude_outbound_cidrs"]:
        extra_nets = tuple(
            ipaddress.ip_network(c, strict=False) for c in given["exclude_outbound_cidrs"]
        )
        out = dataclasses.replace(out, exclude_cidrs=_union(out.exclude_cidrs, extra_nets))
    if given["include_outbound_cidrs"] is not None:
        nets = tuple(
            ipaddress.ip_network(c, strict=False)
            for c in given["include_outbound_cidrs"]
            if c != "*"
        )
        out = dataclasses.replace(
            out, include_cidrs=() if "*" in given["include_outbound_cidrs"] else nets
        )
    if given["exclude_inbound_ports"]:
        extra = tuple(int(p) for p in given["exclude_inbound_ports"])
        inb = dataclasses.replace(inb, exclude_ports=_union(inb.exclude_ports, extra))
    return dataclasses.replace(capture, outbound=out, inbound=inb)


def _union(a: tuple, b: tuple) -> tuple:
    return a + tuple(x for x in b if x not in a)


def policy_with_flags(policy: Policy, args: argparse.Namespace) -> Policy:
    """``policy`` whose capture section has the flags in ``args`` applied."""
    return dataclasses.replace(policy, capture=apply(policy.capture, args))
