"""The doctor's judges: pure decisions over facts gathered elsewhere."""

from __future__ import annotations

from sidecar.datapath.doctor import (
    CAPS,
    DoctorCheck,
    format_doctor,
    judge_caps,
    judge_fwmark_overlap,
    judge_rp_filter,
)


def caps(*names: str) -> int:
    return sum(1 << CAPS[n] for n in names)


def test_capabilities_need_net_admin_and_bpf_or_sys_admin():
    assert judge_caps(caps("NET_ADMIN", "BPF")).ok
    assert judge_caps(caps("NET_ADMIN", "SYS_ADMIN")).ok
    lacking = judge_caps(caps("BPF", "PERFMON"))
    assert not lacking.ok and "NET_ADMIN" in lacking.detail and "capabilities" in lacking.fix


def test_rp_filter_strict_anywhere_is_reported_with_the_interface():
    assert judge_rp_filter({"all": 0, "default": 0, "lo": 1, "eth0": 2}, "ns").ok
    bad = judge_rp_filter({"all": 0, "default": 0, "eth0": 0, "eth1": 1}, "ns")
    assert not bad.ok and "eth1" in bad.detail and "eth0" not in bad.detail
    everywhere = judge_rp_filter({"all": 1, "default": 0, "eth0": 0}, "ns")
    assert not everywhere.ok and "all=1" in everywhere.detail and "eth0" in everywhere.detail


def test_fwmark_rules_of_others_overlapping_our_mask_are_reported():
    ours = {"priority": 10002, "fwmark": 2, "fwmask": 0xFF, "table": 102, "ours": True}
    apart = {"priority": 9000, "fwmark": 0x4000, "fwmask": 0xFF00, "table": 7, "ours": False}
    clash = {"priority": 9001, "fwmark": 0x1, "fwmask": 0x1, "table": 8, "ours": False}
    assert judge_fwmark_overlap([ours, apart], 0xFF, "ns").ok
    bad = judge_fwmark_overlap([ours, apart, clash], 0xFF, "ns")
    assert not bad.ok and "9001" in bad.detail and "9000" not in bad.detail


def test_format_shows_fixes_only_for_failures_and_a_summary():
    text = format_doctor(
        [
            DoctorCheck("a", True, "fine", "never shown"),
            DoctorCheck("bb", False, "broken", "do this"),
        ]
    )
    assert "never shown" not in text
    assert "[FAIL] bb" in text and "fix: do this" in text
    assert text.endswith("1 of 2 check(s) failed")


def test_fdinfo_memlock_is_read_from_its_line() -> None:
    from sidecar.datapath.memlock import parse_fdinfo

    text = "pos:\t0\nflags:\t02000002\nmap_type:\t9\nmax_entries:\t131072\nmemlock:\t11534336\n"
    info = parse_fdinfo(text)
    assert info["memlock"] == "11534336" and info["map_type"] == "9"
