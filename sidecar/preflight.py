"""``traffic-color doctor --preflight``: what the policy will need, checked before a sidecar runs.

The plain ``doctor`` looks at a running sidecar's kernel objects (its filters
must be attached). An init container, a CI job or an operator about to roll a
policy out asks a different question: will a sidecar started with this policy
and color come up here? So this checks only what the policy asks for: a valid
policy and pod color, listen addresses that do not collide and are free now,
and, only when the policy turns them on, the kernel data path's needs (BCC,
headers, capabilities, reverse-path filter, fwmark rules, attach interfaces)
and capture's (nftables binding, NET_ADMIN). The built-in policy needs no
kernel at all, so it passes on any host with its ports free.
"""

from __future__ import annotations

import errno
import importlib.util
import socket
from collections.abc import Callable

from sidecar.datapath import doctor
from sidecar.datapath.doctor import DoctorCheck
from sidecar.policy import Address, Policy, check_pod_color

WILDCARDS = ("0.0.0.0", "::", "")


def judge_listeners(listeners: dict[str, Address]) -> DoctorCheck:
    """Two listeners on one port collide when either host is a wildcard or both are equal."""
    clashes = []
    items = [(n, a) for n, a in listeners.items() if a.port]
    for i, (n1, a1) in enumerate(items):
        for n2, a2 in items[i + 1 :]:
            if a1.port == a2.port and (a1.host in WILDCARDS or a2.host in WILDCARDS or a1 == a2):
                clashes.append(f"{n1} {a1} and {n2} {a2}")
    text = ", ".join(f"{n} {a}" for n, a in listeners.items())
    if clashes:
        return DoctorCheck(
            "listeners",
            False,
            "same port twice: " + "; ".join(clashes),
            "give outbound.listen, inbound.listen and admin.listen ports of their own",
        )
    return DoctorCheck("listeners", True, text)


def bind_problem(addr: Address) -> str | None:
    """Why ``addr`` cannot be listened on now, or None (the socket is closed again at once)."""
    if not addr.port:
        return None
    try:
        infos = socket.getaddrinfo(addr.host or None, addr.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"{addr}: cannot resolve: {exc.strerror}"
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"{addr}: in use (a sidecar already running, or another program)"
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"{addr}: no such local address here"
            return f"{addr}: {exc.strerror}"
    return None


def check_ports(listeners: dict[str, Address]) -> DoctorCheck:
    problems = [p for p in map(bind_problem, listeners.values()) if p]
    if problems:
        return DoctorCheck(
            "ports_free", False, "; ".join(problems), "stop what holds the port, or change it"
        )
    return DoctorCheck("ports_free", True, "every listen address can be bound now")


def check_interfaces(policy: Policy) -> DoctorCheck:
    from sidecar.datapath import netns as ns
    from sidecar.datapath.child.netlink import ipr_in

    missing, seen = [], []
    for p in policy.datapath.attach:
        with ipr_in(p.netns) as ipr:
            found = ipr.link_lookup(ifname=p.interface)
        where = f"{p.interface} ({ns.label(p.netns)})"
        (seen if found else missing).append(where)
    if not policy.datapath.attach:
        return DoctorCheck(
            "attach_points", False, "the policy names no attach point", "add datapath.attach"
        )
    if missing:
        return DoctorCheck(
            "attach_points",
            False,
            "no interface " + ", ".join(missing),
            "create the interface before the sidecar starts, or fix datapath.attach",
        )
    return DoctorCheck("attach_points", True, "interfaces present: " + ", ".join(seen))


def check_capture_needs(policy: Policy) -> DoctorCheck:
    from sidecar.runtime import capture_ports

    ports = capture_ports(policy)
    if isinstance(ports, str):
        return DoctorCheck("capture", False, f"capture.enabled: {ports}", "set fixed ports")
    has_binding = importlib.util.find_spec("nftables") is not None
    has_admin = bool(_cap_eff() >> doctor.CAPS["NET_ADMIN"] & 1)
    if has_binding and has_admin:
        return DoctorCheck("capture", True, "nftables binding importable, NET_ADMIN held")
    needs = (("the nftables binding", has_binding), ("NET_ADMIN", has_admin))
    lacks = [what for what, ok in needs if not ok]
    return DoctorCheck(
        "capture",
        False,
        "capture.enabled needs " + " and ".join(lacks),
        "install python3-nftables (make install links it into the venv) and add NET_ADMIN, "
        "or install the rules from an init container (traffic-color capture install)",
    )


def _cap_eff(status_path: str = "/proc/self/status") -> int:
    with open(status_path, encoding="ascii") as fh:
        for line in fh:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def _guard(name: str, fn: Callable[[], DoctorCheck]) -> DoctorCheck:
    try:
        return fn()
    except Exception as exc:  # a check that cannot run is a failed check, said plainly
        return DoctorCheck(name, False, f"could not check: {exc}")


def run_preflight(policy: Policy, pod_color: str) -> list[DoctorCheck]:
    """Every check the policy calls for, in the order an operator would fix them."""
    listeners = {
        "outbound": policy.outbound_listen,
        "inbound": policy.inbound.listen,
        "admin": policy.admin_listen,
    }
    why = check_pod_color(policy, pod_color)
    checks = [
        DoctorCheck(
            "policy", True, f"{policy.source}: {len(policy.colors)} colors, digest {policy.digest}"
        ),
        DoctorCheck("pod_color", why is None, why or f"'{pod_color}' is a color of the policy"),
        judge_listeners(listeners),
        _guard("ports_free", lambda: check_ports(listeners)),
    ]
    dp = policy.datapath
    if not dp.enabled:
        checks.append(DoctorCheck("datapath", True, "off in this policy: no kernel checks needed"))
    else:
        checks += [
            _guard("bcc", doctor.check_bcc),
            _guard("kernel_headers", doctor.check_headers),
            _guard("capabilities", doctor.check_caps),
            _guard("rp_filter", lambda: doctor.check_rp_filter(policy)),
            _guard("fwmark_rules", lambda: doctor.check_fwmark_rules(policy)),
            _guard("attach_points", lambda: check_interfaces(policy)),
        ]
    if policy.capture.enabled:
        checks.append(_guard("capture", lambda: check_capture_needs(policy)))
    return checks
