"""Our ip rules and routes through pyroute2: read, reconcile, remove, route get.

Runs in the netlink child (``sidecar.datapath.child.ctl``) and in short-lived
commands (doctor). What is wanted (``RuleSpec``, ``RouteSpec``, computed from
the policy) and how ours are tagged (``RT_PROTO``) is in
``sidecar.datapath.routing``. ``reconcile`` adds before it deletes, so a
reload never leaves a moment where neither the old nor the new rule exists.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from sidecar.datapath import netns as ns
from sidecar.datapath.child.netlink import step
from sidecar.datapath.routing import (
    FAMILIES,
    RT_PROTO,
    RT_SCOPE_LINK,
    RT_SCOPE_NOWHERE,
    RTM_F_LOOKUP_TABLE,
    RouteSpec,
    RuleSpec,
)
from sidecar.errors import DatapathError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- reading


def our_rules(ipr: IPRoute) -> list[RuleSpec]:
    out = []
    for family in FAMILIES:
        for msg in ipr.get_rules(family=family):
            if msg.get_attr("FRA_PROTOCOL") != RT_PROTO:
                continue
            out.append(
                RuleSpec(
                    msg["family"],
                    msg.get_attr("FRA_PRIORITY") or 0,
                    msg.get_attr("FRA_FWMARK") or 0,
                    msg.get_attr("FRA_FWMASK") or 0,
                    msg.get_attr("FRA_TABLE") or msg["table"],
                )
            )
    return sorted(out)


def fwmark_rules(ipr: IPRoute) -> list[dict]:
    """Every rule that matches on fwmark, ours or not (doctor: overlaps)."""
    out = []
    for family in FAMILIES:
        for msg in ipr.get_rules(family=family):
            mark = msg.get_attr("FRA_FWMARK")
            if mark is None:
                continue
            out.append(
                {
                    "family": family,
                    "priority": msg.get_attr("FRA_PRIORITY") or 0,
                    "fwmark": mark,
                    "fwmask": msg.get_attr("FRA_FWMASK", 0xFFFFFFFF),
                    "table": msg.get_attr("FRA_TABLE") or msg["table"],
                    "ours": msg.get_attr("FRA_PROTOCOL") == RT_PROTO,
                }
            )
    return out


def _ifname(ipr: IPRoute, ifindex: int | None) -> str | None:
    if not ifindex:
        return None
    links = ipr.get_links(ifindex)
    return links[0].get_attr("IFLA_IFNAME") if links else None


def our_routes(ipr: IPRoute) -> list[RouteSpec]:
    names: dict[int, str | None] = {}
    out = []
    for family in FAMILIES:
        for msg in ipr.get_routes(family=family, proto=RT_PROTO):
            if msg["proto"] != RT_PROTO:
                continue
            oif = msg.get_attr("RTA_OIF")
            if oif not in names:
                names[oif] = _ifname(ipr, oif)
            dst = msg.get_attr("RTA_DST") or ("::" if family == socket.AF_INET6 else "0.0.0.0")
            out.append(
                RouteSpec(
                    family,
                    msg.get_attr("RTA_TABLE") or msg["table"],
                    dst,
                    msg["dst_len"],
                    msg.get_attr("RTA_GATEWAY"),
                    names[oif],
                )
            )
    return sorted(out)


# ------------------------------------------------------------------ writing


def _rule(ipr: IPRoute, command: str, r: RuleSpec) -> None:
    ipr.rule(
        command,
        family=r.family,
        priority=r.priority,
        fwmark=r.fwmark,
        fwmask=r.fwmask,
        table=r.table,
        protocol=RT_PROTO,
    )


def _route(ipr: IPRoute, command: str, r: RouteSpec, oif: int | None) -> None:
    kwargs: dict = {
        "family": r.family,
        "dst": f"{r.dst}/{r.dst_len}",
        "table": r.table,
        "proto": RT_PROTO,
    }
    if r.gateway is not None:
        kwargs["gateway"] = r.gateway
    else:
        kwargs["scope"] = RT_SCOPE_LINK  # on-link, as `ip route add DST dev DEV` makes it
    if oif is not None:
        kwargs["oif"] = oif
    ipr.route(command, **kwargs)


def _same_route(want: RouteSpec, have: RouteSpec) -> bool:
    """Does ``have`` already do what ``want`` asks (a gateway-only route may get any dev)?"""
    if want.gateway != have.gateway:
        return False
    return want.dev is None or want.dev == have.dev


@dataclass
class Changes:
    added: int = 0
    removed: int = 0


def reconcile(
    ipr: IPRoute,
    rules: list[RuleSpec],
    routes: list[RouteSpec],
    netns: str | None,
    *,
    prune: bool = True,
) -> Changes:
    """Make our rules and routes in this namespace exactly ``rules`` and ``routes``.

    With ``prune=False`` only the additions happen: a reload installs the new
    state next to the old, flips the color table, then prunes.
    """
    where = ns.label(netns)
    changes = Changes()
    # Routes first: a rule must never point at a table that is still empty.
    have_routes = {r.key: r for r in our_routes(ipr)}
    want_keys = {r.key for r in routes}
    for want in routes:
        have = have_routes.get(want.key)
        if have is not None and _same_route(want, have):
            continue
        oif = _oif(ipr, want, where)
        command = "replace" if have is not None else "add"
        with step(
            "routes", f"{command} route {want.dst}/{want.dst_len} table {want.table} in {where}"
        ):
            try:
                _route(ipr, command, want, oif)
            except NetlinkError as exc:
                if exc.code == errno.EEXIST:
                    raise DatapathError(
                        "routes",
                        f"table {want.table} in {where} already holds a route to "
                        f"{want.dst}/{want.dst_len} that traffic-color did not install",
                        exc.code,
                        "give the color a table of its own, or remove that route",
                    ) from exc
                raise
        changes.added += 1
        log.info(
            "routing: %s route %s/%d via %s dev %s table %d in %s",
            command,
            want.dst,
            want.dst_len,
            want.gateway,
            want.dev,
            want.table,
            where,
        )
    have_rules = set(our_rules(ipr))
    for r in rules:
        if r in have_rules:
            continue
        with step(
            "rules", f"add rule fwmark {r.fwmark:#x}/{r.fwmask:#x} lookup {r.table} in {where}"
        ):
            try:
                _rule(ipr, "add", r)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
        changes.added += 1
        log.info(
            "routing: added rule %d: fwmark %#x/%#x lookup %d (%s) in %s",
            r.priority,
            r.fwmark,
            r.fwmask,
            r.table,
            "inet6" if r.family == socket.AF_INET6 else "inet",
            where,
        )
    if not prune:
        return changes
    for r in sorted(have_rules - set(rules)):
        _delete_rule(ipr, r, where)
        changes.removed += 1
    for key, have in sorted(have_routes.items()):
        if key not in want_keys:
            _delete_route(ipr, have, where)
            changes.removed += 1
    return changes


def remove_all(ipr: IPRoute, netns: str | None) -> int:
    """Delete every rule and route of ours in this namespace; return how many."""
    return reconcile(ipr, [], [], netns).removed


def _oif(ipr: IPRoute, r: RouteSpec, where: str) -> int | None:
    if r.dev is None:
        return None
    found = ipr.link_lookup(ifname=r.dev)
    if not found:
        raise DatapathError(
            "routes",
            f"route {r.dst}/{r.dst_len} table {r.table}: interface {r.dev!r} not found in {where}",
            errno.ENODEV,
            "fix datapath.routing.colors[].routes[].dev in the policy",
        )
    return int(found[0])


def _delete_rule(ipr: IPRoute, r: RuleSpec, where: str) -> None:
    with step("rules", f"delete rule {r.priority} in {where}"):
        try:
            _rule(ipr, "del", r)
        except NetlinkError as exc:
            if exc.code != errno.ENOENT:
                raise
    log.info(
        "routing: deleted rule %d: fwmark %#x/%#x lookup %d in %s",
        r.priority,
        r.fwmark,
        r.fwmask,
        r.table,
        where,
    )


def _delete_route(ipr: IPRoute, r: RouteSpec, where: str) -> None:
    with step("routes", f"delete route {r.dst}/{r.dst_len} table {r.table} in {where}"):
        try:
            # Named by key and our protocol only: the kernel then deletes ours, never another's.
            # Scope "nowhere" matches any scope, as `ip route del` asks.
            ipr.route(
                "del",
                family=r.family,
                dst=f"{r.dst}/{r.dst_len}",
                table=r.table,
                proto=RT_PROTO,
                scope=RT_SCOPE_NOWHERE,
            )
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.ESRCH):
                raise
            return
    log.info("routing: deleted route %s/%d table %d in %s", r.dst, r.dst_len, r.table, where)


# ------------------------------------------------------------------- debug


def route_get(ipr: IPRoute, dst: str, mark: int) -> dict:
    """What ``ip route get DST mark MARK`` answers: table, gateway, device, source."""
    family = socket.AF_INET6 if ipaddress.ip_address(dst).version == 6 else socket.AF_INET
    with step("route-debug", f"route get {dst} mark {mark:#x}"):
        msgs = list(ipr.route("get", family=family, dst=dst, mark=mark, flags=RTM_F_LOOKUP_TABLE))
    if not msgs:
        return {"dst": dst, "mark": mark, "table": None}
    m = msgs[0]
    oif = m.get_attr("RTA_OIF")
    return {
        "dst": dst,
        "mark": mark,
        "table": m.get_attr("RTA_TABLE") or m["table"],
        "gateway": m.get_attr("RTA_GATEWAY"),
        "dev": _ifname(ipr, oif),
        "prefsrc": m.get_attr("RTA_PREFSRC"),
    }
