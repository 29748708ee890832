"""``traffic-color status`` against a node agent: its colors, interfaces, routing and counters.

Pure: it formats what the agent's ``/status`` answered (``kind: node``).
"""

from __future__ import annotations


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(ln.rstrip() for ln in lines)


def format_node_status(data: dict) -> str:
    pol = data["policy"]
    dp = data.get("datapath") or {}
    proc = data.get("process", {})
    out = [
        f"traffic-color {data['version']}  node agent  "
        f"ready: {data['ready']} ({data['ready_reason']})",
        f"policy: {pol['source']} digest {pol['digest']}  mark mask: {pol['mark_mask']:#x}",
        "listeners: " + ", ".join(f"{k} {v}" for k, v in data["listeners"].items()),
    ]
    if proc:
        out.append(
            f"process: pid {proc['pid']}  rss {proc['rss_bytes'] / 2**20:.1f} MiB  "
            f"start-up {proc['startup_seconds']}s  bcc imported: {proc['bcc_imported']}"
        )
    if not dp:
        why = f" ({data['error']})" if data.get("error") else ""
        out.append(f"node data path: NOT attached{why}")
        return "\n".join(out)
    counters = dp.get("counters", {})
    rows = []
    for c in dp["colors"]:
        per_iface = counters.get(c["name"], {})
        rows.append(
            [
                c["name"],
                "-" if c["dscp"] is None else str(c["dscp"]),
                f"{c['mark']:#x}",
                str(c["table"] or "main"),
                str(sum(v["packets"] for v in per_iface.values())),
                str(sum(v["bytes"] for v in per_iface.values())),
            ]
        )
    out += ["", _table(["COLOR", "DSCP", "MARK", "TABLE", "PACKETS", "BYTES"], rows), ""]
    restore = dp.get("restore_dscp")
    out.append(
        f"interfaces matching {', '.join(dp['interface_globs'])}: {len(dp['interfaces'])} "
        f"attached" + ("" if restore is None else f", DSCP restored to {restore}")
    )
    for i in dp["interfaces"]:
        seen = {
            color: per[i["interface"]]["packets"]
            for color, per in counters.items()
            if i["interface"] in per
        }
        text = ", ".join(f"{c} {n}" for c, n in sorted(seen.items())) or "no colored packets"
        out.append(
            f"  tc ingress on {i['interface']} (ifindex {i['ifindex']}, "
            f"pref {i['filter']['pref']}): {text}"
        )
    for r in dp["routing"]["rules"]:
        out.append(
            f"  ip -{6 if r['family'] == 'inet6' else 4} rule {r['priority']}: "
            f"fwmark {r['fwmark']:#x}/{r['fwmask']:#x} lookup {r['table']}"
        )
    for r in dp["routing"]["routes"]:
        out.append(
            f"  route table {r['table']}: {r['dst']}"
            + (f" via {r['via']}" if r.get("via") else "")
            + (f" dev {r['dev']}" if r.get("dev") else "")
        )
    return "\n".join(out)
