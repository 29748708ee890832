"""The node agent's kernel side: the node classifier on every pod interface, and routing.

The facade ``NodeDatapath`` is to the node agent what ``DatapathManager`` is to a
pod's sidecar, with the same pieces: the build child compiles ``bpf/node.c``,
``maps`` writes its color table and zeroes counter slots through bpf syscalls, and a
netlink child (``ctl.NetlinkSession``, kept for the agent's life because pods
come and go all the time) attaches filters and installs ``ip rule fwmark``
rules and routes, in the agent's own network namespace: the node's.

Interfaces are judged by name against the policy's ``node.interfaces`` globs
(``wants``). Each attached interface gets a counter slot before its filter
goes on, carried by the filter itself as its classid (``abi.node_classid``),
so its first packet is counted under its name; an interface that
vanishes takes its filter with it, and only our records and its slot are
dropped. Objects carrying our tags in this namespace are ours: a start removes
the filters a killed run left anywhere and replaces its rules and routes.

Threads: every method blocks on netlink or bpf syscalls; the runtime calls
them from a worker thread, one at a time (a lock guards them anyway).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import logging
import threading
from collections.abc import Iterable, Iterator

from sidecar.datapath import abi, routing
from sidecar.datapath.build import Classifier, build_node_classifier
from sidecar.datapath.ctl import NetlinkSession, QdiscOwnership
from sidecar.datapath.maps import NodeColorTable, NodeCounters
from sidecar.datapath.tc import FILTER_HANDLE, Attachment
from sidecar.errors import DatapathError
from sidecar.policy import AttachPoint, Policy

log = logging.getLogger(__name__)

MAX_INTERFACES = 256  # counter slots (slot 0 counts interfaces that have none)
UNATTRIBUTED = "other"  # the interface label of slot 0


def wants(ifname: str, globs: Iterable[str]) -> bool:
    """Does the policy's ``node.interfaces`` name this interface? Pure."""
    return any(fnmatch.fnmatchcase(ifname, g) for g in globs)


class SlotPool:
    """Counter slots 1..size-1, lowest free first. Pure."""

    def __init__(self, size: int) -> None:
        self._free = list(range(size - 1, 0, -1))

    def take(self) -> int:
        """A free slot, or 0 (unattributed) when all are in use."""
        return self._free.pop() if self._free else 0

    def give(self, slot: int) -> None:
        if slot:
            self._free.append(slot)
            self._free.sort(reverse=True)


class NodeDatapath:
    """Owns the node classifier, its filters, and the rules and routes of ours on this node."""

    def __init__(
        self,
        policy: Policy,
        *,
        max_interfaces: int = MAX_INTERFACES,
    ) -> None:
        self.policy = policy
        self._max_interfaces = max_interfaces
        self._lock = threading.RLock()
        self._qdisc: QdiscOwnership = {}
        self._net: NetlinkSession | None = None
        self._clf: Classifier | None = None
        self._colors: NodeColorTable | None = None
        self._counters: NodeCounters | None = None
        self._slots = SlotPool(max_interfaces)
        # ifindex -> (its filter, its name, its counter slot)
        self._attached: dict[int, tuple[Attachment, str, int]] = {}
        # ifindex -> (name, slot) of a filter that may be on: an attach there failed
        # without saying whether it went on, so its slot (its classid) stays out of
        # the pool and the filter is taken off if the policy stops naming it.
        self._held: dict[int, tuple[str, int]] = {}
        self._rules: list[routing.RuleSpec] = []
        self._routes: list[routing.RouteSpec] = []
        # Counters of interfaces and color ids that left, so no series goes backwards.
        self._base: dict[tuple[str, str], tuple[int, int]] = {}
        self.attach_errors = 0
        self._closed = False

    # ------------------------------------------------------------ lifecycle

    def start(self, links: dict[int, str]) -> None:
        """Remove leftovers, build, fill the color table, route, attach to ``links``."""
        with self._lock:
            if self._closed:
                raise DatapathError("start", "this node data path was closed; make a new one")
            try:
                self._net = NetlinkSession(self._qdisc)
                self._clf = build_node_classifier(self._max_interfaces)
                m = abi.NODE_MAPS
                self._colors = NodeColorTable(self._clf.maps[m.colors])
                self._counters = NodeCounters(self._clf.maps[m.stats])
                self._set_colors(self.policy)
                removed = self._net.sweep(None)
                if removed:
                    log.warning("removed %d leftover filter(s) of a previous run", removed)
                self._route(self.policy, prune=True)
                for ifindex, ifname in sorted(links.items()):
                    self._consider(ifindex, ifname)
            except BaseException:
                self._close()
                raise
            log.info(
                "node data path started: %d interface(s) attached, %d rule(s)",
                len(self._attached),
                len(self._rules),
            )

    def apply(self, policy: Policy, links: dict[int, str]) -> None:
        """Move to ``policy``: new rules beside the old, the color table flips, then prune.

        The program does not change, so no packet passes unclassified; on a
        failure the old colors and routes are put back and the error raised.
        """
        with self._lock:
            self._require()
            old = self.policy
            try:
                self._route(policy, prune=False)
                if _ids(old) != _ids(policy):
                    self._rebase(old)  # color ids change meaning: keep what they counted
                self._set_colors(policy)
            except BaseException:
                for undo in (lambda: self._set_colors(old), lambda: self._route(old, prune=True)):
                    try:
                        undo()
                    except DatapathError as exc:
                        log.error("node data path: rolling back a failed reload: %s", exc)
                raise
            self.policy = policy
            self._route(policy, prune=True)
            gone = [i for i in {*self._attached, *self._held} if i not in links]
            self._drop(gone)
            for ifindex, ifname in sorted(links.items()):
                self._consider(ifindex, ifname)
            log.info("node data path: policy %s applied", policy.digest)

    def link_added(self, ifindex: int, ifname: str) -> None:
        """A link appeared or was renamed: attach if the policy names it, detach if no longer."""
        with self._lock:
            if self._clf is not None and not self._closed:
                self._consider(ifindex, ifname)
                self._retry_one(ifindex)

    def link_removed(self, ifindex: int) -> None:
        """A link vanished (its filter with it): forget it, without an error."""
        with self._lock:
            self._drop([ifindex])
            if self._clf is not None and not self._closed:
                self._retry_one(ifindex)

    def close(self) -> None:
        """Remove every filter, rule and route of ours; close fds. Safe to call twice."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with self._session() as net:
                for ifindex, (att, _, _) in list(self._attached.items()):
                    try:
                        net.detach(att)
                    except DatapathError as exc:
                        if exc.code not in (errno.ENODEV, errno.ENOENT):
                            log.warning("node data path close: %s", exc)
                    del self._attached[ifindex]
                try:
                    net.remove_all(None)
                except DatapathError as exc:
                    log.warning("node data path close: %s", exc)
        except DatapathError as exc:  # no netlink helper could be started
            log.warning("node data path close: %s", exc)
        if self._net is not None:
            self._net.close()
            self._net = None
        if self._clf is not None:
            self._clf.close()
            self._clf = None
        log.info("node data path closed: filters, rules and routes removed")

    # ------------------------------------------------------------ reading

    @property
    def interfaces(self) -> dict[int, str]:
        """ifindex -> name of every interface with our filter."""
        with self._lock:
            return {i: name for i, (_, name, _) in self._attached.items()}

    def snapshot(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(color, interface) -> (packets, bytes), including what departed interfaces counted."""
        with self._lock:
            out = dict(self._base)
            for key, value in self._live().items():
                was = out.get(key, (0, 0))
                out[key] = (was[0] + value[0], was[1] + value[1])
            return out

    def status(self) -> dict:
        """What the kernel holds for us on this node, JSON-able."""
        with self._lock:
            p = self.policy
            rc = p.datapath.routing.colors
            live = self._colors.read() if self._colors is not None else {}
            counters: dict[str, dict[str, dict[str, int]]] = {}
            for (color, iface), (pkts, byts) in sorted(self.snapshot().items()):
                counters.setdefault(color, {})[iface] = {"packets": pkts, "bytes": byts}
            clf = self._clf
            return {
                "attached": clf is not None and not self._closed,
                "program": (
                    {"id": clf.prog_ids.get("ingress"), "tag": clf.prog_tags.get("ingress")}
                    if clf
                    else {}
                ),
                "interface_globs": list(p.node.interfaces),
                "restore_dscp": p.node.restore_dscp,
                "colors": [
                    {
                        "name": c.name,
                        "id": c.id,
                        "dscp": c.dscp,
                        "mark": c.mark,
                        "mask": p.mark_mask,
                        "priority": c.priority,
                        "table": rc[c.name].table if c.name in rc else None,
                        "live": c.dscp is not None and c.dscp in live,
                    }
                    for c in p.colors.values()
                ],
                "interfaces": [
                    {**att.as_dict(), "slot": slot}
                    for att, _, slot in sorted(self._attached.values(), key=lambda a: a[1])
                ],
                "routing": {
                    "rules": [r.as_dict() for r in self._rules],
                    "routes": [
                        {"table": r.table, "dst": f"{r.dst}/{r.dst_len}", "via": r.gateway}
                        | ({"dev": r.dev} if r.dev else {})
                        for r in self._routes
                    ],
                },
                "attach_errors": self.attach_errors,
                "counters": counters,
            }

    def route_debug(self, color: str, dst: str) -> dict:
        """Which table a ``color`` packet to ``dst`` meets on this node (``ip route get``)."""
        with self._lock:
            p = self.policy
            c = p.colors.get(color)
            if c is None:
                raise DatapathError("route-debug", f"unknown color {color!r}")
            cr = p.datapath.routing.colors.get(color)
            expected = cr.table if cr is not None else routing.RT_TABLE_MAIN
            with self._session() as net:
                kernel = net.route_get(None, dst, c.mark)
            return {
                "color": color,
                "mark": c.mark,
                "mark_mask": p.mark_mask,
                "table": expected,
                "kernel": kernel,
                "agrees": kernel.get("table") == expected,
            }

    # ------------------------------------------------------------ internals

    def _require(self) -> None:
        if self._closed or self._clf is None:
            raise DatapathError("apply", "the node data path is not started")

    @contextlib.contextmanager
    def _session(self) -> Iterator[NetlinkSession]:
        """The long-lived netlink helper, replaced when it died."""
        if self._net is None or not self._net.alive:
            if self._net is not None:
                self._net.close()
            self._net = NetlinkSession(self._qdisc)
        yield self._net

    def _set_colors(self, policy: Policy) -> None:
        assert self._colors is not None
        try:
            self._colors.apply(policy.colors.values(), policy.mark_mask, policy.node.restore_dscp)
        except (OSError, ValueError) as exc:
            raise DatapathError(
                "colors", f"writing the node color table: {exc}", getattr(exc, "errno", None)
            ) from exc

    def _route(self, policy: Policy, *, prune: bool) -> None:
        """The policy's rules and routes in this namespace (its routing.netns is a pod's)."""
        rules, routes = routing.desired_rules(policy), routing.desired_routes(policy)
        with self._session() as net:
            net.reconcile(None, rules, routes, prune=prune)
        if prune:
            self._rules, self._routes = rules, routes

    def _consider(self, ifindex: int, ifname: str) -> None:
        wanted = wants(ifname, self.policy.node.interfaces)
        have = self._attached.get(ifindex)
        if have is not None and (not wanted or have[1] != ifname):
            if not self._detach(ifindex):
                return  # still on, as far as we know: _retry_one tries again
            have = None
        if not wanted and ifindex in self._held:
            self._take_off_held(ifindex)
        elif wanted and have is None:
            self._attach(ifindex, ifname)

    def _claim_slot(self, ifindex: int) -> int:
        """The slot held for this interface (its filter may carry it already), or a free one."""
        held = self._held.pop(ifindex, None)
        return held[1] if held else self._slots.take()

    def _attach(self, ifindex: int, ifname: str) -> None:
        slot = self._claim_slot(ifindex)
        if not slot:
            log.warning("node: all counter slots in use: %s is counted as %r", ifname, UNATTRIBUTED)
        att = self._put_filter(ifindex, ifname, slot)
        if att is not None:
            self._attached[ifindex] = (att, ifname, slot)
            log.info("node: attached to %s (ifindex %d), counter slot %d", ifname, ifindex, slot)

    def _put_filter(self, ifindex: int, ifname: str, slot: int) -> Attachment | None:
        """Our filter on ``ifname``, counting in ``slot`` (zeroed first); None when it failed.

        It replaces any filter of ours already there, so on success ours there
        is this one. When the kernel said the interface is gone (or the name
        now belongs to another interface), or nothing reached the kernel, the
        slot goes back to the pool. Any other failure leaves unknown whether
        the filter went on carrying the slot's classid, so the slot is held
        for this interface: no other interface may count in it.
        """
        assert self._clf is not None and self._counters is not None
        try:
            if slot:
                self._counters.zero(slot)
            with self._session() as net:
                att = net.attach(
                    AttachPoint(ifname, "ingress", None),
                    self._clf.progs["ingress"],
                    abi.node_classid(slot),
                )
                if att.ifindex != ifindex:  # the name went to a new interface meanwhile
                    log.debug("node: %s is ifindex %d now, not %d", ifname, att.ifindex, ifindex)
                    net.detach(att)
                    self._slots.give(slot)
                    return None
            return att
        except DatapathError as exc:
            if exc.code in (errno.ENODEV, errno.ENOENT):
                self._slots.give(slot)
                log.debug("node: %s vanished before its filter went on", ifname)
                return None
            self._held[ifindex] = (ifname, slot)
            self.attach_errors += 1
            log.warning("node: cannot attach to %s: %s", ifname, exc)
            return None
        except OSError as exc:  # the counters or the helper's socket: nothing was attached
            self._slots.give(slot)
            self.attach_errors += 1
            log.warning("node: cannot attach to %s: %s", ifname, exc)
            return None

    def _detach(self, ifindex: int) -> bool:
        """Take our filter off an interface the policy no longer names; False if it may stay.

        A failure other than "the interface is gone" keeps the record (and so
        the slot): the filter may still count in it, so no other interface gets it.
        """
        att, ifname, _ = self._attached[ifindex]
        try:
            with self._session() as net:
                net.detach(att)
        except DatapathError as exc:
            if exc.code not in (errno.ENODEV, errno.ENOENT):
                log.warning("node: detaching from %s: %s", ifname, exc)
                return False
        self._drop([ifindex])
        return True

    def _take_off_held(self, ifindex: int) -> None:
        """A filter that may be on an interface the policy no longer names: take it off."""
        ifname, _ = self._held[ifindex]
        try:
            with self._session() as net:
                net.detach(Attachment(None, ifname, ifindex, "ingress", 0, FILTER_HANDLE))
        except DatapathError as exc:
            if exc.code not in (errno.ENODEV, errno.ENOENT):
                log.warning("node: taking our filter off %s: %s", ifname, exc)
                return
        self._drop([ifindex])

    def _drop(self, ifindexes: Iterable[int]) -> None:
        """These interfaces carry no filter of ours any more: records and slots go, then
        one interface counted as "other" may move into a slot that came free."""
        freed = False
        for ifindex in ifindexes:
            if ifindex in self._attached:
                _, ifname, slot = self._attached.pop(ifindex)
                self._rebase_slot(ifname, slot)
                self._slots.give(slot)
                freed = freed or bool(slot)
                log.info("node: forgot %s (ifindex %d)", ifname, ifindex)
            if ifindex in self._held:
                _, slot = self._held.pop(ifindex)
                self._slots.give(slot)
                freed = freed or bool(slot)
        if freed:
            self._promote()

    def _retry_one(self, skip: int) -> None:
        """Try again, once per link event, one thing that failed without saying: a
        removal (a record or a held filter on an interface the policy no longer
        names), or else a promotion into a slot held for its interface."""
        globs = self.policy.node.interfaces
        for ifindex, (_, ifname, _) in sorted(self._attached.items()):
            if ifindex != skip and not wants(ifname, globs):
                self._detach(ifindex)
                return
        for ifindex, (ifname, _) in sorted(self._held.items()):
            if ifindex != skip and not wants(ifname, globs):
                self._take_off_held(ifindex)
                return
        if any(i in self._held for i in self._attached):
            self._promote()

    def _promote(self) -> None:
        """A slot came free: the first interface counted as "other" moves into it.

        Its filter is replaced by one with the slot's classid; what it counted
        as "other" stays there. An interface whose attach fails with an unknown
        outcome keeps that slot held for itself (its next attach uses it), and
        the walk stops there rather than hold the lock through more timeouts.
        """
        if self._clf is None or self._closed:
            return
        for ifindex in sorted(i for i, (_, _, slot) in self._attached.items() if not slot):
            slot = self._claim_slot(ifindex)
            if not slot:
                return
            ifname = self._attached[ifindex][1]
            att = self._put_filter(ifindex, ifname, slot)
            if att is not None:
                self._attached[ifindex] = (att, ifname, slot)
                log.info("node: %s (ifindex %d) moves to counter slot %d", ifname, ifindex, slot)
                return
            if ifindex in self._held:
                return

    def _live(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(color, interface) -> what the map holds now, for attached slots and slot 0."""
        if self._counters is None:
            return {}
        names = {c.id: c.name for c in self.policy.colors.values()}
        by_slot = {slot: name for _, name, slot in self._attached.values() if slot}
        by_slot[0] = UNATTRIBUTED
        out: dict[tuple[str, str], tuple[int, int]] = {}
        for (slot, cid), value in self._counters.read(by_slot).items():
            out[(names.get(cid, f"id:{cid}"), by_slot[slot])] = value
        return out

    def _rebase_slot(self, ifname: str, slot: int) -> None:
        """An interface leaves: its counts stay exported under its name (never backwards)."""
        if self._counters is None or not slot:
            return
        names = {c.id: c.name for c in self.policy.colors.values()}
        for (_, cid), (pkts, byts) in self._counters.read([slot]).items():
            key = (names.get(cid, f"id:{cid}"), ifname)
            was = self._base.get(key, (0, 0))
            self._base[key] = (was[0] + pkts, was[1] + byts)

    def _rebase(self, old: Policy) -> None:
        """Color ids are about to mean other colors: fold the counts into the base, zero slots."""
        assert self._counters is not None
        for key, (pkts, byts) in self._live().items():
            was = self._base.get(key, (0, 0))
            self._base[key] = (was[0] + pkts, was[1] + byts)
        for _, _, slot in self._attached.values():
            if slot:
                self._counters.zero(slot)
        self._counters.zero(0)


def _ids(policy: Policy) -> dict[int, str]:
    return {c.id: c.name for c in policy.colors.values()}
