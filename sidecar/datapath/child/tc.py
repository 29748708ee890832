"""The classifier on tc, through pyroute2: attach, detach, and sweep our filters.

Runs in the netlink child (``sidecar.datapath.child.ctl``) and in short-lived
commands (doctor). What makes a filter ours, and cleanup therefore safe, is
in ``sidecar.datapath.tc``.
"""

from __future__ import annotations

import errno
import logging

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from sidecar.datapath import netns as ns
from sidecar.datapath.child.netlink import ipr_in, step
from sidecar.datapath.tc import (
    FILTER_HANDLE,
    FILTER_PREFS,
    PARENTS,
    Attachment,
    FilterInfo,
    filter_name,
)
from sidecar.errors import DatapathError
from sidecar.policy import AttachPoint

log = logging.getLogger(__name__)


def list_filters(ipr: IPRoute, ifindex: int, direction: str) -> list[FilterInfo]:
    """Every filter at this hook (bpf or not); chain heads without a handle are skipped."""
    out = []
    for msg in ipr.get_filters(ifindex, parent=PARENTS[direction]):
        if not msg["handle"]:
            continue
        name = ""
        flags = 0
        if msg.get_attr("TCA_KIND") == "bpf":
            name = msg.get_nested("TCA_OPTIONS", "TCA_BPF_NAME") or ""
            flags = msg.get_nested("TCA_OPTIONS", "TCA_BPF_FLAGS") or 0
        out.append(FilterInfo(msg["info"] >> 16, msg["handle"], name, bool(flags & 1)))
    return out


def has_clsact(ipr: IPRoute, ifindex: int) -> bool:
    return any(
        q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(ifindex) if q["index"] == ifindex
    )


def lookup_ifindex(ipr: IPRoute, ifname: str, netns: str | None) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise DatapathError(
            "attach",
            f"interface {ifname!r} not found in network namespace {ns.label(netns)}",
            errno.ENODEV,
            "fix datapath.attach[].interface/netns in the policy",
        )
    return int(found[0])


# ------------------------------------------------------------------ attach


class TcAttacher:
    """Attaches and detaches our filters; remembers which clsact qdiscs are ours."""

    def __init__(self) -> None:
        # (netns, ifindex) -> True when the clsact qdisc there is ours to delete.
        self._qdisc_ours: dict[tuple[str | None, int], bool] = {}

    def attach(self, point: AttachPoint, prog_fd: int, classid: int = 0) -> Attachment:
        """Put ``prog_fd`` on ``point``, replacing any filter of ours already there.

        A non-zero ``classid`` goes on the filter (TCA_BPF_CLASSID): cls_bpf
        hands it to the program as skb->tc_classid before each run, so one
        program tells its attachments apart with no map lookup.
        """
        with ipr_in(point.netns) as ipr:
            ifindex = lookup_ifindex(ipr, point.interface, point.netns)
            where = f"{point.interface} ({ns.label(point.netns)}, ifindex {ifindex})"
            self._ensure_clsact(ipr, point.netns, ifindex, where)
            existing = list_filters(ipr, ifindex, point.direction)
            old = [f for f in existing if f.ours]
            used = {f.pref for f in existing}
            free = [p for p in FILTER_PREFS if p not in used]
            verb = "add-filter"
            if not free:
                ours = sorted(f.pref for f in old if f.pref in FILTER_PREFS)
                if not ours:
                    raise DatapathError(
                        "attach",
                        f"preferences {FILTER_PREFS} at {point.direction} of {where} are all taken",
                        errno.EEXIST,
                        "another tool holds our preferences; remove its filters there",
                    )
                # Both are ours (a replacement cut short between its add and its
                # delete): swap the program and classid of one in place, in one step.
                free, verb = ours, "replace-filter"
                old = [f for f in old if (f.pref, f.handle) != (ours[0], FILTER_HANDLE)]
            pref = free[0]
            with step("attach", f"{verb} bpf at {point.direction} of {where}"):
                ipr.tc(
                    verb,
                    "bpf",
                    ifindex,
                    FILTER_HANDLE,
                    fd=prog_fd,
                    name=filter_name(point.direction),
                    parent=PARENTS[point.direction],
                    prio=pref,
                    direct_action=True,
                    classid=classid or None,
                )
            log.info(
                "tc: attached %s at %s of %s pref %d handle %d",
                filter_name(point.direction),
                point.direction,
                where,
                pref,
                FILTER_HANDLE,
            )
            for f in old:
                self._delete_filter(ipr, ifindex, point.direction, f.pref, f.handle, where)
            return Attachment(
                point.netns, point.interface, ifindex, point.direction, pref, FILTER_HANDLE, classid
            )

    def detach(self, att: Attachment) -> None:
        """Remove our filters at that hook (any a cut-short replacement left too); then
        the clsact qdisc if it is ours and empty."""
        where = f"{att.ifname} ({ns.label(att.netns)}, ifindex {att.ifindex})"
        with ipr_in(att.netns) as ipr:
            mine = {
                (f.pref, f.handle) for f in list_filters(ipr, att.ifindex, att.direction) if f.ours
            }
            if att.pref:  # 0: "ours there, wherever", for a filter that may be on
                mine.add((att.pref, att.handle))
            for pref, handle in sorted(mine):
                self._delete_filter(ipr, att.ifindex, att.direction, pref, handle, where)
            self._maybe_delete_clsact(ipr, att.netns, att.ifindex, where)

    def sweep(self, netns: str | None) -> int:
        """Delete every filter of ours on every interface of ``netns``; return how many.

        Leftovers of a crashed run: found by our tag, wherever the crashed
        run's policy had put them. A clsact qdisc that held nothing but those
        goes too, once empty.
        """
        removed = 0
        with ipr_in(netns) as ipr:
            for link in ipr.get_links():
                ifindex = link["index"]
                ifname = link.get_attr("IFLA_IFNAME")
                if not has_clsact(ipr, ifindex):
                    continue
                self._judge_qdisc(ipr, netns, ifindex)
                where = f"{ifname} ({ns.label(netns)}, ifindex {ifindex})"
                for direction in PARENTS:
                    for f in list_filters(ipr, ifindex, direction):
                        if f.ours:
                            log.info("tc: removing leftover %s", f.name)
                            self._delete_filter(ipr, ifindex, direction, f.pref, f.handle, where)
                            removed += 1
                self._maybe_delete_clsact(ipr, netns, ifindex, where)
        return removed

    # -------------------------------------------------------------- qdisc

    def _judge_qdisc(self, ipr: IPRoute, netns: str | None, ifindex: int) -> bool:
        """Decide once whether the clsact qdisc here would be ours; True if it exists."""
        key = (netns, ifindex)
        exists = has_clsact(ipr, ifindex)
        if key not in self._qdisc_ours and exists:
            filters = [f for d in PARENTS for f in list_filters(ipr, ifindex, d)]
            # Only our leftovers inside: a crashed run of ours created it.
            self._qdisc_ours[key] = bool(filters) and all(f.ours for f in filters)
        return exists

    def _ensure_clsact(self, ipr: IPRoute, netns: str | None, ifindex: int, where: str) -> None:
        if self._judge_qdisc(ipr, netns, ifindex):
            return
        try:
            ipr.tc("add", "clsact", ifindex)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:  # someone else made it meanwhile: fine, not ours
                raise DatapathError(
                    "attach", f"add clsact qdisc on {where}: {exc}", exc.code, ns.hint_for(exc.code)
                ) from exc
            self._qdisc_ours.setdefault((netns, ifindex), False)
            return
        self._qdisc_ours[(netns, ifindex)] = True
        log.info("tc: added clsact qdisc on %s", where)

    def _maybe_delete_clsact(
        self, ipr: IPRoute, netns: str | None, ifindex: int, where: str
    ) -> None:
        if not self._qdisc_ours.get((netns, ifindex)):
            return
        if not has_clsact(ipr, ifindex):
            self._qdisc_ours.pop((netns, ifindex), None)
            return
        if any(list_filters(ipr, ifindex, d) for d in PARENTS):
            return  # still in use (our other hook, or someone else's filter since)
        with step("detach", f"delete clsact qdisc on {where}"):
            try:
                ipr.tc("del", "clsact", ifindex)
            except NetlinkError as exc:
                if exc.code not in (errno.ENOENT, errno.EINVAL):
                    raise
        self._qdisc_ours.pop((netns, ifindex), None)
        log.info("tc: deleted clsact qdisc on %s", where)

    @staticmethod
    def _delete_filter(
        ipr: IPRoute, ifindex: int, direction: str, pref: int, handle: int, where: str
    ) -> None:
        with step("detach", f"delete filter pref {pref} at {direction} of {where}"):
            try:
                ipr.tc("del-filter", "bpf", ifindex, handle, parent=PARENTS[direction], prio=pref)
            except NetlinkError as exc:
                if exc.code not in (errno.ENOENT, errno.ENODEV):  # already gone
                    raise
        log.info("tc: deleted filter pref %d handle %d at %s of %s", pref, handle, direction, where)


def present(point: AttachPoint) -> list[FilterInfo]:
    """Our filters at ``point`` as the kernel reports them (doctor, tests)."""
    with ipr_in(point.netns) as ipr:
        found = ipr.link_lookup(ifname=point.interface)
        if not found:
            return []
        return [f for f in list_filters(ipr, int(found[0]), point.direction) if f.ours]
