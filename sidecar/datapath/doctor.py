"""``traffic-color doctor``: what the kernel data path needs on this host, and what is missing.

Each check gathers a fact (I/O, kept small) and hands it to a pure judge that
says ok or not, what it saw and how to fix it, so the judges are testable
without a kernel. Nothing here changes the system, and nothing imports
``bcc`` into this process: BCC is tried in a child, as the build does. A
short-lived command, it reads netlink in-process with the children's code
(``sidecar.datapath.child``); the long-lived processes never import this.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sidecar.datapath import netns as ns
from sidecar.datapath.child import routing as rt
from sidecar.datapath.child import tc as tcm
from sidecar.datapath.child.netlink import ipr_in
from sidecar.errors import DatapathError
from sidecar.policy import Policy

DIST_PACKAGES = "/usr/lib/python3/dist-packages"  # Debian's python3-bpfcc

# linux/capability.h bit numbers
CAPS = {"NET_ADMIN": 12, "SYS_ADMIN": 21, "PERFMON": 38, "BPF": 39}

HINT_BCC = (
    "install Debian's python3-bpfcc and libbpfcc (apt-get install python3-bpfcc); "
    "PyPI's package named 'bcc' is unrelated"
)
HINT_HEADERS = (
    "install linux-headers-$(uname -r), or `make kernel-headers` to link Debian's "
    "linux-headers-amd64 under /lib/modules/$(uname -r)/build; in a container "
    "mount /lib/modules and /usr/src from the node read-only"
)
HINT_CAPS = (
    "add NET_ADMIN and BPF (and PERFMON) to the container's "
    "securityContext.capabilities.add, or run as root"
)


@dataclass(frozen=True)
class DoctorCheck:
    name: str
    ok: bool
    detail: str
    fix: str = ""


# ------------------------------------------------------------------ judges (pure)


def judge_caps(cap_eff: int) -> DoctorCheck:
    have = {name for name, bit in CAPS.items() if cap_eff >> bit & 1}
    missing = sorted(set(CAPS) - have)
    # Loading needs BPF (or SYS_ADMIN); attaching and routing need NET_ADMIN.
    ok = "NET_ADMIN" in have and ("BPF" in have or "SYS_ADMIN" in have)
    detail = f"CapEff {cap_eff:#x}: has {', '.join(sorted(have)) or 'none'}"
    if missing:
        detail += f"; lacks {', '.join(missing)}"
    return DoctorCheck("capabilities", ok, detail, "" if ok else HINT_CAPS)


def judge_rp_filter(values: dict[str, int], where: str) -> DoctorCheck:
    """``values``: conf name (all, default, ifname) -> rp_filter. Strict (1) drops asymmetric flows.

    The kernel applies max(all, interface): with ``all`` strict every
    interface is; loose (2) and off (0) let a color's replies return on
    another interface than the main table's route.
    """
    base = values.get("all", 0)
    strict = [
        name
        for name, v in sorted(values.items())
        if name not in ("all", "default", "lo") and max(base, v) == 1
    ]
    notes = []
    if base == 1:
        notes.append("all=1")
    if values.get("default") == 1:
        notes.append("default=1 (new interfaces)")
    if strict:
        notes.append("strict on " + ", ".join(strict))
    if not notes:
        return DoctorCheck("rp_filter", True, f"no strict reverse-path filter in {where}")
    return DoctorCheck(
        "rp_filter",
        False,
        f"{where}: " + "; ".join(notes),
        f"set net.ipv4.conf.{{all,default,IFACE}}.rp_filter=2 (loose) or 0 in {where}: "
        "strict mode drops replies that come back on a color's path",
    )


def judge_fwmark_overlap(rules: list[dict], mark_mask: int, where: str) -> DoctorCheck:
    """Rules of others that match bits of our mark mask would fight ours."""
    clashes = [r for r in rules if not r["ours"] and r["fwmask"] & mark_mask]
    if not clashes:
        return DoctorCheck(
            "fwmark_rules", True, f"no other fwmark rule in {where} uses mask bits {mark_mask:#x}"
        )
    text = "; ".join(
        f"{r['priority']}: fwmark {r['fwmark']:#x}/{r['fwmask']:#x} lookup {r['table']}"
        for r in clashes
    )
    return DoctorCheck(
        "fwmark_rules",
        False,
        f"{where}: rules of others overlap mark_mask {mark_mask:#x}: {text}",
        "choose a mark_mask whose bits nobody else uses (Kubernetes, Cilium and "
        "Calico own some), or move those rules",
    )


# ------------------------------------------------------------------- gathering


def check_bcc(timeout: float = 30.0) -> DoctorCheck:
    code = (
        "import sys\ntry:\n import bcc\nexcept ImportError:\n"
        f" sys.path.append({DIST_PACKAGES!r})\n import bcc\nprint(bcc.__file__)"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return DoctorCheck("bcc", False, f"importing bcc took over {timeout:.0f} s", HINT_BCC)
    if proc.returncode == 0:
        return DoctorCheck("bcc", True, f"bcc importable ({proc.stdout.strip()})")
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return DoctorCheck("bcc", False, f"import bcc failed in a child: {last}", HINT_BCC)


def check_headers() -> DoctorCheck:
    override = os.environ.get("BCC_KERNEL_SOURCE")
    if override:
        ok = Path(override, "include").is_dir()
        return DoctorCheck(
            "kernel_headers",
            ok,
            f"BCC_KERNEL_SOURCE={override}" + ("" if ok else " has no include/"),
            "" if ok else HINT_HEADERS,
        )
    build = Path("/lib/modules", os.uname().release, "build")
    if Path(build, "include").is_dir():
        return DoctorCheck("kernel_headers", True, f"{build} -> {build.resolve()}")
    if Path("/sys/kernel/kheaders.tar.xz").exists():
        return DoctorCheck("kernel_headers", True, "kernel provides /sys/kernel/kheaders.tar.xz")
    return DoctorCheck("kernel_headers", False, f"{build}/include not found", HINT_HEADERS)


def check_caps(status_path: str = "/proc/self/status") -> DoctorCheck:
    with open(status_path) as f:
        for line in f:
            if line.startswith("CapEff:"):
                return judge_caps(int(line.split()[1], 16))
    return DoctorCheck("capabilities", False, f"no CapEff line in {status_path}", HINT_CAPS)


_READ_RP = """
import ctypes, json, os, sys
path = sys.argv[1]
if path:
    fd = os.open(path, os.O_RDONLY)
    if ctypes.CDLL(None, use_errno=True).setns(fd, 0x40000000) != 0:
        sys.exit("setns: " + os.strerror(ctypes.get_errno()))
base = "/proc/sys/net/ipv4/conf"
values = {}
for name in os.listdir(base):
    with open(os.path.join(base, name, "rp_filter")) as f:
        values[name] = int(f.read())
print(json.dumps(values))
"""


def read_rp_filter(netns: str | None) -> dict[str, int]:
    """rp_filter of all/default/every interface, read inside ``netns`` by a child."""
    proc = subprocess.run(
        [sys.executable, "-c", _READ_RP, ns.path(netns) or ""],
        capture_output=True,
        text=True,
        timeout=20,
    )
    if proc.returncode != 0:
        raise DatapathError(
            "doctor", f"reading rp_filter in {ns.label(netns)}: {proc.stderr.strip()[-300:]}"
        )
    return json.loads(proc.stdout)


def check_rp_filter(policy: Policy) -> DoctorCheck:
    netns = policy.datapath.routing.netns
    return judge_rp_filter(read_rp_filter(netns), f"routing namespace {ns.label(netns)}")


def check_fwmark_rules(policy: Policy) -> DoctorCheck:
    netns = policy.datapath.routing.netns
    with ipr_in(netns) as ipr:
        rules = rt.fwmark_rules(ipr)
    return judge_fwmark_overlap(rules, policy.mark_mask, f"routing namespace {ns.label(netns)}")


def check_filters(policy: Policy) -> DoctorCheck:
    points = policy.datapath.attach
    if not points:
        return DoctorCheck(
            "filters",
            False,
            "the policy names no attach point",
            "add datapath.attach entries (interface, direction, netns)",
        )
    missing, seen = [], []
    for p in points:
        where = f"{p.direction} of {p.interface} ({ns.label(p.netns)})"
        found = tcm.present(p)
        (seen if found else missing).append(f"{where} pref {found[0].pref}" if found else where)
    if missing:
        return DoctorCheck(
            "filters",
            False,
            "no classifier at " + ", ".join(missing),
            "start the sidecar with datapath.enabled: true and read its log for "
            "the data path error",
        )
    return DoctorCheck("filters", True, "classifier attached at " + ", ".join(seen))


def _guard(name: str, fn: Callable[[], DoctorCheck]) -> DoctorCheck:
    try:
        return fn()
    except DatapathError as exc:
        text = str(exc)
        if exc.hint and text.endswith(f" ({exc.hint})"):
            text = text[: -len(exc.hint) - 3]
        return DoctorCheck(name, False, text, exc.hint)
    except OSError as exc:
        return DoctorCheck(name, False, str(exc), "")


def run_doctor(policy: Policy) -> list[DoctorCheck]:
    """Every check, in the order an operator would fix them."""
    return [
        _guard("bcc", check_bcc),
        _guard("kernel_headers", check_headers),
        _guard("capabilities", check_caps),
        _guard("rp_filter", lambda: check_rp_filter(policy)),
        _guard("fwmark_rules", lambda: check_fwmark_rules(policy)),
        _guard("filters", lambda: check_filters(policy)),
    ]


def judge_node_filters(
    wanted: list[str], attached: list[str], globs: tuple[str, ...]
) -> DoctorCheck:
    """``wanted``: interfaces the globs name; ``attached``: those with our ingress filter."""
    if not globs:
        return DoctorCheck(
            "node_filters",
            False,
            "the policy has no node.interfaces",
            "add node.interfaces (glob patterns of host-side pod interfaces, such as veth*)",
        )
    missing = sorted(set(wanted) - set(attached))
    if missing:
        return DoctorCheck(
            "node_filters",
            False,
            f"no node classifier at ingress of {', '.join(missing)} "
            f"({len(attached)} of {len(wanted)} attached)",
            "start `traffic-color node --policy FILE` on this node and read its log",
        )
    return DoctorCheck(
        "node_filters",
        True,
        f"node classifier at ingress of all {len(wanted)} interface(s) matching {', '.join(globs)}",
    )


def check_node_filters(policy: Policy) -> DoctorCheck:
    from sidecar.datapath.node import wants

    globs = policy.node.interfaces
    wanted, attached = [], []
    with ipr_in(None) as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME") or ""
            if not wants(name, globs):
                continue
            wanted.append(name)
            if any(f.ours for f in tcm.list_filters(ipr, link["index"], "ingress")):
                attached.append(name)
    return judge_node_filters(wanted, attached, globs)


def run_node_doctor(policy: Policy) -> list[DoctorCheck]:
    """The node agent's checks: it routes in its own namespace, whatever routing.netns says."""
    here = f"this namespace ({ns.label(None)})"
    return [
        _guard("bcc", check_bcc),
        _guard("kernel_headers", check_headers),
        _guard("capabilities", check_caps),
        _guard("rp_filter", lambda: judge_rp_filter(read_rp_filter(None), here)),
        _guard(
            "fwmark_rules",
            lambda: _fwmark_here(policy.mark_mask, here),
        ),
        _guard("node_filters", lambda: check_node_filters(policy)),
    ]


def _fwmark_here(mark_mask: int, where: str) -> DoctorCheck:
    with ipr_in(None) as ipr:
        rules = rt.fwmark_rules(ipr)
    return judge_fwmark_overlap(rules, mark_mask, where)


def format_doctor(checks: list[DoctorCheck]) -> str:
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for c in checks:
        lines.append(f"[{' ok ' if c.ok else 'FAIL'}] {c.name:<{width}}  {c.detail}")
        if not c.ok and c.fix:
            lines.append(f"       {'':<{width}}  fix: {c.fix}")
    bad = sum(not c.ok for c in checks)
    lines.append("all checks passed" if not bad else f"{bad} of {len(checks)} check(s) failed")
    return "\n".join(lines)
