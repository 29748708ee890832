"""Policy routing by color: ``ip rule fwmark MARK/MASK lookup TABLE`` and the tables' routes.

Every rule and route we install carries ``RT_PROTO`` (FRA_PROTOCOL on rules,
rtm_protocol on routes): ``ip rule`` and ``ip route`` print it as
``proto 165``, and it is how we recognise our own objects after a crash. The
kernel also honours it when deleting: a delete that names our protocol cannot
remove somebody else's rule or route, even one that looks the same.

The desired state is computed from the policy by the pure functions here;
``reconcile`` in the netlink child (``sidecar.datapath.child.routing``) then
adds what is missing before deleting what is no longer wanted, so a
reload that moves a color from one mark or table to another never leaves a
moment where neither rule exists. A color without a table gets no rule: its
flows fall through to the main table, the stable path.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from sidecar.policy import Policy

# Our tag: add "165 traffic-color" to /etc/iproute2/rt_protos to see it by name.
RT_PROTO = 165
RT_TABLE_MAIN = 254
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255
RTM_F_LOOKUP_TABLE = 0x1000  # ask `route get` to report the table it used
FAMILIES = (socket.AF_INET, socket.AF_INET6)


@dataclass(frozen=True, order=True)
class RuleSpec:
    """``PRIORITY: from all fwmark MARK/MASK lookup TABLE proto RT_PROTO``."""

    family: int
    priority: int
    fwmark: int
    fwmask: int
    table: int

    def as_dict(self) -> dict:
        return {
            "family": "inet6" if self.family == socket.AF_INET6 else "inet",
            "priority": self.priority,
            "fwmark": self.fwmark,
            "fwmask": self.fwmask,
            "table": self.table,
        }


@dataclass(frozen=True, order=True)
class RouteSpec:
    """A route in a color's table; ``key`` is what the kernel treats as its identity."""

    family: int
    table: int
    dst: str  # network address
    dst_len: int
    gateway: str | None = None
    dev: str | None = None

    @property
    def key(self) -> tuple[int, int, str, int]:
        return (self.family, self.table, self.dst, self.dst_len)


def rule_priority(policy: Policy, color: str) -> int:
    """Each color's rules sit at ``routing.rule_priority + color id``."""
    return policy.datapath.routing.rule_priority + policy.colors[color].id


def desired_rules(policy: Policy) -> list[RuleSpec]:
    """One rule per family for every color that has a table. Pure."""
    out = []
    for name, cr in policy.datapath.routing.colors.items():
        color = policy.colors.get(name)
        if color is None:
            continue
        for family in FAMILIES:
            out.append(
                RuleSpec(
                    family, rule_priority(policy, name), color.mark, policy.mark_mask, cr.table
                )
            )
    return sorted(out)


def desired_routes(policy: Policy) -> list[RouteSpec]:
    """Every route of every color's table. Pure."""
    out = []
    for name, cr in policy.datapath.routing.colors.items():
        if name not in policy.colors:
            continue
        for r in cr.routes:
            family = socket.AF_INET6 if r.dst.version == 6 else socket.AF_INET
            out.append(
                RouteSpec(
                    family,
                    cr.table,
                    str(r.dst.network_address),
                    r.dst.prefixlen,
                    str(r.via) if r.via is not None else None,
                    r.dev,
                )
            )
    return sorted(out)
