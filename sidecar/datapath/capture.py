"""Transparent capture: the nftables table ``inet traffic_color`` that sends the pod's TCP here.

``ruleset`` is a pure function of the policy's ``capture`` section and the
sidecar's ports, returning libnftables' JSON: one transaction that adds our
table, deletes it (so a leftover of a crashed run goes, never doubled) and adds
it again with its chains and rules. The kernel applies a transaction whole or
not at all, which is the rollback: a rejected ruleset leaves the previous table
in place. ``removal`` deletes the table the same idempotent way. Nothing but
the table named ``TABLE`` is ever touched; its name is the tag.

Outbound (``output`` nat hook): TCP that leaves the pod, not over loopback, not
from ``owner_uid``, not carrying ``own_mark`` (the sidecar marks its upstream
sockets with SO_MARK, which needs CAP_NET_ADMIN: an app can neither take the
uid nor set the mark), not to an excluded port or CIDR (and inside
``include_cidrs`` when that is given) is redirected to the outbound listener.
Inbound (``prerouting`` nat hook): TCP arriving from outside the pod, except
the admin port, the sidecar's own listener ports and the excluded ports, is
redirected to the inbound listener. IPv4 and IPv6 alike (an ``inet`` table).

libnftables is used in a short-lived child (``python -m
sidecar.datapath.child.nft``, the build child's discipline), by the sidecar
and by ``traffic-color capture`` alike: the long-lived sidecar process never
maps it (about 2 MB of RSS).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import subprocess
from dataclasses import dataclass
from typing import Any

from sidecar.datapath import spawn
from sidecar.errors import DatapathError
from sidecar.policy import Capture

log = logging.getLogger(__name__)

FAMILY = "inet"
TABLE = "traffic_color"
# Before the conntrack-based nat of other tables (Istio uses the same priority).
NAT_PRIORITY = -100
_MSG_MAX = 1 << 20  # one answer: a listing of our table is a few kB

Net = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Ports:
    """The sidecar's listening ports the rules redirect to or leave alone."""

    outbound: int
    inbound: int
    admin: int


# ------------------------------------------------------------------ the ruleset (pure)


def _table() -> dict:
    return {"family": FAMILY, "name": TABLE}


def _match(left: dict, right: Any, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> dict:
    return {"meta": {"key": key}}


def _field(protocol: str, field: str) -> dict:
    return {"payload": {"protocol": protocol, "field": field}}


def _set(values: list) -> Any:
    return values[0] if len(values) == 1 else {"set": values}


def _prefixes(nets: list[Net]) -> Any:
    return _set([{"prefix": {"addr": str(n.network_address), "len": n.prefixlen}} for n in nets])


def _rule(chain: str, *expr: dict, comment: str | None = None) -> dict:
    rule: dict = {"family": FAMILY, "table": TABLE, "chain": chain, "expr": list(expr)}
    if comment:
        rule["comment"] = comment
    return {"add": {"rule": rule}}


_RETURN = {"return": None}
_TCP = _match(_meta("l4proto"), "tcp")
_NOT_TCP = _match(_meta("l4proto"), "tcp", "!=")


def _cidr_rules(chain: str, include: tuple[Net, ...], exclude: tuple[Net, ...]) -> list[dict]:
    rules = []
    for proto, version in (("ip", 4), ("ip6", 6)):
        daddr = _field(proto, "daddr")
        excl = [n for n in exclude if n.version == version]
        if excl:
            rules.append(_rule(chain, _match(daddr, _prefixes(excl)), _RETURN))
        if include:
            incl = [n for n in include if n.version == version]
            if incl:
                rules.append(_rule(chain, _match(daddr, _prefixes(incl), "!="), _RETURN))
            else:  # only the other family's destinations are captured
                nfproto = "ipv4" if version == 4 else "ipv6"
                rules.append(_rule(chain, _match(_meta("nfproto"), nfproto), _RETURN))
    return rules


def ruleset(capture: Capture, ports: Ports) -> dict:
    """libnftables JSON for the whole table, replacing any table of that name. Pure."""
    t = _table()
    out = capture.outbound
    dport = _field("tcp", "dport")
    cmds: list[dict] = [
        {"metainfo": {"json_schema_version": 1}},
        {"add": {"table": t}},
        {"delete": {"table": t}},
        {"add": {"table": t}},
    ]
    for name, hook in (("output", "output"), ("prerouting", "prerouting")):
        chain = {
            "family": FAMILY,
            "table": TABLE,
            "name": name,
            "type": "nat",
            "hook": hook,
            "prio": NAT_PRIORITY,
            "policy": "accept",
        }
        cmds.append({"add": {"chain": chain}})
    # outbound: what leaves the pod
    cmds += [
        _rule("output", _NOT_TCP, _RETURN),
        _rule("output", _match(_meta("oifname"), "lo"), _RETURN, comment="loopback"),
        _rule("output", _match(_meta("skuid"), capture.owner_uid), _RETURN, comment="sidecar uid"),
        _rule(
            "output",
            _match({"&": [_meta("mark"), capture.own_mark]}, capture.own_mark),
            _RETURN,
            comment="sidecar sockets",
        ),
    ]
    if out.exclude_ports:
        cmds.append(_rule("output", _match(dport, _set(sorted(out.exclude_ports))), _RETURN))
    cmds += _cidr_rules("output", out.include_cidrs, out.exclude_cidrs)
    cmds.append(_rule("output", _TCP, {"counter": None}, {"redirect": {"port": ports.outbound}}))
    # inbound: what arrives from outside the pod
    keep = sorted({ports.admin, ports.inbound, ports.outbound, *capture.inbound.exclude_ports})
    cmds += [
        _rule("prerouting", _NOT_TCP, _RETURN),
        _rule("prerouting", _match(_meta("iifname"), "lo"), _RETURN, comment="loopback"),
        _rule("prerouting", _match(dport, _set(keep)), _RETURN, comment="admin, own, excluded"),
        _rule("prerouting", _TCP, {"counter": None}, {"redirect": {"port": ports.inbound}}),
    ]
    return {"nftables": cmds}


def removal() -> dict:
    """Delete our table; adding it first makes this succeed when there is none. Pure."""
    t = _table()
    return {
        "nftables": [
            {"metainfo": {"json_schema_version": 1}},
            {"add": {"table": t}},
            {"delete": {"table": t}},
        ]
    }


def listing() -> dict:
    return {"nftables": [{"list": {"table": _table()}}]}


# ------------------------------------------------------------------ applying it


def run_nft_child(cmd: dict, timeout: float = 30.0) -> dict:
    """Run one libnftables JSON command in a short-lived child; DatapathError on failure.

    The child (``sidecar.datapath.child.nft``) is started by ``spawn`` as every
    other; its failure comes back in the envelope and is raised here unchanged.
    """
    proc, sock = spawn.spawn("sidecar.datapath.child.nft", [], step="capture")
    with sock:
        try:
            sock.settimeout(timeout)
            sock.send(json.dumps(cmd).encode())
            raw = sock.recv(_MSG_MAX)
        except TimeoutError:
            proc.kill()
            proc.wait()
            raise DatapathError(
                "capture", f"the nftables child did not answer in {timeout:.0f} s"
            ) from None
        except OSError as exc:
            raise DatapathError("capture", f"the nftables child is gone: {exc}", exc.errno) from exc
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    if not raw:
        raise DatapathError("capture", f"the nftables child exited ({rc}) without answering")
    answer = json.loads(raw)
    if not answer.get("ok"):
        raise spawn.error_from_json(answer, "capture")
    return answer.get("result") or {}


def table_present() -> dict | None:
    """Our table as libnftables lists it, or None when there is none."""
    try:
        return run_nft_child(listing())
    except DatapathError as exc:
        if "No such file" in str(exc):
            return None
        raise


def install(capture: Capture, ports: Ports) -> None:
    run_nft_child(ruleset(capture, ports))
    log.info(
        "capture installed: table %s %s, outbound -> :%d, inbound -> :%d (admin :%d excluded)",
        FAMILY,
        TABLE,
        ports.outbound,
        ports.inbound,
        ports.admin,
    )


def remove() -> None:
    run_nft_child(removal())
    log.info("capture removed: table %s %s", FAMILY, TABLE)
