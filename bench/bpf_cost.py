"""Cost of the classifier per packet, against an empty tc program, via BPF_PROG_TEST_RUN.

For each flow-table size (default 1, 10k and 1M flows in a map sized to hold
them) the classifier runs on a packet of a colored flow, next to an empty
SCHED_CLS program (``return TC_ACT_OK``) measured in the same run on the same
packet; the kernel reports the mean nanoseconds per run. The figure that
matters is the ratio: the empty program is BPF_PROG_TEST_RUN's own overhead,
so the ratio bounds what the classifier adds to a packet's tc hook. The script
exits non-zero when a ratio passes ``--max-ratio`` (2.0) at any size.

Two more columns explain the figure: "1 lookup" is a hand-assembled program
doing nothing but one bpf_map_lookup_elem() in the same (IPv4) flow map with
the same 12-byte key, the floor of any design with an LRU hash flow map; and
"reply" is a packet of the other direction. Both directions of a flow are in
the map (FlowTable writes the forward and the reverse key), so a reply costs
one lookup too. The limit applies to forward and reply packets alike.

"node" is the node agent's classifier (bpf/node.c) on the same packet carrying
its color's DSCP, in the same rounds: it does no flow lookup, so it is held to
``--max-node-ratio`` (1.5) of the empty program. It reads its color table in
place, its counter slot from the filter's classid, and does one map lookup,
the per-CPU counter row (bpf/node_maps.h says why); the JSON rows also carry the fastest round of it
and of the empty program (``*_min_ns``), since on a shared machine a busy
neighbour slows memory-bound programs more than the empty one.

Three hand-assembled floors run beside it, on its own maps: "mark" reads the
DS byte and writes skb->mark from that DSCP's entry, "count" adds the packet
to one per-CPU counter, "both" does the two. They leave out what the issue
requires besides (IPv6, the presence and mask checks, the generation, the
interface and color of the counter), so no program that marks and counts can
cost less than "both" on the same machine at the same time: where "both" is
near the limit, the limit is not the classifier's to meet.

    sudo .venv/bin/python bench/bpf_cost.py [--sizes 1,10000,1000000] [--json]

``measure()`` returns the rows for bench/run.py.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import struct
import sys
import time

from sidecar.datapath import abi, bpfsys
from sidecar.datapath.build import build_classifier, build_node_classifier
from sidecar.datapath.maps import ColorTable, FlowTable, NodeColorTable, NodeCounters
from sidecar.policy import Color

ETH_P_IP = 0x0800
DEFAULT_SIZES = (1, 10_000, 1_000_000)
BATCH = 65_536  # flows per bpf_map_update_batch call
STABLE = Color("stable", 1, 0x1, dscp=10)

# The flow whose packets are measured; the filler flows use 198.18.128.0/17 sources.
LOCAL, REMOTE = ("198.18.0.1", 40000), ("198.19.0.10", 8080)


def _packet(src: tuple[str, int], dst: tuple[str, int], tos: int = 0) -> bytes:
    """Ethernet + IPv4 + TCP (ACK) with 64 bytes of payload."""
    tcp = struct.pack("!HHIIBBHHH", src[1], dst[1], 1, 1, 5 << 4, 0x10, 65535, 0, 0)
    tcp += b"\0" * 64
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        tos,
        20 + len(tcp),
        1,
        0x4000,
        64,
        6,
        0,
        bytes(map(int, src[0].split("."))),
        bytes(map(int, dst[0].split("."))),
    )
    return b"\x02\0\0\0\0\x02\x02\0\0\0\0\x01" + struct.pack("!H", ETH_P_IP) + ip + tcp


def _fill(fd: int, count: int) -> float:
    """Write ``count`` distinct filler flows as FlowTable does (forward and reverse key).

    Batched updates, so a million flows take about a second; returns seconds spent.
    """
    started = time.monotonic()
    key = struct.Struct("=4s4s2s2s")
    assert key.size == ctypes.sizeof(abi.FlowKey4)
    fwd_value = bytes(abi.FlowValue(color_id=STABLE.id))
    rev_value = bytes(abi.FlowValue(color_id=STABLE.id, flags=abi.F_FLOW_REPLY))
    dst = bytes([198, 19, 0, 10])
    dport = (8080).to_bytes(2, "big")
    done = 0
    while done < count:
        n = min(BATCH // 2, count - done)
        keys, values = [], []
        for i in range(done, done + n):
            src = bytes([198, 18, 128 | (i >> 16 & 0x7F), i >> 8 & 0xFF])
            sport = (1024 + (i & 0xFF)).to_bytes(2, "big")
            keys += (key.pack(dst, src, dport, sport), key.pack(src, dst, sport, dport))
            values += (rev_value, fwd_value)
        bpfsys.map_update_batch(fd, b"".join(keys), b"".join(values), 2 * n)
        done += n
    return time.monotonic() - started


def _insn(op: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", op, (src << 4) | dst, off, imm)


def _lookup_only_insns(map_fd: int, key: bytes) -> bytes:
    """One bpf_map_lookup_elem(map, &key) and return TC_ACT_OK: the floor of a hash flow map.

    key words -> stack; r2 = &key; r1 = map; call map_lookup_elem; r0 = 0; exit.
    """
    assert len(key) % 4 == 0
    top = -((len(key) + 7) // 8 * 8)  # the key's stack offset, 8-byte aligned
    prog = b""
    for i in range(0, len(key) - 4, 8):
        lo, hi = struct.unpack("<ii", key[i : i + 8])
        prog += _insn(0x18, dst=0, imm=lo) + _insn(0, imm=hi)  # r0 = imm64
        prog += _insn(0x7B, dst=10, src=0, off=top + i)  # *(u64 *)(r10 + off) = r0
    if len(key) % 8:
        (tail,) = struct.unpack("<i", key[-4:])
        prog += _insn(0x62, dst=10, off=top + len(key) - 4, imm=tail)  # *(u32 *)(...) = imm
    prog += _insn(0xBF, dst=2, src=10) + _insn(0x07, dst=2, imm=top)  # r2 = r10 + top
    prog += _ld_map(1, map_fd) + _insn(0x85, imm=1)  # r1 = map; call bpf_map_lookup_elem
    return prog + bpfsys.RETURN_OK_INSNS


def _ld_map(dst: int, fd: int, value: bool = False) -> bytes:
    """dst = the map behind ``fd`` (BPF_PSEUDO_MAP_FD), or its one value's address (_VALUE)."""
    return _insn(0x18, dst=dst, src=2 if value else 1, imm=fd) + _insn(0)


def _floor_insns(table_fd: int | None, stats_fd: int | None, generation: int = 0) -> bytes:
    """The least a node classifier can do to mark (``table_fd``) and/or count (``stats_fd``).

    Marking: read the DS byte of an IPv4 header and write skb->mark from that
    DSCP's entry of the node's own color table, read in place in the
    ``generation`` live at load time; no ethertype, version, presence, mask or
    generation check. Counting: one per-CPU counter of the node's own counter
    map at a constant place (slot 0's row, STABLE's column), packets and
    bytes; no interface or color index.
    Both together do less than the issue asks of a colored packet, so no
    program that marks and counts costs less on the same machine at the same time.
    """
    entry = ctypes.sizeof(abi.NodeColorEntry)
    half = ctypes.sizeof(abi.NodeColorEntry * abi.SC_DSCP_VALUES) * generation
    mark_at = abi.NodeTable.colors.offset + half + abi.NodeColorEntry.mark.offset
    skb = abi.SkBuff
    body = b""
    jumps = []  # where a jump to the end sits, patched once the end is known
    if table_fd is not None:
        body += _insn(0x61, dst=2, src=6, off=skb.data.offset)  # r2 = skb->data
        body += _insn(0x61, dst=3, src=6, off=skb.data_end.offset)  # r3 = skb->data_end
        body += _insn(0xBF, dst=4, src=2) + _insn(0x07, dst=4, imm=16)  # r4 = data + 16
        jumps.append(len(body))
        body += _insn(0x2D, dst=4, src=3)  # if r4 > r3 (too short): to the end
        body += _insn(0x71, dst=5, src=2, off=15)  # r5 = IPv4 TOS byte
        body += _insn(0x77, dst=5, imm=2) + _insn(0x27, dst=5, imm=entry)  # r5 = DSCP * entry
        body += _ld_map(1, table_fd, value=True) + _insn(0x0F, dst=1, src=5)
        body += _insn(0x61, dst=0, src=1, off=mark_at)  # r0 = the entry's mark
        body += _insn(0x63, dst=6, src=0, off=skb.mark.offset)  # skb->mark = r0
    if stats_fd is not None:
        body += _insn(0x62, dst=10, off=-4, imm=0)  # key = 0
        body += _insn(0xBF, dst=2, src=10) + _insn(0x07, dst=2, imm=-4)
        body += _ld_map(1, stats_fd) + _insn(0x85, imm=1)  # r0 = bpf_map_lookup_elem()
        jumps.append(len(body))
        body += _insn(0x15, dst=0)  # if r0 == 0: to the end
        column = abi.NodeSlotCounters.colors.offset + STABLE.id * ctypes.sizeof(abi.Counter)
        packets = column + abi.Counter.packets.offset
        nbytes = column + abi.Counter.bytes.offset
        body += _insn(0x79, dst=1, src=0, off=packets) + _insn(0x07, dst=1, imm=1)
        body += _insn(0x7B, dst=0, src=1, off=packets)  # packets += 1
        body += _insn(0x61, dst=2, src=6, off=skb.len.offset)  # r2 = skb->len
        body += _insn(0x79, dst=1, src=0, off=nbytes) + _insn(0x0F, dst=1, src=2)
        body += _insn(0x7B, dst=0, src=1, off=nbytes)  # bytes += skb->len
    end = len(body) // 8
    for at in jumps:
        jump = bytearray(body[at : at + 8])
        struct.pack_into("<h", jump, 2, end - at // 8 - 1)
        body = body[:at] + bytes(jump) + body[at + 8 :]
    return _insn(0xBF, dst=6, src=1) + body + bpfsys.RETURN_OK_INSNS  # r6 = skb


def _ns(fd: int, packet: bytes, repeat: int) -> int:
    run = bpfsys.prog_test_run(fd, packet, repeat=repeat)
    if run.retval not in (0, abi.VERDICT_RETVAL):  # the empty program: OK; ours: UNSPEC
        raise RuntimeError(f"program returned {run.retval:#x}, expected a pass verdict")
    return run.duration_ns


def measure(
    sizes: tuple[int, ...] = DEFAULT_SIZES, repeat: int = 1_000_000, rounds: int = 5
) -> list[dict]:
    """One row per size: ns per packet for the baseline and the classifier, and the ratio.

    Rounds alternate baseline and classifier so drift hits both; each figure is
    the median over rounds (``*_min_ns``: the fastest round, for a shared machine).
    Needs root (CAP_BPF + CAP_NET_ADMIN).
    """
    baseline = bpfsys.prog_load_sched_cls(bpfsys.RETURN_OK_INSNS, "sc_bench_empty")
    # A test run cannot set skb->tc_classid, so its packets count in slot 0: the
    # same instructions as a pod interface's slot, one row of the same map.
    node = build_node_classifier(256)
    NodeColorTable(node.maps[abi.NODE_MAPS.colors]).apply([STABLE], 0xFF)
    floors = _load_floors(node)
    rows = []
    try:
        for size in sizes:
            with build_classifier(max(size, 1)) as clf:
                flows = FlowTable.of(clf)
                ColorTable(clf.maps[abi.MAPS.colors], clf.maps[abi.MAPS.config]).apply(
                    [STABLE], 0xFF
                )
                fill_s = _fill(clf.maps[abi.MAPS.flows], size - 1)
                flows.add(STABLE.id, LOCAL, REMOTE)  # last in: the LRU keeps it
                if flows.get(LOCAL, REMOTE) != STABLE.id:
                    raise RuntimeError("the measured flow is not in the map")
                fwd, reply = _packet(LOCAL, REMOTE), _packet(REMOTE, LOCAL)
                colored = _packet(LOCAL, REMOTE, tos=(STABLE.dscp or 0) << 2)
                prog = clf.progs["egress"]
                lookup = bpfsys.prog_load_sched_cls(
                    _lookup_only_insns(
                        clf.maps[abi.MAPS.flows], bytes(abi.flow_key(LOCAL, REMOTE))
                    ),
                    "sc_bench_lookup",
                )
                base, one, hit, rev, dscp = [], [], [], [], []
                try:
                    for fd in (baseline, lookup, prog):  # warm caches and clocks; discarded
                        _ns(fd, fwd, repeat)
                    _ns(node.progs["ingress"], colored, repeat)
                    floor_ns: dict[str, list[int]] = {name: [] for name in floors}
                    for _ in range(rounds):
                        base.append(_ns(baseline, fwd, repeat))
                        one.append(_ns(lookup, fwd, repeat))
                        hit.append(_ns(prog, fwd, repeat))
                        rev.append(_ns(prog, reply, repeat))
                        dscp.append(_ns(node.progs["ingress"], colored, repeat))
                        for name, fd in floors.items():
                            floor_ns[name].append(_ns(fd, colored, repeat))
                finally:
                    os.close(lookup)
                b, o, h, r, n = (statistics.median(x) for x in (base, one, hit, rev, dscp))
                floor_row = {}
                for name, runs in floor_ns.items():
                    floor_row[f"node_floor_{name}_ns"] = statistics.median(runs)
                    floor_row[f"node_floor_{name}_ratio"] = round(statistics.median(runs) / b, 2)
                rows.append(
                    {
                        "flows": size,
                        "flows_in_map": flows.count() if size <= 100_000 else None,
                        "fill_s": round(fill_s, 2),
                        "baseline_ns": b,
                        "lookup_only_ns": o,
                        "lookup_only_ratio": round(o / b, 2),
                        "classifier_ns": h,
                        "classifier_reply_ns": r,
                        "ratio": round(h / b, 2),
                        "reply_ratio": round(r / b, 2),
                        "node_ns": n,
                        "node_ratio": round(n / b, 2),
                        "baseline_min_ns": min(base),
                        "node_min_ns": min(dscp),
                        **floor_row,
                        "repeat": repeat,
                        "rounds": rounds,
                    }
                )
    finally:
        os.close(baseline)
        for fd in floors.values():
            os.close(fd)
        node.close()
    return rows


def _load_floors(node) -> dict[str, int]:
    """Load the three floor programs on the node classifier's maps; check each does its work.

    A floor that silently marked or counted nothing would flatter the
    comparison, so each is run once on the colored packet first: "mark" must
    set STABLE's mark, "count" must count the packet, "both" must do both.
    """
    nm = abi.NODE_MAPS
    table, stats = node.maps[nm.colors], node.maps[nm.stats]
    live = NodeColorTable(table).generation()
    counters = NodeCounters(stats)

    def counted() -> int:  # where the floors count: slot 0, STABLE
        return counters.read([0]).get((0, STABLE.id), (0, 0))[0]

    colored = _packet(LOCAL, REMOTE, tos=(STABLE.dscp or 0) << 2)
    fds: dict[str, int] = {}
    try:
        for name, t, c in (("mark", table, None), ("count", None, stats), ("both", table, stats)):
            insns = _floor_insns(t, c, live)
            fds[name] = fd = bpfsys.prog_load_sched_cls(insns, f"sc_floor_{name}")
            before = counted()
            run = bpfsys.prog_test_run(fd, colored, ctx=abi.SkBuff())
            out = abi.SkBuff.from_buffer_copy(run.ctx) if run.ctx else abi.SkBuff()
            marked = out.mark == STABLE.mark
            grew = counted() == before + 1
            if (t is not None, c is not None) != (marked, grew):
                raise RuntimeError(
                    f"floor program {name!r}: marked {marked}, counted {grew}; expected "
                    f"{t is not None} and {c is not None}"
                )
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


# Printed columns: (title, row key); ratios print with two decimals.
_COLUMNS = [
    ("flows", "flows"),
    ("empty ns", "baseline_ns"),
    ("1 lookup ns", "lookup_only_ns"),
    ("ratio", "lookup_only_ratio"),
    ("classifier ns", "classifier_ns"),
    ("ratio", "ratio"),
    ("reply ns", "classifier_reply_ns"),
    ("ratio", "reply_ratio"),
    ("node ns", "node_ns"),
    ("ratio", "node_ratio"),
    ("fill s", "fill_s"),
]
# The node classifier beside its floors (``_floor_insns``), in the same rounds.
_NODE_COLUMNS = [
    ("flows", "flows"),
    ("empty ns", "baseline_ns"),
    ("node ns", "node_ns"),
    ("ratio", "node_ratio"),
    *(
        pair
        for name in ("mark", "count", "both")
        for pair in (
            (f"floor: {name}", f"node_floor_{name}_ns"),
            ("ratio", f"node_floor_{name}_ratio"),
        )
    ),
]


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    widths = [max(len(title), 6) for title, _ in columns]
    head = " ".join(f"{title:>{w}}" for (title, _), w in zip(columns, widths, strict=True))
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for (_, key), w in zip(columns, widths, strict=True):
            value = r[key]
            cells.append(f"{value:>{w}.2f}" if isinstance(value, float) else f"{value:>{w}}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    parser.add_argument("--repeat", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-ratio", type=float, default=2.0)
    parser.add_argument("--max-node-ratio", type=float, default=1.5)
    parser.add_argument("--json", action="store_true", help="print rows as JSON")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print(
            "bpf_cost: needs root (CAP_BPF + CAP_NET_ADMIN) for BPF_PROG_TEST_RUN", file=sys.stderr
        )
        return 2
    sizes = tuple(int(s) for s in args.sizes.split(","))
    started = time.monotonic()
    rows = measure(sizes, args.repeat, args.rounds)
    print(
        json.dumps(rows, indent=2)
        if args.json
        else f"{_table(rows, _COLUMNS)}\n\n{_table(rows, _NODE_COLUMNS)}"
    )
    worst = max(max(r["ratio"], r["reply_ratio"]) for r in rows)
    print(
        f"\nclassifier / empty program, colored flow (forward and reply): worst ratio "
        f"{worst:.2f} (limit {args.max_ratio:.2f}); {time.monotonic() - started:.1f} s"
    )
    node_worst = max(r["node_ratio"] for r in rows)
    print(
        f"node classifier / empty program, colored packet: worst ratio {node_worst:.2f} "
        f"(limit {args.max_node_ratio:.2f})"
    )
    failed = False
    if worst > args.max_ratio:
        print("FAIL: the classifier costs more than the limit", file=sys.stderr)
        failed = True
    if node_worst > args.max_node_ratio:
        print("FAIL: the node classifier costs more than the limit", file=sys.stderr)
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
