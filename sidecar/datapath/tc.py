"""Our tc filters: how they are tagged, and what an installed one is (``Attachment``).

The netlink work is the netlink child's (``sidecar.datapath.child.tc``): a
``clsact`` qdisc and a direct-action bpf filter per attach point.

Ownership is what makes cleanup safe. Our filters carry a recognisable name
(``FILTER_NAME_PREFIX``, TCA_BPF_NAME) and sit at one of two fixed
preferences; anything else on the interface belongs to someone else and is
never touched. The clsact qdisc is ours to remove only if we created it in
this run, or if when we first saw it it held nothing but our own filters (a
crashed run of ours created it). That decision is taken once per interface,
before we add anything, and remembered.

Replacing a filter (a leftover of a crashed run, or a recompiled program)
adds the new one at the other preference first and deletes the old one
after, so no packet passes without a classifier in between.
"""

from __future__ import annotations

from dataclasses import dataclass

# ---------------------------------------------------------------- our tags

FILTER_NAME_PREFIX = "traffic-color"
# Two fixed preferences: a replacement goes in at the one the old filter does not use.
FILTER_PREFS = (40001, 40002)
FILTER_HANDLE = 1
PARENTS = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}  # clsact: ffff:fff2 / ffff:fff3
CLSACT_HANDLE = 0xFFFF0000


def filter_name(direction: str) -> str:
    """TCA_BPF_NAME of our filter at ``direction`` (``tc filter show`` prints it)."""
    return f"{FILTER_NAME_PREFIX}:{direction}"


# ------------------------------------------------------------- what tc shows


@dataclass(frozen=True)
class FilterInfo:
    """A bpf filter as tc dumps it."""

    pref: int
    handle: int
    name: str
    direct_action: bool

    @property
    def ours(self) -> bool:
        return self.name.startswith(FILTER_NAME_PREFIX)


# ------------------------------------------------------------------ attach


@dataclass(frozen=True)
class Attachment:
    """One filter of ours, as installed."""

    netns: str | None
    ifname: str
    ifindex: int
    direction: str
    pref: int
    handle: int
    # TCA_BPF_CLASSID: a constant of this attachment the program reads as
    # skb->tc_classid (its minor); 0 for none. The node agent's counter slot.
    classid: int = 0

    def as_dict(self) -> dict:
        return {
            "interface": self.ifname,
            "ifindex": self.ifindex,
            "direction": self.direction,
            "netns": self.netns,
            "filter": {
                "name": filter_name(self.direction),
                "pref": self.pref,
                "handle": self.handle,
                "classid": self.classid,
            },
        }
