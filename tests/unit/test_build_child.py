"""The build child's answer to a refused bpf(): which fix it names, from facts it can read."""

from __future__ import annotations

from sidecar.datapath.child.build import HINT_PERM, HINT_SECCOMP, refused_hint

NET_ADMIN, SYS_ADMIN, BPF = 1 << 12, 1 << 21, 1 << 39


def test_cap_bpf_under_a_seccomp_filter_names_the_filter():
    assert refused_hint(NET_ADMIN | BPF, "2") == HINT_SECCOMP


def test_without_a_filter_or_with_sys_admin_it_is_about_capabilities():
    assert refused_hint(NET_ADMIN | BPF, "0") == HINT_PERM
    assert refused_hint(NET_ADMIN | BPF | SYS_ADMIN, "2") == HINT_PERM  # seccomp lets SYS_ADMIN
    assert refused_hint(NET_ADMIN, "2") == HINT_PERM
