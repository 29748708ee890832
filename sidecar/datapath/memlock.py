"""Kernel memory our BPF maps hold, read from the map fds' ``/proc/PID/fdinfo``.

A preallocated LRU hash is charged in full when it is created, whatever it
holds, and that memory is the kernel's, not the process's: RSS never shows it.
The kernel reports the charge per map fd as ``memlock`` in fdinfo, which is
what an operator sizing a node (and the pod's requests) needs to add up.
"""

from __future__ import annotations

from sidecar.datapath import abi

FLOW_MAPS = (abi.MAPS.flows, abi.MAPS.flows6)


def parse_fdinfo(text: str) -> dict[str, str]:
    """``key:\\tvalue`` lines of an fdinfo file -> dict (pure)."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def fd_memlock(fd: int, pid: str = "self") -> int:
    """Bytes the kernel charges for the BPF object behind ``fd`` (0 when it says nothing)."""
    with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii") as fh:
        return int(parse_fdinfo(fh.read()).get("memlock", "0"))


def maps_memlock(maps: dict[str, int]) -> dict:
    """Per map and in total, with the flow maps (the big, preallocated ones) apart."""
    per_map = {name: fd_memlock(fd) for name, fd in sorted(maps.items())}
    return {
        "memlock_bytes": sum(per_map.values()),
        "flow_maps_memlock_bytes": sum(per_map.get(name, 0) for name in FLOW_MAPS),
        "maps": per_map,
    }
