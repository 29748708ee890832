"""Which DS field a color's upstream sockets carry (the node reads the color from it)."""

from __future__ import annotations

import socket

from sidecar.policy import parse_policy
from sidecar.proxy.pool import color_dscp, set_socket_dscp, tos_option

POLICY = parse_policy("version: 1\ncolors:\n  stable: {mark: 1}\n  canary: {mark: 2, dscp: 10}\n")


def test_a_color_with_a_dscp_sets_it_and_others_leave_the_socket_alone():
    assert color_dscp(POLICY, "canary") == 10
    assert color_dscp(POLICY, "stable") is None
    assert color_dscp(POLICY, "no-such-color") is None


def test_the_dscp_goes_in_the_top_six_bits_of_the_ds_field_per_family():
    assert tos_option(socket.AF_INET, 10) == (socket.IPPROTO_IP, socket.IP_TOS, 40)
    assert tos_option(socket.AF_INET6, 46) == (socket.IPPROTO_IPV6, socket.IPV6_TCLASS, 184)


def test_an_unprivileged_socket_accepts_it():
    for family in (socket.AF_INET, socket.AF_INET6):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(*tos_option(family, 10))
            level, opt, _ = tos_option(family, 10)
            assert s.getsockopt(level, opt) == 40


def test_a_live_connected_socket_takes_a_new_dscp_per_family() -> None:
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family, socket.SOCK_STREAM) as server:
            server.bind((host, 0))
            server.listen(1)
            with socket.create_connection(server.getsockname()[:2]) as client:
                level, opt, _ = tos_option(family, 0)
                assert set_socket_dscp(client, 10) and client.getsockopt(level, opt) == 40
                assert set_socket_dscp(client, 0) and client.getsockopt(level, opt) == 0
            assert not set_socket_dscp(client, 10)  # closed: said, not raised
