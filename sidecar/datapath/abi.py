"""ctypes mirrors of ``bpf/sc_abi.h``: map names, constants and shared structs. Pure.

Must be in sync with bpf/sc_abi.h, which is the source of truth (Katran's habit):
``tests/unit/test_abi.py`` compiles ``tests/abi/probe.c`` with the host compiler and
compares every size, offset and constant below with what C sees. Each structure
names its C struct and the byte order of each field. A layout change means a new
map name (``sc_flows`` -> ``sc_flows4``/``sc_flows6``), never a silent reinterpretation.

The helpers at the bottom turn the control plane's vocabulary (addresses, ports,
``sidecar.policy.Color``) into these structures; they do no I/O.
"""

from __future__ import annotations

import ctypes
import ipaddress
import sys
from typing import NamedTuple

# ------------------------------------------------------------------ names


class MapNames(NamedTuple):
    """Each map's name in the C source and in the kernel, spelled only here."""

    flows: str  # IPv4 flows (12-byte keys)
    colors: str
    config: str
    stats: str
    flows6: str  # IPv6 flows (36-byte keys)


MAPS = MapNames(
    flows="sc_flows4",
    colors="sc_colors",
    config="sc_config",
    stats="sc_stats",
    flows6="sc_flows6",
)

# hook name -> entry point in bpf/classifier.c
PROGS: dict[str, str] = {"ingress": "sc_tc_ingress", "egress": "sc_tc_egress"}


class NodeMapNames(NamedTuple):
    """The node classifier's maps (bpf/node_maps.h)."""

    colors: str  # one NodeTable: the live generation, DSCP -> color for both
    stats: str  # per-CPU NodeSlotCounters per slot: its counters by color


NODE_MAPS = NodeMapNames(
    colors="sc_node_dscptab",
    stats="sc_node_counts",
)

# hook name -> entry point in bpf/node.c
NODE_PROGS: dict[str, str] = {"ingress": "sc_node_ingress"}

# -------------------------------------------------------------- constants
# Spelled as in bpf/sc_abi.h; test_abi.py checks every value against the C.

SC_MAX_COLORS = 64
SC_GENERATIONS = 2
SC_HOOK_INGRESS = 0
SC_HOOK_EGRESS = 1
SC_HOOKS = 2
F_PRESENT = 1 << 0
F_HAS_PRIORITY = 1 << 1
F_HAS_DSCP = 1 << 2
F_FLOW_REPLY = 1 << 0  # sc_flow_value.flags
SC_STATS_SLOTS = SC_MAX_COLORS * SC_HOOKS
SC_DSCP_VALUES = 64
F_RESTORE_DSCP = 1 << 3  # sc_node_color.flags

# hook name -> hook id, as the counters index them
HOOKS: dict[str, int] = {"ingress": SC_HOOK_INGRESS, "egress": SC_HOOK_EGRESS}

# linux/pkt_cls.h TC_ACT_UNSPEC (-1): the classifier's only verdict, so filters after
# ours on a shared clsact hook still run; BPF_PROG_TEST_RUN reports it as a u32.
TC_ACT_UNSPEC = -1
VERDICT_RETVAL = TC_ACT_UNSPEC & 0xFFFFFFFF

# ----------------------------------------------------------------- structs


class FlowKey4(ctypes.Structure):
    """``struct sc_flow4_key``: one direction of an IPv4 TCP flow, as on the wire."""

    _fields_ = [
        ("saddr", ctypes.c_uint8 * 4),  # network order (__be32, kept as its wire bytes)
        ("daddr", ctypes.c_uint8 * 4),  # network order
        ("sport", ctypes.c_uint16),  # network order (__be16)
        ("dport", ctypes.c_uint16),  # network order (__be16)
    ]


class FlowKey6(ctypes.Structure):
    """``struct sc_flow6_key``: one direction of an IPv6 TCP flow, as on the wire."""

    _fields_ = [
        ("saddr", ctypes.c_uint8 * 16),  # network order
        ("daddr", ctypes.c_uint8 * 16),  # network order
        ("sport", ctypes.c_uint16),  # network order (__be16)
        ("dport", ctypes.c_uint16),  # network order (__be16)
    ]


FlowKey = FlowKey4 | FlowKey6


class FlowValue(ctypes.Structure):
    """``struct sc_flow_value``."""

    _fields_ = [
        ("color_id", ctypes.c_uint32),  # host order
        ("flags", ctypes.c_uint32),  # host order; F_FLOW_* bits
    ]


class ColorEntry(ctypes.Structure):
    """``struct sc_color``: one slot of the double-buffered color table."""

    _fields_ = [
        ("mark", ctypes.c_uint32),  # host order; within mask
        ("mask", ctypes.c_uint32),  # host order
        ("priority", ctypes.c_uint32),  # host order
        ("flags", ctypes.c_uint32),  # host order; F_* bits
        ("dscp", ctypes.c_uint8),  # 0..63
        ("pad", ctypes.c_uint8 * 3),  # zero
    ]


class Config(ctypes.Structure):
    """``struct sc_config``: entry 0 of sc_config, the live color generation."""

    _fields_ = [
        ("generation", ctypes.c_uint32),  # host order; 0 or 1
        ("reserved", ctypes.c_uint32),  # zero
    ]


class Counter(ctypes.Structure):
    """``struct sc_counter``: one CPU's share of a (color, hook) counter."""

    _fields_ = [
        ("packets", ctypes.c_uint64),  # host order
        ("bytes", ctypes.c_uint64),  # host order
    ]


class NodeColorEntry(ctypes.Structure):
    """``struct sc_node_color``: what a DSCP means on the node, one slot per generation.

    32 bytes; the mark mask is stored inverted (``keep``), the mark within it.
    """

    _fields_ = [
        ("mark", ctypes.c_uint32),  # host order; within ~keep
        ("keep", ctypes.c_uint32),  # host order; ~mark mask
        ("priority", ctypes.c_uint32),  # host order
        ("flags", ctypes.c_uint32),  # host order; F_PRESENT, F_HAS_PRIORITY, F_RESTORE_DSCP
        ("color_id", ctypes.c_uint32),  # host order
        ("restore_dscp", ctypes.c_uint8),  # 0..63
        ("pad", ctypes.c_uint8 * 11),  # zero
    ]


class NodeTable(ctypes.Structure):
    """``struct sc_node_table``, sc_node_dscptab's one value: live generation and both tables."""

    _fields_ = [
        ("generation", ctypes.c_uint32),  # host order; 0 or 1
        ("reserved", ctypes.c_uint32),  # zero
        ("colors", NodeColorEntry * SC_DSCP_VALUES * SC_GENERATIONS),  # [generation][DSCP]
    ]


class NodeSlotCounters(ctypes.Structure):
    """``struct sc_node_counters``: one CPU's value of sc_node_counts, a slot's counters."""

    _fields_ = [
        ("colors", Counter * SC_MAX_COLORS),  # [color id]; 0 is never counted
    ]


class SkBuff(ctypes.Structure):
    """``struct __sk_buff`` from linux/bpf.h (UAPI), the BPF_PROG_TEST_RUN context.

    Only the fields a test run may set or read back, or that the benchmark's
    hand-assembled programs read (bench/bpf_cost.py), are named; the rest is
    kept as anonymous padding so the size (192 bytes) matches the kernel's.
    """

    _fields_ = [
        ("len", ctypes.c_uint32),  # host order
        ("pkt_type", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),  # host order
        ("queue_mapping", ctypes.c_uint32),
        ("protocol", ctypes.c_uint32),
        ("vlan_present", ctypes.c_uint32),
        ("vlan_tci", ctypes.c_uint32),
        ("vlan_proto", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),  # host order
        ("ingress_ifindex", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("tc_index", ctypes.c_uint32),
        ("cb", ctypes.c_uint32 * 5),
        ("hash", ctypes.c_uint32),
        ("tc_classid", ctypes.c_uint32),
        ("data", ctypes.c_uint32),  # packet start, as a program reads it (ctx rewrite)
        ("data_end", ctypes.c_uint32),
        ("_rest", ctypes.c_uint8 * 108),
    ]


# Every shared struct: C name -> mirror. test_abi.py walks this table.
STRUCTS: dict[str, type[ctypes.Structure]] = {
    "sc_flow4_key": FlowKey4,
    "sc_flow6_key": FlowKey6,
    "sc_flow_value": FlowValue,
    "sc_color": ColorEntry,
    "sc_config": Config,
    "sc_counter": Counter,
    "sc_node_color": NodeColorEntry,
    "sc_node_table": NodeTable,
    "sc_node_counters": NodeSlotCounters,
    "__sk_buff": SkBuff,
}

# Constants test_abi.py compares with the C preprocessor's values.
CONSTANTS: dict[str, int] = {
    name: value
    for name, value in globals().items()
    if name.startswith(("SC_", "F_", "TC_ACT_")) and isinstance(value, int)
}

# ------------------------------------------------------------------ helpers

Endpoint = tuple[str, int]  # (IP literal, port)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Parse an address; an IPv4-mapped IPv6 address is the IPv4 it carries.

    A dual-stack socket reports ``::ffff:198.18.0.1`` for what travels as IPv4,
    and the classifier sees the IPv4 header.
    """
    addr = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _port(port: int) -> int:
    if not 0 < port <= 0xFFFF:
        raise ValueError(f"port {port} is not in 1..65535")
    return port


def flow_key(local: Endpoint, remote: Endpoint) -> FlowKey:
    """The key of the flow's packets from ``local`` to ``remote``: a FlowKey4 or FlowKey6.

    The replies carry ``flow_key(remote, local)``; FlowTable writes both.
    """
    src, dst = _ip(local[0]), _ip(remote[0])
    if src.version != dst.version:
        raise ValueError(f"mixed address families: {local[0]} and {remote[0]}")
    key = FlowKey4() if src.version == 4 else FlowKey6()
    ctypes.memmove(key.saddr, src.packed, len(src.packed))
    ctypes.memmove(key.daddr, dst.packed, len(dst.packed))
    key.sport = _htons(_port(local[1]))
    key.dport = _htons(_port(remote[1]))
    return key


def flow_endpoints(key: FlowKey) -> tuple[Endpoint, Endpoint]:
    """The (source, destination) endpoints a key was made from; inverse of ``flow_key``."""
    addr = ipaddress.IPv4Address if isinstance(key, FlowKey4) else ipaddress.IPv6Address
    return (
        (str(addr(bytes(key.saddr))), _htons(key.sport)),
        (str(addr(bytes(key.daddr))), _htons(key.dport)),
    )


def _htons(value: int) -> int:
    """The host-order integer whose in-memory bytes are ``value`` in network order.

    The swap is its own inverse, so this also turns a key's field back into a port.
    """
    return int.from_bytes(value.to_bytes(2, "big"), sys.byteorder)


def color_slot(generation: int, color_id: int) -> int:
    """Index of a color in sc_colors."""
    if generation not in (0, 1):
        raise ValueError(f"generation {generation} is not 0 or 1")
    if not 0 < color_id < SC_MAX_COLORS:
        raise ValueError(f"color id {color_id} is not in 1..{SC_MAX_COLORS - 1}")
    return generation * SC_MAX_COLORS + color_id


def stats_slot(color_id: int, hook: str) -> int:
    """Index of a (color, hook) counter in sc_stats."""
    return color_id * SC_HOOKS + HOOKS[hook]


def color_entry(
    mark: int, mask: int, priority: int | None = None, dscp: int | None = None
) -> ColorEntry:
    """A live color table slot; refuses marks that would touch bits outside the mask."""
    if not 0 <= mask <= 0xFFFFFFFF or mask == 0:
        raise ValueError(f"mark mask {mask:#x} must be a non-zero 32-bit value")
    if mark & ~mask:
        raise ValueError(f"mark {mark:#x} has bits outside the mark mask {mask:#x}")
    entry = ColorEntry(mark=mark, mask=mask, flags=F_PRESENT)
    if priority is not None:
        if not 0 <= priority <= 0xFFFFFFFF:
            raise ValueError(f"priority {priority} is not a 32-bit value")
        entry.priority = priority
        entry.flags |= F_HAS_PRIORITY
    if dscp is not None:
        if not 0 <= dscp <= 63:
            raise ValueError(f"dscp {dscp} is not in 0..63")
        entry.dscp = dscp
        entry.flags |= F_HAS_DSCP
    return entry


# The major half of the classid on the node agent's filters; the minor is the counter slot.
NODE_CLASSID_MAJOR = 0x1


def node_classid(slot: int) -> int:
    """The classid (TCA_BPF_CLASSID) that makes bpf/node.c count in ``slot``. Pure.

    cls_bpf hands the filter's classid to the program as skb->tc_classid, of
    which the program sees the 16-bit minor; 0 (no classid) is slot 0.
    """
    if not 0 <= slot <= 0xFFFF:
        raise ValueError(f"counter slot {slot} does not fit a classid minor (0..65535)")
    return NODE_CLASSID_MAJOR << 16 | slot if slot else 0


def node_color_entry(
    color_id: int,
    mark: int,
    mask: int,
    priority: int | None = None,
    restore_dscp: int | None = None,
) -> NodeColorEntry:
    """A live entry of a NodeTable; the same checks as ``color_entry``."""
    pod = color_entry(mark, mask, priority, restore_dscp)
    if not 0 < color_id < SC_MAX_COLORS:
        raise ValueError(f"color id {color_id} is not in 1..{SC_MAX_COLORS - 1}")
    entry = NodeColorEntry(
        mark=mark,
        keep=~mask & 0xFFFFFFFF,
        priority=pod.priority,
        color_id=color_id,
        restore_dscp=pod.dscp,
    )
    entry.flags = F_PRESENT | (pod.flags & F_HAS_PRIORITY)
    if restore_dscp is not None:
        entry.flags |= F_RESTORE_DSCP
    return entry
