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
        target = 1 - self.generation()
        for cid in range(abi.SC_MAX_COLORS):
            entry = entries.get(cid, abi.ColorEntry())
            index = ctypes.c_uint32(target * abi.SC_MAX_COLORS + cid)
            bpfsys.map_update(self.colors_fd, index, entry)
        bpfsys.map_update(self.config_fd, ctypes.c_uint32(0), abi.Config(generation=target))
        log.info(
            "color table: generation %d live with %d colors, mark mask %#x",
            target,
            len(entries),
            mark_mask,
        )

    def read(self) -> dict[int, abi.ColorEntry]:
        """The live generation's present colors, by id (for status and tests)."""
        gen = self.generation()
        out = {}
        for cid in range(1, abi.SC_MAX_COLORS):
            raw = bpfsys.map_lookup(
                self.colors_fd,
                ctypes.c_uint32(abi.color_slot(gen, cid)),
                ctypes.sizeof(abi.ColorEntry),
            )
            if raw is not None:
                entry = abi.ColorEntry.from_buffer_copy(raw)
                if entry.flags & abi.F_PRESENT:
                    out[cid] = entry
        return out


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
