"""``traffic-color status``: read a running sidecar's ``/status`` and print it for people."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request

# What only the data path's children load (sidecar.datapath.child says why).
CHILD_ONLY_MODULES = ("bcc", "pyroute2", "nftables", "sidecar.datapath.child")


def process_info(started_at: float, ready_at: float | None) -> dict:
    """Footprint facts an operator asks about: memory, start-up time, and that LLVM is not here."""
    rss = 0
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    libbcc = False
    try:
        with open("/proc/self/maps", encoding="ascii", errors="replace") as fh:
            libbcc = any("libbcc" in line or "libLLVM" in line for line in fh)
    except OSError:
        pass
    return {
        "pid": _pid(),
        "rss_bytes": rss,
        "uptime_seconds": round(time.time() - started_at, 3),
        "startup_seconds": round(ready_at - started_at, 3) if ready_at else None,
        "bcc_imported": "bcc" in sys.modules,
        # Libraries the long-lived process must not hold (issue 5): they run in children.
        "modules_of_note": {m: m in sys.modules for m in CHILD_ONLY_MODULES},
        "llvm_mapped": libbcc,
    }


def _pid() -> int:
    import os

    return os.getpid()


def run_status(admin: str, as_json: bool) -> int:
    url = admin.rstrip("/") + "/status"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            data = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"cannot read {url}: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(format_status(data))
    return 0


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def format_status(data: dict) -> str:
    """A human table of what ``/status`` says."""
    if data.get("kind") == "node":
        from sidecar.admin.node_status import format_node_status

        return format_node_status(data)
    out = []
    pol = data["policy"]
    dp = data["datapath"]
    proc = data.get("process", {})
    out.append(
        f"traffic-color {data['version']}  pod color: {data['pod_color']}  "
        f"ready: {data['ready']} ({data['ready_reason']})"
    )
    out.append(
        f"policy: {pol['source']} digest {pol['digest']}  header: {pol['header']}  "
        f"mark mask: {pol['mark_mask']:#x}"
    )
    out.append("listeners: " + ", ".join(f"{k} {v}" for k, v in data["listeners"].items()))
    if proc:
        out.append(
            f"process: pid {proc['pid']}  rss {proc['rss_bytes'] / 2**20:.1f} MiB  "
            f"start-up {proc['startup_seconds']}s  bcc imported: {proc['bcc_imported']}"
        )
    counters = dp.get("counters", {})
    flows = data.get("open_flows", {})
    kflows = dp.get("flows", {}).get("by_color", {})
    rows = []
    for c in data["colors"]:
        k_in = counters.get(c["name"], {}).get("ingress", {})
        k_eg = counters.get(c["name"], {}).get("egress", {})
        rows.append(
            [
                c["name"],
                f"{c['mark']:#x}",
                str(c["table"] or "main"),
                "-" if c["priority"] is None else str(c["priority"]),
                "-" if c["dscp"] is None else str(c["dscp"]),
                str(flows.get(c["name"], 0)),
                str(kflows.get(c["name"], 0)) if dp["attached"] else "-",
                str(k_in.get("packets", 0)) if dp["attached"] else "-",
                str(k_eg.get("packets", 0)) if dp["attached"] else "-",
            ]
        )
    out.append("")
    out.append(
        _table(
            [
                "COLOR",
                "MARK",
                "TABLE",
                "PRIO",
                "DSCP",
                "FLOWS",
                "KERNEL FLOWS",
                "PKTS IN",
                "PKTS OUT",
            ],
            rows,
        )
    )
    out.append("")
    state = "attached" if dp["attached"] else ("off" if not dp["enabled"] else "NOT attached")
    out.append(f"data path: {state}" + (f" ({dp['error']})" if dp.get("error") else ""))
    for ap in dp.get("attach_points", []):
        out.append(
            f"  tc {ap['direction']} on {ap['interface']} (ifindex {ap['ifindex']}, "
            f"netns {ap.get('netns') or 'host'}): filter {ap['filter']['name']} "
            f"pref {ap['filter']['pref']}"
        )
    routing = dp.get("routing", {})
    for r in routing.get("rules", []):
        out.append(
            f"  ip -{6 if r['family'] == 'inet6' else 4} rule {r['priority']}: "
            f"fwmark {r['fwmark']:#x}/{r['fwmask']:#x} lookup {r['table']}"
        )
    for r in routing.get("routes", []):
        out.append(
            f"  route table {r['table']}: {r['dst']}"
            + (f" via {r['via']}" if r.get("via") else "")
            + (f" dev {r['dev']}" if r.get("dev") else "")
        )
    if dp["attached"]:
        out.append(
            f"  flow table: {dp['flows']['in_map']} flows of {dp['flow_table_size']}, "
            f"{dp.get('evictions', 0)} evicted"
        )
        mem = dp.get("kernel_memory")
        if mem:
            out.append(
                f"  kernel memory locked by the maps: {mem['memlock_bytes'] / 2**20:.1f} MiB "
                f"(flow maps {mem['flow_maps_memlock_bytes'] / 2**20:.1f} MiB), not in RSS"
            )
    out.extend(_lane_lines(data.get("lanes", [])))
    return "\n".join(out)


def _lane_lines(routes: list[dict]) -> list[str]:
    """``outbound.routes`` with each lane's state as the resolver cache knows it now."""
    if not routes:
        return []
    rows = []
    for route in routes:
        for color, lane in route["lanes"].items():
            port = f":{lane['port']}" if lane.get("port") else ""
            names = {lane["host"]: lane, **lane.get("names", {})}
            for name, known in names.items():
                rows.append([route["host"], color, name + port, route["fallback"], _state(known)])
        if not route["lanes"]:
            rows.append([route["host"], "-", "-", route["fallback"], "no lanes"])
    return ["", _table(["ROUTE", "COLOR", "LANE", "FALLBACK", "STATE"], rows)]


def _state(lane: dict) -> str:
    state = lane["state"]
    if state == "ready":
        state += " " + ",".join(lane["addresses"])
    elif state == "empty":
        state += f" ({lane['reason']})"
    if "ttl_left" in lane:
        state += f", {lane['ttl_left']}s left"
    return state
