"""The demo's second act: a canary request through a chain of services, lane by lane.

::

    client -> A (edge) -> B -> C          only B has a canary version (b-canary)

Every service runs behind its own sidecar in one network namespace with names of
its own (``LaneLab``): each "pod" has a loopback address, its sidecar takes the
Service port 9080 and passes requests to the app on 8080, and the app calls the
next hop through its sidecar's outbound port (``http_proxy``). A's sidecar is the
edge: it trusts no incoming color and colors ``x-user-group: beta`` canary. A is
instrumented with OpenTelemetry and copies nothing itself (its SDK propagates W3C
Baggage, where the sidecar put the color); B copies the color header by hand. The
policy of every sidecar has lanes ``b -> b-canary`` and ``c -> c-canary``;
``c-canary`` does not exist, so C's canary lane is empty and falls back.

Expected: the beta request is served by A, b-canary and C, still canary at C; the
other by A, b and C, stable throughout.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from sidecar.demo.lanelab import LabError, LaneLab

PODS = {  # service -> (pod address, pod color, next hop, how the app propagates)
    "a": ("127.0.1.1", "stable", "http://b:9080/", "otel"),
    "b": ("127.0.1.2", "stable", "http://c:9080/", "copy-color"),
    "b-canary": ("127.0.1.3", "canary", "http://c:9080/", "copy-color"),
    "c": ("127.0.1.4", "stable", None, ""),
}

POLICY = """\
version: 1
colors:
  stable: {{mark: 0x1}}
  canary: {{mark: 0x2}}
inbound:
  listen: "{ip}:9080"
  app: "{ip}:8080"
  trust_header: {trust}
  rules:
    - match: {{header: {{name: x-user-group, value: beta}}}}
      color: canary
outbound:
  listen: "{ip}:15001"
  routes:
    - host: b
      lanes: {{canary: b-canary}}
    - host: c
      lanes: {{canary: c-canary}}
admin:
  listen: "{ip}:15090"
baggage:
  key: traffic-color
"""


def policy(ip: str, edge: bool) -> str:
    return POLICY.format(ip=ip, trust="false" if edge else "true")


def build(lab: LaneLab) -> None:
    """Names, then C, B, b-canary, A (each app, then its sidecar), so every next hop is up."""
    lab.names({name: ip for name, (ip, *_) in PODS.items()})
    for name in ("c", "b-canary", "b", "a"):
        ip, color, next_url, how = PODS[name]
        proxy = f"http://{ip}:15001" if next_url else ""
        lab.service(name, f"{ip}:8080", next_url=next_url, how=how, proxy=proxy)
        lab.sidecar(f"sidecar-{name}", policy(ip, edge=name == "a"), color, f"{ip}:15090")


def hops(answer: dict) -> list[dict]:
    out = []
    while answer:
        out.append(answer)
        answer = answer.get("next") or {}
    return out


def second_act() -> int:
    """Run the act and print what it shows; 0 when every check held (or it cannot run here)."""
    print("\nAct two: lanes along a chain (edge -> A -> B -> C, only B has a canary)")
    if os.geteuid() != 0 or shutil.which("dnsmasq") is None:
        print("  skipped: needs root and dnsmasq (network namespaces with their own names)")
        return 0
    failures: list[str] = []
    with (
        tempfile.TemporaryDirectory(prefix="tc-chain-") as tmp,
        LaneLab("tcchain", Path(tmp)) as lab,
    ):
        try:
            build(lab)
        except LabError as exc:
            print(f"  failed to build the chain: {exc}\n{exc.args[1] if len(exc.args) > 1 else ''}")
            return 1
        rows = []
        seen: dict[str, list[dict]] = {}
        for label, headers, want in (
            ("x-user-group: beta", ("x-user-group: beta",), ["a", "b-canary", "c"]),
            ("(none)", (), ["a", "b", "c"]),
        ):
            code, answer = lab.get_json("http://a:9080/", *headers)
            chain = seen[label] = hops(answer)
            names = [h.get("name", h.get("error", "?")) for h in chain]
            color_at_c = chain[-1].get("color") if chain else None
            want_color = "canary" if want[1] == "b-canary" else "stable"
            ok = code == 200 and names == want and color_at_c == want_color
            if not ok:
                failures.append(f"{label}: served by {names}, color at C {color_at_c}")
            rows.append([label, *(names + ["-"] * 3)[:3], str(color_at_c), "ok" if ok else "FAIL"])
        widths = [20, 6, 10, 6, 12, 5]
        head = ["request", "A", "B", "C", "color at C", "check"]
        print("  " + "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
        for row in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        beta = seen["x-user-group: beta"]
        if len(beta) > 1:
            print(
                "  A copies nothing itself; its OpenTelemetry SDK carried the baggage the "
                f"sidecar wrote: B got baggage {beta[1].get('baggage')!r}, "
                f"x-traffic-color {beta[1].get('color')!r}"
            )
        route = lab.curl("http://127.0.1.1:15090/debug/route?color=canary&host=b").stdout
        print(f"  A's sidecar, /debug/route?color=canary&host=b: {json.loads(route or '{}')}")
        metrics = lab.metrics("127.0.1.3:15090").splitlines()
        fallback = [ln for ln in metrics if ln.startswith("traffic_color_lane_fallbacks_total")]
        print("  b-canary's sidecar, C has no canary lane: " + (fallback[0] if fallback else "-"))
    if failures:
        print("  act two FAILED: " + "; ".join(failures))
        return 1
    print("  act two OK")
    return 0
