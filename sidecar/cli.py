"""Command line: wiring only. Each subcommand parses flags and hands off.

Heavy modules (the proxy, aiohttp, pyroute2) are imported inside the command
that needs them, so ``check`` and ``--version`` stay instant and small.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

from sidecar import __version__

if TYPE_CHECKING:
    from sidecar.policy import Policy

POLICY_ENV = "TRAFFIC_COLOR_POLICY"
COLOR_ENV = "TRAFFIC_COLOR"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="traffic-color",
        description="Sidecar that colors HTTP traffic and lets the kernel route each color.",
    )
    parser.add_argument("--version", action="version", version=f"traffic-color {__version__}")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("TRAFFIC_COLOR_LOG_LEVEL", "info"),
        choices=("debug", "info", "warning", "error"),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the sidecar until SIGTERM or SIGINT")
    run.add_argument(
        "--policy",
        default=os.environ.get(POLICY_ENV),
        help=f"policy file (env {POLICY_ENV}; built-in default when unset)",
    )
    run.add_argument(
        "--color",
        default=os.environ.get(COLOR_ENV),
        help=f"this pod's color (env {COLOR_ENV}; the policy's default_color when unset)",
    )

    check = sub.add_parser(
        "check", help="validate a policy file or ConfigMap manifest; print FILE:LINE: reason"
    )
    check.add_argument("file", help="a policy file, or manifests with the policy ConfigMap(s)")
    check.add_argument(
        "--key", default="policy.yaml", help="ConfigMap data key holding the policy (policy.yaml)"
    )
    check.add_argument(
        "--color",
        default=os.environ.get(COLOR_ENV),
        help=f"also check that this pod color is defined (env {COLOR_ENV})",
    )

    status = sub.add_parser("status", help="show a running sidecar's colors, flows and counters")
    status.add_argument(
        "--admin",
        default=os.environ.get("TRAFFIC_COLOR_ADMIN", "http://127.0.0.1:15090"),
        help="admin base URL (default http://127.0.0.1:15090)",
    )
    status.add_argument("--json", action="store_true", help="print the raw JSON")

    wait = sub.add_parser("wait-ready", help="wait until a sidecar's /readyz answers 200")
    wait.add_argument(
        "--admin",
        default=os.environ.get("TRAFFIC_COLOR_ADMIN", "http://127.0.0.1:15090"),
        help="admin base URL (default http://127.0.0.1:15090)",
    )
    wait.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS")

    doctor = sub.add_parser("doctor", help="check what the kernel data path needs on this host")
    doctor.add_argument("--policy", default=os.environ.get(POLICY_ENV))
    doctor.add_argument(
        "--preflight",
        action="store_true",
        help="before a sidecar runs: check what the policy will need (ports, kernel, capture)",
    )
    doctor.add_argument(
        "--color",
        default=os.environ.get(COLOR_ENV),
        help=f"the pod color to check with --preflight (env {COLOR_ENV})",
    )

    doctor.add_argument(
        "--node", action="store_true", help="check the node agent's side (traffic-color node)"
    )

    analyze = sub.add_parser(
        "analyze", help="find what injection and the sidecar would trip over in manifests"
    )
    analyze.add_argument(
        "-f",
        "--file",
        dest="files",
        action="append",
        required=True,
        metavar="DIR|FILE",
        help="manifest file or directory (recursive); repeat for more",
    )
    analyze.add_argument("--json", action="store_true", help="print the findings as JSON")
    analyze.add_argument(
        "--policy-configmap",
        default="traffic-color-policy",
        help="ConfigMap injected pods mount when they name none (the chart's default)",
    )

    capture = sub.add_parser(
        "capture", help="install, remove or show the nftables capture table (inet traffic_color)"
    )
    capture.add_argument("action", choices=("install", "remove", "show"))
    capture.add_argument("--policy", default=os.environ.get(POLICY_ENV))
    capture.add_argument(
        "--dry-run", action="store_true", help="print the JSON ruleset; touch nothing"
    )
    from sidecar.inject.capture_flags import add_flags as add_capture_flags

    add_capture_flags(capture)  # a pod's lists, written by injection

    node = sub.add_parser(
        "node", help="run the node agent: route pods' flows by the color their DSCP carries"
    )
    node.add_argument(
        "--policy",
        default=os.environ.get(POLICY_ENV),
        help=f"policy file with a node section (env {POLICY_ENV})",
    )

    demo = sub.add_parser("demo", help="colored requests taking different paths, in namespaces")
    demo.add_argument(
        "--keep", action="store_true", help="leave the topology up until Enter is pressed"
    )
    demo.add_argument(
        "--loopback",
        action="store_true",
        help="header coloring only, on 127.0.0.1 (no root or kernel data path needed)",
    )
    demo.add_argument(
        "--router",
        action="store_true",
        help="the sidecar reaching into a router namespace, as outside Kubernetes",
    )

    from sidecar.inject.cli import add_arguments as add_inject_arguments

    inject = sub.add_parser("inject", help="add the sidecar to Kubernetes manifests")
    inject.add_argument("-f", "--file", required=True, help="manifest file, or - for stdin")
    add_inject_arguments(inject)

    webhook = sub.add_parser("webhook", help="serve the mutating admission webhook")
    webhook.add_argument("--host", default="0.0.0.0")
    webhook.add_argument("--port", type=int, default=8443)
    webhook.add_argument("--tls-cert", required=True, metavar="FILE")
    webhook.add_argument("--tls-key", required=True, metavar="FILE")
    webhook.add_argument(
        "--cert-reload-interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how often to look for a renewed certificate "
        "(env TRAFFIC_COLOR_CERT_RELOAD_SECONDS, default 10)",
    )
    add_inject_arguments(webhook)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return 2
    handler = COMMANDS[args.command]
    return handler(args)


def _run(args: argparse.Namespace) -> int:
    from sidecar.runtime import run_sidecar

    return run_sidecar(args.policy, args.color)


def _check(args: argparse.Namespace) -> int:
    from sidecar.errors import PolicyError
    from sidecar.manifests import policies_in
    from sidecar.policy import check_pod_color

    try:
        with open(args.file, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        print(f"{args.file}: cannot read: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        found = policies_in(text, args.file, args.key)
    except PolicyError as exc:
        print(exc.format(), file=sys.stderr)
        return 1
    for label, policy in found:
        where = f" ({label})" if label else ""
        if args.color:
            why = check_pod_color(policy, args.color)
            if why:
                print(f"{args.file}:1: {why}{where}", file=sys.stderr)
                return 1
        print(f"{args.file}{where}: ok ({len(policy.colors)} colors, digest {policy.digest})")
    return 0


def _status(args: argparse.Namespace) -> int:
    from sidecar.admin.status import run_status

    return run_status(args.admin, as_json=args.json)


def _policy_or_none(path: str | None) -> Policy | None:
    """The policy at ``path`` (built-in when None), or None after printing why not."""
    from sidecar.errors import PolicyError
    from sidecar.runtime import load_policy

    try:
        return load_policy(path)
    except PolicyError as exc:
        print(exc.format(), file=sys.stderr)
    except OSError as exc:
        print(f"{path}: cannot read: {exc.strerror}", file=sys.stderr)
    return None


def _doctor(args: argparse.Namespace) -> int:
    from sidecar.datapath.doctor import format_doctor, run_doctor

    policy = _policy_or_none(args.policy)
    if policy is None:
        return 1
    if args.preflight:
        from sidecar.preflight import run_preflight

        checks = run_preflight(policy, args.color or policy.default_color)
    elif args.node:
        from sidecar.datapath.doctor import run_node_doctor

        checks = run_node_doctor(policy)
    else:
        checks = run_doctor(policy)
    print(format_doctor(checks))
    return 0 if all(c.ok for c in checks) else 1


def _analyze(args: argparse.Namespace) -> int:
    from sidecar.analyze import run_analyze

    return run_analyze(args.files, args.json, args.policy_configmap)


def _capture(args: argparse.Namespace) -> int:
    import json

    from sidecar.datapath import capture
    from sidecar.errors import DatapathError
    from sidecar.runtime import capture_ports

    policy = _policy_or_none(args.policy)
    if policy is None:
        return 1
    if args.action == "install":
        from sidecar.inject.capture_flags import policy_with_flags

        try:
            policy = policy_with_flags(policy, args)
        except ValueError as exc:
            print(f"capture: {exc}", file=sys.stderr)
            return 2
        ports = capture_ports(policy)
        if isinstance(ports, str):
            print(f"capture: {ports}", file=sys.stderr)
            return 1
        cmd = capture.ruleset(policy.capture, ports)
    elif args.action == "remove":
        cmd = capture.removal()
    else:
        cmd = capture.listing()
    if args.dry_run:
        print(json.dumps(cmd, indent=2))
        return 0
    try:
        if args.action == "show":
            table = capture.table_present()
            if table is None:
                print(f"capture: table {capture.FAMILY} {capture.TABLE} is not installed")
                return 1
            print(json.dumps(table, indent=2))
            return 0
        capture.run_nft_child(cmd)
    except DatapathError as exc:
        print(f"capture {args.action} failed: {exc}", file=sys.stderr)
        return 1
    done = "installed" if args.action == "install" else "removed"
    print(f"capture: table {capture.FAMILY} {capture.TABLE} {done}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sidecar.demo.run import run_demo

    return run_demo(args)


def _wait_ready(args: argparse.Namespace) -> int:
    from sidecar.admin.wait import wait_ready

    return wait_ready(args.admin, args.timeout)


def _inject(args: argparse.Namespace) -> int:
    from sidecar.inject.cli import run_inject

    return run_inject(args)


def _node(args: argparse.Namespace) -> int:
    from sidecar.node import run_node

    return run_node(args.policy)


def _webhook(args: argparse.Namespace) -> int:
    from sidecar.admin.webhook import run_webhook

    return run_webhook(args)


COMMANDS = {
    "run": _run,
    "check": _check,
    "status": _status,
    "wait-ready": _wait_ready,
    "doctor": _doctor,
    "analyze": _analyze,
    "capture": _capture,
    "demo": _demo,
    "inject": _inject,
    "webhook": _webhook,
    "node": _node,
}
