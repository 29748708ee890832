"""Typed access to the classifier's maps for the control plane (KatranLb-style intents).

Each class wraps the fds ``build.Classifier`` holds and speaks the control
plane's vocabulary: flows as (local, remote) endpoints, colors as
``sidecar.policy.Color``, counters as (color id, hook). Layouts come from
``abi``; the syscalls from ``bpfsys``. None of them owns its fds: the
Classifier closes them.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from sidecar.datapath import abi, bpfsys

if TYPE_CHECKING:
    from sidecar.datapath.build import Classifier
    from sidecar.policy import Color

log = logging.getLogger(__name__)


class FlowTable:
    """The flow maps: which upstream TCP flow has which color.

    One map per IP version (``fd`` for IPv4, ``fd6`` for IPv6). Each flow is two
    entries, its forward key and its reverse key (flagged F_FLOW_REPLY), so the
    classifier needs exactly one lookup for a packet of either direction.
    """

    def __init__(self, fd: int, fd6: int) -> None:
        self.fd = fd
        self.fd6 = fd6

    @classmethod
    def of(cls, classifier: Classifier) -> FlowTable:
        """The flow table of a loaded classifier."""
        return cls(classifier.maps[abi.MAPS.flows], classifier.maps[abi.MAPS.flows6])

    def _fd(self, key: abi.FlowKey) -> int:
        return self.fd if isinstance(key, abi.FlowKey4) else self.fd6

    def add(self, color_id: int, local: abi.Endpoint, remote: abi.Endpoint) -> None:
        """Color the flow local -> remote and its replies; replaces an existing entry.

        The reverse key goes in first: a packet can only match the flow once its
        forward key exists, and by then the replies match too.
        """
        if not 0 < color_id < abi.SC_MAX_COLORS:
            raise ValueError(f"color id {color_id} is not in 1..{abi.SC_MAX_COLORS - 1}")
        fwd, rev = abi.flow_key(local, remote), abi.flow_key(remote, local)
        fd = self._fd(fwd)
        bpfsys.map_update(fd, rev, abi.FlowValue(color_id=color_id, flags=abi.F_FLOW_REPLY))
        bpfsys.map_update(fd, fwd, abi.FlowValue(color_id=color_id))

    def remove(self, local: abi.Endpoint, remote: abi.Endpoint) -> bool:
        """Forget the flow (both keys); False when either key was already gone.

        The kernel's LRU evicts entries one at a time, so a flow it touched may
        have lost one direction or both; either way the flow was evicted.
        """
        fwd, rev = abi.flow_key(local, remote), abi.flow_key(remote, local)
        fd = self._fd(fwd)
        had_fwd = bpfsys.map_delete(fd, fwd)
        had_rev = bpfsys.map_delete(fd, rev)
        return had_fwd and had_rev

    def get(self, local: abi.Endpoint, remote: abi.Endpoint) -> int | None:
        """The flow's color id, or None when the map does not hold its forward key."""
        key = abi.flow_key(local, remote)
        raw = bpfsys.map_lookup(self._fd(key), key, ctypes.sizeof(abi.FlowValue))
        if raw is None:
            return None
        value = abi.FlowValue.from_buffer_copy(raw)
        return None if value.flags & abi.F_FLOW_REPLY else value.color_id

    def entries(self) -> list[tuple[tuple[abi.Endpoint, abi.Endpoint], int]]:
        """((local, remote), color id) of every flow whose forward key is in the maps.

        O(n) syscalls, for status, tests and copying flows into a new program.
        """
        out = []
        for fd, key_t in ((self.fd, abi.FlowKey4), (self.fd6, abi.FlowKey6)):
            for raw_key in bpfsys.map_keys(fd, ctypes.sizeof(key_t)):
                raw = bpfsys.map_lookup(fd, raw_key, ctypes.sizeof(abi.FlowValue))
                if raw is None:  # removed while we walked
                    continue
                value = abi.FlowValue.from_buffer_copy(raw)
                if not value.flags & abi.F_FLOW_REPLY:
                    key = key_t.from_buffer_copy(raw_key)
                    out.append((abi.flow_endpoints(key), value.color_id))
        return out

    def count(self) -> int:
        """Flows whose forward key is in the maps, by walking them: for status and tests."""
        return len(self.entries())


class ColorTable:
    """The double-buffered color table and the config entry that selects its live half."""

    def __init__(self, colors_fd: int, config_fd: int) -> None:
        self.colors_fd = colors_fd
        self.config_fd = config_fd

    def generation(self) -> int:
        """The live generation (0 or 1)."""
        raw = bpfsys.map_lookup(self.config_fd, ctypes.c_uint32(0), ctypes.sizeof(abi.Config))
        return abi.Config.from_buffer_copy(raw).generation & 1 if raw else 0

    def apply(self, colors: Iterable[Color], mark_mask: int) -> None:
        """Make ``colors`` the live table in one step, as the classifier sees it.

        Every slot of the inactive generation is written (absent colors as empty
        slots), then the config entry flips to it. Packets classified before the
        flip use the old policy, after it the new one; none sees a mix. Invalid
        input raises ValueError before anything is written.
        """
        entries = {c.id: abi.color_entry(c.mark, mark_mask, c.priority, c.dscp) for c in colors}
        for cid in entries:
            abi.color_slot(0, cid)  # validates the id range
        target = self._flip(entries, abi.SC_MAX_COLORS, abi.ColorEntry)
        log.info(
            "color table: generation %d live with %d colors, mark mask %#x",
            target,
            len(entries),
            mark_mask,
        )

    def _flip(self, entries: dict[int, ctypes.Structure], width: int, empty: type) -> int:
        """Write every slot of the inactive generation, then make it live; return it."""
        target = 1 - self.generation()
        for index in range(width):
            entry = entries.get(index) or empty()
            bpfsys.map_update(self.colors_fd, ctypes.c_uint32(target * width + index), entry)
        bpfsys.map_update(self.config_fd, ctypes.c_uint32(0), abi.Config(generation=target))
        return target

    def read(self) -> dict[int, abi.ColorEntry]:
        """The live generation's present colors, by id (for status and tests)."""
        gen = self.generation()
        slots = {cid: abi.color_slot(gen, cid) for cid in range(1, abi.SC_MAX_COLORS)}
        return present_entries(self.colors_fd, slots)


class Counters:
    """Per-CPU packet and byte counters per (color, hook)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._ncpu = bpfsys.num_possible_cpus()

    def read(self) -> dict[tuple[int, str], tuple[int, int]]:
        """(color_id, hook) -> (packets, bytes) summed over CPUs; entries never hit are absent."""
        per_cpu = abi.Counter * self._ncpu
        # The kernel rounds each CPU's value up to 8 bytes; sc_counter already is.
        size = ctypes.sizeof(per_cpu)
        out: dict[tuple[int, str], tuple[int, int]] = {}
        for cid in range(1, abi.SC_MAX_COLORS):
            for hook in abi.HOOKS:
                raw = bpfsys.map_lookup(self.fd, ctypes.c_uint32(abi.stats_slot(cid, hook)), size)
                if raw is None:
                    continue
                values = per_cpu.from_buffer_copy(raw)
                packets = sum(v.packets for v in values)
                if packets:
                    out[(cid, hook)] = (packets, sum(v.bytes for v in values))
        return out


# ------------------------------------------------------------------ the node classifier


class NodeColorTable:
    """sc_node_dscptab: DSCP -> color, both generations and the live one in a single value.

    The classifier reads that value in place (bpf/node_maps.h), so a reload is
    two writes of it: the inactive half new with the generation unchanged, then
    the same bytes with only the generation flipped. Bytes that do not change
    are rewritten with themselves, so a packet read during either write sees
    the old policy or the new one, never a mix.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def _table(self) -> abi.NodeTable:
        raw = bpfsys.map_lookup(self.fd, ctypes.c_uint32(0), ctypes.sizeof(abi.NodeTable))
        return abi.NodeTable.from_buffer_copy(raw) if raw else abi.NodeTable()

    def generation(self) -> int:
        """The live generation (0 or 1)."""
        return self._table().generation & 1

    def apply(
        self, colors: Iterable[Color], mark_mask: int, restore_dscp: int | None = None
    ) -> None:
        """Make the colors that have a DSCP the live table in one step, as the classifier sees it.

        Colors without a DSCP cannot be read on the node and get no entry.
        Invalid input raises ValueError before anything is written.
        """
        entries: dict[int, abi.NodeColorEntry] = {}
        for c in colors:
            if c.dscp is None:
                continue
            if not 0 <= c.dscp < abi.SC_DSCP_VALUES:
                raise ValueError(f"dscp {c.dscp} is not in 0..{abi.SC_DSCP_VALUES - 1}")
            if c.dscp in entries:
                raise ValueError(f"dscp {c.dscp} is given to two colors")
            entries[c.dscp] = abi.node_color_entry(
                c.id, c.mark, mark_mask, c.priority, restore_dscp
            )
        table = self._table()
        target = 1 - (table.generation & 1)
        half = table.colors[target]
        for dscp in range(abi.SC_DSCP_VALUES):
            half[dscp] = entries.get(dscp) or abi.NodeColorEntry()
        bpfsys.map_update(self.fd, ctypes.c_uint32(0), table)
        table.generation = target
        bpfsys.map_update(self.fd, ctypes.c_uint32(0), table)
        log.info(
            "node color table: generation %d live with %d DSCP values, mark mask %#x",
            target,
            len(entries),
            mark_mask,
        )

    def read(self) -> dict[int, abi.NodeColorEntry]:
        """The live generation's present entries, by DSCP."""
        table = self._table()
        live = table.colors[table.generation & 1]
        return {dscp: e for dscp, e in enumerate(live) if e.flags & abi.F_PRESENT}


class NodeCounters:
    """sc_node_counts: packets and bytes per (counter slot, color id), per CPU.

    Which slot an interface counts in is not in a map: it is the classid of
    the interface's filter (``abi.node_classid``), which the classifier reads
    as skb->tc_classid. sc_node_counts holds one row per slot
    (NodeSlotCounters, per CPU), so a slot is zeroed or read with one syscall.
    """

    def __init__(self, stats_fd: int) -> None:
        self.stats_fd = stats_fd
        self.max_slots = bpfsys.map_info(stats_fd).max_entries
        self._ncpu = bpfsys.num_possible_cpus()
        # The kernel rounds each CPU's value up to 8 bytes; a row already is.
        self._rows_t = abi.NodeSlotCounters * self._ncpu

    def _slot(self, slot: int) -> ctypes.c_uint32:
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"counter slot {slot} is not in 0..{self.max_slots - 1}")
        return ctypes.c_uint32(slot)

    def zero(self, slot: int) -> None:
        """Set every counter of ``slot`` to zero (before a filter with its classid goes on)."""
        bpfsys.map_update(self.stats_fd, self._slot(slot), self._rows_t())

    def read(self, slots: Iterable[int]) -> dict[tuple[int, int], tuple[int, int]]:
        """(slot, color id) -> (packets, bytes) summed over CPUs, for ``slots``; zeros absent."""
        out: dict[tuple[int, int], tuple[int, int]] = {}
        for slot in slots:
            raw = bpfsys.map_lookup(self.stats_fd, self._slot(slot), ctypes.sizeof(self._rows_t))
            if raw is None:
                continue
            rows = self._rows_t.from_buffer_copy(raw)
            for cid in range(1, abi.SC_MAX_COLORS):
                packets = sum(row.colors[cid].packets for row in rows)
                if packets:
                    out[(slot, cid)] = (packets, sum(row.colors[cid].bytes for row in rows))
        return out


def present_entries(fd: int, slots: dict[int, int]) -> dict[int, abi.ColorEntry]:
    """The entries of an array map of color entries that carry ``F_PRESENT``, by key.

    ``slots``: key -> array index (color ids sit in two generations of one array,
    so the live one is chosen by the caller).
    """
    out: dict[int, abi.ColorEntry] = {}
    for key, slot in slots.items():
        raw = bpfsys.map_lookup(fd, ctypes.c_uint32(slot), ctypes.sizeof(abi.ColorEntry))
        if raw is not None:
            entry = abi.ColorEntry.from_buffer_copy(raw)
            if entry.flags & abi.F_PRESENT:
                out[key] = entry
    return out
