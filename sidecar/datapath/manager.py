"""The data path facade the runtime talks to (Katran's ``KatranLb``: intent-level calls).

``start`` puts the whole kernel side in place for a policy, ``apply`` moves it
to another policy with the least work that is correct, ``flow_open`` and
``flow_close`` are the proxy's per-connection hooks, and ``close`` removes
everything of ours. The pieces it drives each do one job: ``build`` (compile
in a child), ``maps`` (flow table, color table, counters), ``tc`` (filters),
``routing`` (rules and routes).

Netlink (tc, rules, routes) runs in a child per lifecycle call
(``ctl.NetlinkSession``), as the compile does (``build``): this long-lived
process never imports pyroute2 nor bcc, and holds only map fds (issue 5).

Threads. ``start``/``apply``/``close``/``route_debug`` block on netlink and
may compile; call them from a worker thread (``asyncio.to_thread``). Called
on a thread whose event loop runs, they still work (netlink moves to a helper
thread) but hold the loop meanwhile. ``flow_open``/``flow_close`` run on the
event loop thread: one dict operation and one map syscall under a lock that is
only contended while ``apply`` swaps flow tables or ``snapshot`` reads counters.

One product instance per namespace: objects carrying our tags in the
namespaces the policy names are taken to be ours (leftovers of a crashed run)
and replaced.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
from collections import Counter as Tally
from collections.abc import Iterator

from sidecar.admin.metrics import KernelSnapshot
from sidecar.datapath import abi, routing
from sidecar.datapath import netns as ns
from sidecar.datapath.build import Classifier, build_classifier
from sidecar.datapath.ctl import NetlinkSession, QdiscOwnership
from sidecar.datapath.maps import ColorTable, Counters, FlowTable
from sidecar.datapath.memlock import maps_memlock
from sidecar.datapath.tc import Attachment
from sidecar.errors import DatapathError
from sidecar.policy import AttachPoint, Policy

log = logging.getLogger(__name__)

Endpoint = tuple[str, int]
FlowId = tuple[Endpoint, Endpoint]  # (local, remote)


class _Loaded:
    """One loaded classifier and typed views of its maps."""

    def __init__(self, classifier: Classifier) -> None:
        self.classifier = classifier
        self.flows = FlowTable.of(classifier)
        self.colors = ColorTable(classifier.maps[abi.MAPS.colors], classifier.maps[abi.MAPS.config])
        self.counters = Counters(classifier.maps[abi.MAPS.stats])

    def flow_entries(self) -> list[tuple[FlowId, int]]:
        """((local, remote), color id) of every flow in the flow maps."""
        return self.flows.entries()


class DatapathManager:
    """Owns every kernel object the sidecar makes for one policy at a time."""

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._ctl = threading.RLock()  # start / apply / close
        self._flow_lock = threading.Lock()  # flow tables and the open-flow record
        self._loaded: _Loaded | None = None
        # Tables flow_open writes to: the live one, plus the next one during a swap.
        self._writers: tuple[FlowTable, ...] = ()
        self._color_ids = {name: c.id for name, c in policy.colors.items()}
        self._open: dict[FlowId, str] = {}  # flows we registered -> color name
        self._qdisc: QdiscOwnership = {}  # which clsact qdiscs are ours (tc.TcAttacher)
        self._attachments: dict[AttachPoint, Attachment] = {}
        self._routing_netns: str | None = None
        self._rules: list[routing.RuleSpec] = []
        self._routes: list[routing.RouteSpec] = []
        self._routing_spaces: set[str | None] = set()  # namespaces holding rules of ours
        # Counters of replaced programs, so exported counters never go backwards.
        self._counter_base: dict[tuple[str, str], tuple[int, int]] = {}
        self.evictions = 0
        self.flow_errors = 0
        self._closed = False

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Clean leftovers, build, fill the color table, install routing, attach."""
        ns.off_loop(self._start)

    def _start(self) -> None:
        with self._ctl:
            if self._closed:
                raise DatapathError("start", "this manager was closed; make a new one")
            if self._loaded is not None:
                return
            policy = self._policy
            dp = policy.datapath
            # The netlink child imports pyroute2 while the build child compiles.
            with NetlinkSession(self._qdisc) as net:
                try:
                    loaded = _Loaded(build_classifier(dp.flow_table_size))
                    with self._flow_lock:
                        self._loaded = loaded
                        self._writers = (loaded.flows,)
                    self._sweep(net, policy)
                    self._set_colors(loaded, policy)
                    self._apply_routing(net, policy)
                    for point in dp.attach:
                        self._attach(net, point, loaded)
                except BaseException:
                    self._close(net)  # undo what was done; a retry needs a new manager
                    raise
            log.info(
                "data path started: %d attach point(s), %d rule(s), flow table %d",
                len(self._attachments),
                len(self._rules),
                dp.flow_table_size,
            )

    def apply(self, policy: Policy) -> None:
        """Move to ``policy``: recompile only when the program must change (map size)."""
        ns.off_loop(self._apply, policy)

    def _apply(self, policy: Policy) -> None:
        with self._ctl:
            if self._closed or self._loaded is None:
                raise DatapathError("apply", "the data path is not started")
            old = self._policy
            with NetlinkSession(self._qdisc) as net:
                # New rules and routes go in next to the old ones, the marks change, then the
                # old rules go: a flow never carries a mark whose rule is missing.
                try:
                    self._apply_routing(net, policy, prune=False)
                    if policy.datapath.flow_table_size != self._loaded.classifier.flow_table_size:
                        self._swap_program(net, old, policy)
                    else:
                        self._set_colors(self._loaded, policy)
                        self._recolor_flows(old, policy)
                        self._reattach(net, policy)
                except BaseException:
                    try:
                        with self._alive(net) as live:
                            self._roll_back(live, policy, old)
                    except DatapathError as exc:  # no helper could be started
                        log.error("data path: rolling back a failed reload: %s", exc)
                    raise
                self._policy = policy  # the kernel now follows it; pruning only tidies up
                self._drop_flows_of_removed_colors()
                self._apply_routing(net, policy)
            log.info("data path: policy %s applied", policy.digest)

    @contextlib.contextmanager
    def _alive(self, net: NetlinkSession) -> Iterator[NetlinkSession]:
        """``net``, or a new session when its helper died (the failure may have killed it)."""
        if net.alive:
            yield net
            return
        with NetlinkSession(self._qdisc) as fresh:
            yield fresh

    def _roll_back(self, net: NetlinkSession, failed: Policy, old: Policy) -> None:
        """Best effort back to ``old`` after a failed apply: colors, flow ids, routing."""
        loaded = self._loaded
        steps = [
            lambda: self._recolor_flows(failed, old),
            lambda: self._restore_attach_points(net, old),
            lambda: self._apply_routing(net, old),
        ]
        if loaded is not None:
            steps.insert(0, lambda: self._set_colors(loaded, old))
        for undo in steps:
            try:
                undo()
            except DatapathError as exc:
                log.error("data path: rolling back a failed reload: %s", exc)

    def close(self) -> None:
        """Remove every filter, qdisc, rule and route of ours; close fds. Safe to call twice."""
        ns.off_loop(self._close_locked)

    def _close_locked(self) -> None:
        with self._ctl:
            self._close()

    def _close(self, net: NetlinkSession | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        if net is not None and not net.alive:
            net = None  # the failure that brought us here killed the helper: start another
        if net is None and (self._attachments or self._routing_spaces):
            try:
                with NetlinkSession(self._qdisc) as own:
                    self._remove_kernel_objects(own)
            except DatapathError as exc:  # the helper could not start
                log.warning("data path close: %s", exc)
        elif net is not None:
            self._remove_kernel_objects(net)
        self._attachments.clear()
        self._routing_spaces.clear()
        self._rules, self._routes = [], []
        with self._flow_lock:
            loaded, self._loaded, self._writers = self._loaded, None, ()
            self._open.clear()
        if loaded is not None:
            loaded.classifier.close()
        log.info("data path closed: kernel objects removed")

    def _remove_kernel_objects(self, net: NetlinkSession) -> None:
        """Detach every filter, remove every rule and route of ours; log what fails."""
        for point, att in list(self._attachments.items()):
            try:
                net.detach(att)
            except DatapathError as exc:
                log.warning("data path close: %s", exc)
            self._attachments.pop(point, None)
        for space in sorted(self._routing_spaces, key=lambda s: s or ""):
            try:
                net.remove_all(space)
            except DatapathError as exc:
                log.warning("data path close: %s", exc)

    # ------------------------------------------------------------ flow hooks

    def flow_open(self, color: str, local: Endpoint, remote: Endpoint) -> None:
        """Color an upstream flow before its first packet; unknown colors are ignored."""
        cid = self._color_ids.get(color)
        if cid is None:
            return
        with self._flow_lock:
            try:
                for table in self._writers:
                    table.add(cid, local, remote)
            except (OSError, ValueError) as exc:
                self.flow_errors += 1
                log.debug("flow_open %s %s -> %s: %s", color, local, remote, exc)
                return
            if self._writers:
                self._open[(local, remote)] = color

    def flow_close(self, color: str, local: Endpoint, remote: Endpoint) -> None:
        """Forget a flow; an entry the kernel's LRU dropped meanwhile counts as an eviction."""
        with self._flow_lock:
            registered = self._open.pop((local, remote), None)
            if registered is None:
                return  # never registered (unknown color, or opened before start)
            try:
                found = [table.remove(local, remote) for table in self._writers]
            except (OSError, ValueError) as exc:
                self.flow_errors += 1
                log.debug("flow_close %s %s -> %s: %s", color, local, remote, exc)
                return
            # A color a reload in progress removes has left the map already: no eviction.
            if found and not any(found) and registered in self._color_ids:
                self.evictions += 1

    # ------------------------------------------------------------ reading

    @property
    def attached(self) -> bool:
        return self._loaded is not None and bool(self._attachments)

    def snapshot(self) -> KernelSnapshot:
        """Counters by (color name, hook), plus counters of programs replaced before."""
        # Under the flow lock: a swap replaces program and base together, and closes the
        # old program's fds only once no reader can hold them. Only a swap contends.
        with self._flow_lock:
            counters = dict(self._counter_base)
            loaded = self._loaded
            live = self._named_counters(loaded) if loaded is not None else {}
        for key, (pkts, byts) in live.items():
            base = counters.get(key, (0, 0))
            counters[key] = (base[0] + pkts, base[1] + byts)
        return KernelSnapshot(counters, self.evictions)

    def status(self) -> dict:
        """What the kernel holds for us, JSON-able (from state we installed and the maps)."""
        with self._ctl:
            policy = self._policy
            loaded = self._loaded
            rc = policy.datapath.routing.colors
            colors = []
            live = loaded.colors.read() if loaded is not None else {}
            for name, c in policy.colors.items():
                colors.append(
                    {
                        "name": name,
                        "id": c.id,
                        "mark": c.mark,
                        "mask": policy.mark_mask,
                        "table": rc[name].table if name in rc else None,
                        "rule_priority": routing.rule_priority(policy, name)
                        if name in rc
                        else None,
                        "priority": c.priority,
                        "dscp": c.dscp,
                        "live": c.id in live,
                    }
                )
            by_id = {c.id: name for name, c in policy.colors.items()}
            by_color: Tally[str] = Tally()
            total = 0
            if loaded is not None:
                for _, cid in loaded.flow_entries():
                    by_color[by_id.get(cid, f"id:{cid}")] += 1
                    total += 1
            snap = self.snapshot()
            counters: dict[str, dict[str, dict[str, int]]] = {}
            for (color, hook), (pkts, byts) in sorted(snap.counters.items()):
                counters.setdefault(color, {})[hook] = {"packets": pkts, "bytes": byts}
            return {
                "attached": self.attached,
                "flow_table_size": (loaded.classifier.flow_table_size if loaded else None),
                "programs": (
                    {
                        hook: {
                            "id": loaded.classifier.prog_ids.get(hook),
                            "tag": loaded.classifier.prog_tags.get(hook),
                        }
                        for hook in loaded.classifier.progs
                    }
                    if loaded
                    else {}
                ),
                "colors": colors,
                "attach_points": [a.as_dict() for a in self._attachments.values()],
                "routing": {
                    "netns": self._routing_netns,
                    "rules": [r.as_dict() for r in self._rules],
                    "routes": [
                        {
                            "table": r.table,
                            "dst": f"{r.dst}/{r.dst_len}",
                            "via": r.gateway,
                            "dev": r.dev,
                        }
                        for r in self._routes
                    ],
                },
                "flows": {
                    "in_map": total,
                    "by_color": dict(by_color),
                    "registered": len(self._open),
                },
                "evictions": self.evictions,
                "kernel_memory": maps_memlock(loaded.classifier.maps) if loaded else None,
                "flow_errors": self.flow_errors,
                "counters": counters,
            }

    def route_debug(self, color: str, dst: str) -> dict:
        """Which rule and table a ``color`` packet to ``dst`` meets, and the kernel's answer."""
        return ns.off_loop(self._route_debug, color, dst)

    def _route_debug(self, color: str, dst: str) -> dict:
        policy = self._policy
        c = policy.colors.get(color)
        if c is None:
            raise DatapathError(
                "route-debug", f"unknown color {color!r} (known: {', '.join(policy.colors)})"
            )
        cr = policy.datapath.routing.colors.get(color)
        netns = policy.datapath.routing.netns
        try:
            family = 6 if ":" in dst else 4
            rule = None
            if cr is not None:
                rule = {
                    "priority": routing.rule_priority(policy, color),
                    "fwmark": c.mark,
                    "fwmask": policy.mark_mask,
                    "table": cr.table,
                }
            ipaddress.ip_address(dst)
            with NetlinkSession(self._qdisc) as net:
                kernel = net.route_get(netns, dst, c.mark)
        except ValueError as exc:
            raise DatapathError("route-debug", f"{dst!r} is not an IP address") from exc
        expected = cr.table if cr is not None else routing.RT_TABLE_MAIN
        return {
            "color": color,
            "mark": c.mark,
            "mark_mask": policy.mark_mask,
            "family": family,
            "netns": netns,
            "rule": rule,
            "table": expected,
            "table_name": "main" if expected == routing.RT_TABLE_MAIN else str(expected),
            "kernel": kernel,
            "agrees": kernel.get("table") == expected,
        }

    # ------------------------------------------------------------ internals

    def _named_counters(self, loaded: _Loaded) -> dict[tuple[str, str], tuple[int, int]]:
        by_id = {c.id: name for name, c in self._policy.colors.items()}
        return {
            (by_id.get(cid, f"id:{cid}"), hook): value
            for (cid, hook), value in loaded.counters.read().items()
        }

    def _sweep(self, net: NetlinkSession, policy: Policy) -> None:
        """Remove our filters left anywhere in the namespaces this policy touches."""
        spaces = {p.netns for p in policy.datapath.attach}
        for netns in sorted(spaces, key=lambda s: s or ""):
            removed = net.sweep(netns)
            if removed:
                log.warning(
                    "removed %d leftover filter(s) of a previous run in %s",
                    removed,
                    ns.label(netns),
                )

    @staticmethod
    def _set_colors(loaded: _Loaded, policy: Policy) -> None:
        try:
            loaded.colors.apply(policy.colors.values(), policy.mark_mask)
        except (OSError, ValueError) as exc:
            raise DatapathError(
                "colors", f"writing the color table: {exc}", getattr(exc, "errno", None)
            ) from exc

    def _apply_routing(self, net: NetlinkSession, policy: Policy, prune: bool = True) -> None:
        """Install the policy's rules and routes; with ``prune``, remove every other of ours."""
        rnetns = policy.datapath.routing.netns
        rules = routing.desired_rules(policy)
        routes = routing.desired_routes(policy)
        self._routing_spaces.add(rnetns)
        net.reconcile(rnetns, rules, routes, prune=prune)
        if not prune:
            return
        for other in sorted(self._routing_spaces - {rnetns}, key=lambda s: s or ""):
            net.remove_all(other)
            self._routing_spaces.discard(other)
        self._routing_netns, self._rules, self._routes = rnetns, rules, routes

    def _attach(self, net: NetlinkSession, point: AttachPoint, loaded: _Loaded) -> None:
        fd = loaded.classifier.progs[point.direction]
        self._attachments[point] = net.attach(point, fd)

    def _reattach(self, net: NetlinkSession, policy: Policy) -> None:
        """Attach new points, detach dropped ones; unchanged points are not touched."""
        assert self._loaded is not None
        wanted = list(policy.datapath.attach)
        for point in wanted:
            if point not in self._attachments:
                self._attach(net, point, self._loaded)
        for point in [p for p in self._attachments if p not in wanted]:
            net.detach(self._attachments[point])  # still ours to retry if this fails
            del self._attachments[point]

    def _restore_attach_points(self, net: NetlinkSession, old: Policy) -> None:
        """After a failed reload: filters exactly where ``old`` wants them (best effort)."""
        wanted = list(old.datapath.attach)
        errors = []
        for point in [p for p in self._attachments if p not in wanted]:
            try:
                net.detach(self._attachments[point])
                del self._attachments[point]
            except DatapathError as exc:
                errors.append(exc)
        for point in wanted:
            if point not in self._attachments and self._loaded is not None:
                try:
                    self._attach(net, point, self._loaded)
                except DatapathError as exc:
                    errors.append(exc)
        if errors:
            raise errors[0]

    def _recolor_flows(self, old: Policy, new: Policy) -> None:
        """Registered flows follow their color's new id; flows of removed colors leave the map.

        Their registration stays until the reload has succeeded
        (``_drop_flows_of_removed_colors``): a reload that fails later rolls
        back to a policy in which they have their color, and this puts them back.
        """
        ids = {name: c.id for name, c in new.colors.items()}
        with self._flow_lock:
            self._color_ids = ids
            for (local, remote), color in list(self._open.items()):
                was = old.colors.get(color)
                if color in ids and was is not None and was.id == ids[color]:
                    continue
                try:
                    for table in self._writers:
                        if color in ids:
                            table.add(ids[color], local, remote)
                        else:
                            table.remove(local, remote)
                except (OSError, ValueError) as exc:
                    self.flow_errors += 1
                    log.warning("re-coloring flow %s -> %s: %s", local, remote, exc)

    def _drop_flows_of_removed_colors(self) -> None:
        """Forget open flows whose color the now-running policy no longer has (not in the map)."""
        with self._flow_lock:
            for flow, color in list(self._open.items()):
                if color not in self._color_ids:
                    del self._open[flow]

    def _swap_program(self, net: NetlinkSession, old: Policy, new: Policy) -> None:
        """Recompile for a new flow table size and swap filters without an unmarked window.

        The new program's maps are filled first (colors, then every open flow,
        while flow_open writes to both tables), then each filter is replaced
        by adding the new one before deleting the old.
        """
        assert self._loaded is not None
        prev = self._loaded
        nxt = _Loaded(build_classifier(new.datapath.flow_table_size))
        try:
            self._set_colors(nxt, new)
            new_ids = {name: c.id for name, c in new.colors.items()}
            old_names = {c.id: name for name, c in old.colors.items()}
            with self._flow_lock:
                self._writers = (prev.flows, nxt.flows)
                self._color_ids = new_ids
                copied = 0
                for (local, remote), cid in prev.flow_entries():
                    name = old_names.get(cid)
                    if name in new_ids:
                        nxt.flows.add(new_ids[name], local, remote)
                        copied += 1
            log.info("data path: new program loaded, %d open flow(s) copied", copied)
            wanted = list(new.datapath.attach)
            for point in wanted:
                self._attach(net, point, nxt)  # adds at the free preference, then deletes ours
            for point in [p for p in self._attachments if p not in wanted]:
                net.detach(self._attachments.pop(point))
        except BaseException:
            with self._flow_lock:
                self._writers = (prev.flows,)
            # Filters already swapped keep the new program's fds alive; put the old one back.
            try:
                with self._alive(net) as live:
                    for point, att in list(self._attachments.items()):
                        with contextlib.suppress(DatapathError):
                            self._attachments[point] = live.attach(
                                point, prev.classifier.progs[att.direction]
                            )
            except DatapathError as exc:  # no helper could be started
                log.error("data path: putting the previous program back: %s", exc)
            nxt.classifier.close()
            raise
        with self._flow_lock:
            base = dict(self._counter_base)
            for key, (pkts, byts) in self._named_counters(prev).items():
                was = base.get(key, (0, 0))
                base[key] = (was[0] + pkts, was[1] + byts)
            self._writers = (nxt.flows,)
            self._loaded, self._counter_base = nxt, base
        prev.classifier.close()
