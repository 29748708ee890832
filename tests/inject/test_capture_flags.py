"""The capture init container's flags read back onto the policy: what injection writes
(``capture_args``) is what ``traffic-color capture install`` applies. Pure."""

from __future__ import annotations

import argparse
import ipaddress

import pytest

from sidecar.inject.capture_flags import add_flags, apply
from sidecar.inject.mutation import InjectConfig, inject_pod
from sidecar.policy import parse_policy

POLICY = parse_policy(
    "colors: {stable: {mark: 1}}\n"
    "capture:\n"
    "  outbound: {exclude_ports: [25], include_cidrs: [10.0.0.0/8], exclude_cidrs: []}\n"
    "  inbound: {exclude_ports: [9100]}\n"
)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_flags(parser)
    return parser.parse_args(argv)


def test_the_args_injection_writes_apply_to_the_policy() -> None:
    pod = {
        "metadata": {
            "annotations": {
                "traffic-color.io/exclude-outbound-ports": "5432,25",
                "traffic-color.io/exclude-outbound-cidrs": "169.254.169.254/32",
                "traffic-color.io/include-outbound-cidrs": "fd00::/8",
                "traffic-color.io/exclude-inbound-ports": "9090",
            }
        },
        "spec": {"containers": [{"name": "a", "image": "a"}]},
    }
    new, _ = inject_pod(pod, InjectConfig())
    init = new["spec"]["initContainers"][0]
    cap = apply(POLICY.capture, _parse(init["args"][4:]))
    assert cap.outbound.exclude_ports == (25, 5432)  # added to the policy's
    assert cap.outbound.exclude_cidrs == (ipaddress.ip_network("169.254.169.254/32"),)
    assert cap.outbound.include_cidrs == (ipaddress.ip_network("fd00::/8"),)  # replaced
    assert cap.inbound.exclude_ports == (9100, 9090)


def test_no_flags_keep_the_policy_and_star_includes_everything() -> None:
    assert apply(POLICY.capture, _parse([])) == POLICY.capture
    cap = apply(POLICY.capture, _parse(["--include-outbound-cidrs=*"]))
    assert cap.outbound.include_cidrs == ()


def test_a_bad_flag_names_itself() -> None:
    with pytest.raises(ValueError, match=r"--exclude-inbound-ports: '80,x' .* bad item 'x'"):
        apply(POLICY.capture, _parse(["--exclude-inbound-ports=80,x"]))
