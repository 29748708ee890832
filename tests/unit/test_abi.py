"""bpf/sc_abi.h and sidecar/datapath/abi.py agree (Cilium's alignchecker, host compiler, no root).

tests/abi/probe.c prints what C sees: sizes, field offsets and sizes, constants.
Every struct and field abi.py names must match, and every field the probe
lists must exist in abi.py, so a field added on one side only fails here.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from sidecar.datapath import abi
from sidecar.datapath.build import source_dir
from sidecar.policy import MAX_COLORS
from tests.conftest import IN_CI

PROBE = Path(__file__).resolve().parents[1] / "abi" / "probe.c"


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict[str, dict]:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        if IN_CI:
            pytest.fail("CI must run the ABI check: no C compiler (make install brings gcc)")
        pytest.skip("no C compiler (apt-get install gcc)")
    exe = tmp_path_factory.mktemp("abi") / "probe"
    subprocess.run(
        [gcc, "-Wall", "-Werror", "-I", str(source_dir()), "-o", str(exe), str(PROBE)],
        check=True,
        capture_output=True,
        text=True,
    )
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    sizes: dict[str, int] = {}
    fields: dict[str, dict[str, tuple[int, int]]] = {}
    consts: dict[str, int] = {}
    for line in out.splitlines():
        kind, *rest = line.split()
        if kind == "size":
            sizes[rest[0]] = int(rest[1])
        elif kind == "field":
            fields.setdefault(rest[0], {})[rest[1]] = (int(rest[2]), int(rest[3]))
        elif kind == "const":
            consts[rest[0]] = int(rest[1])
    return {"sizes": sizes, "fields": fields, "consts": consts}


@pytest.mark.parametrize("cname", sorted(abi.STRUCTS))
def test_struct_layout_matches_c(probe, cname):
    mirror = abi.STRUCTS[cname]
    assert ctypes.sizeof(mirror) == probe["sizes"][cname], f"sizeof(struct {cname})"
    named = {f[0]: getattr(mirror, f[0]) for f in mirror._fields_ if not f[0].startswith("_")}
    c_fields = probe["fields"][cname]
    assert set(named) == set(c_fields), f"fields of struct {cname} differ"
    for name, desc in named.items():
        assert (desc.offset, desc.size) == c_fields[name], f"struct {cname}.{name}"


def test_every_shared_struct_is_mirrored(probe):
    assert set(probe["sizes"]) == set(abi.STRUCTS)


def test_constants_match_c(probe):
    assert probe["consts"] == abi.CONSTANTS


def test_color_ids_fit_the_table():
    assert MAX_COLORS == abi.SC_MAX_COLORS - 1


def test_source_ships_with_the_package():
    src = source_dir()
    shipped = {p.name for p in src.iterdir()}
    assert {"classifier.c", "node.c", "sc_abi.h", "maps.h", "node_maps.h", "parse.h"} <= shipped
    assert "dscp.h" in shipped


# ------------------------------------------------------------ pure helpers


def test_flow_key_ipv4_layout():
    key = abi.flow_key(("198.18.0.1", 40000), ("198.19.0.10", 8080))
    assert isinstance(key, abi.FlowKey4)
    raw = bytes(key)
    assert len(raw) == 12, "the compact IPv4 key: what the kernel hashes per packet"
    assert raw[0:4] == bytes([198, 18, 0, 1])
    assert raw[4:8] == bytes([198, 19, 0, 10])
    assert raw[8:10] == (40000).to_bytes(2, "big")  # network order on the wire
    assert raw[10:12] == (8080).to_bytes(2, "big")


def test_flow_key_ipv6_and_mapped_ipv4():
    key = abi.flow_key(("fd00::1", 1), ("fd00::2", 2))
    assert isinstance(key, abi.FlowKey6)
    raw = bytes(key)
    assert raw[:16] == bytes.fromhex("fd000000000000000000000000000001")
    assert raw[16:32] == bytes.fromhex("fd000000000000000000000000000002")
    assert raw[32:] == bytes([0, 1, 0, 2])
    mapped = abi.flow_key(("::ffff:198.18.0.1", 1), ("::ffff:198.19.0.1", 2))
    assert bytes(mapped) == bytes(abi.flow_key(("198.18.0.1", 1), ("198.19.0.1", 2)))


@pytest.mark.parametrize(
    ("local", "remote"),
    [
        (("198.18.0.1", 40000), ("198.19.0.10", 8080)),
        (("fd00::1", 1), ("fd00::10:2", 65535)),
    ],
)
def test_flow_endpoints_inverts_flow_key(local, remote):
    assert abi.flow_endpoints(abi.flow_key(local, remote)) == (local, remote)
    # The reply's key is the same flow seen from the other side.
    assert abi.flow_endpoints(abi.flow_key(remote, local)) == (remote, local)


@pytest.mark.parametrize(
    ("local", "remote", "match"),
    [
        (("198.18.0.1", 1), ("fd00::1", 2), "mixed address families"),
        (("198.18.0.1", 0), ("198.19.0.1", 2), "port 0"),
        (("198.18.0.1", 1), ("198.19.0.1", 70000), "port 70000"),
        (("not-an-ip", 1), ("198.19.0.1", 2), "does not appear to be"),
    ],
)
def test_flow_key_rejects(local, remote, match):
    with pytest.raises(ValueError, match=match):
        abi.flow_key(local, remote)


def test_color_entry_flags_and_checks():
    plain = abi.color_entry(0x2, 0xFF)
    assert (plain.mark, plain.mask, plain.flags) == (0x2, 0xFF, abi.F_PRESENT)
    full = abi.color_entry(0x2, 0xFF, priority=7, dscp=46)
    assert full.flags == abi.F_PRESENT | abi.F_HAS_PRIORITY | abi.F_HAS_DSCP
    assert (full.priority, full.dscp) == (7, 46)
    # priority 0 and DSCP 0 (best effort) are real settings, not "unset"
    zero = abi.color_entry(0x1, 0xFF, priority=0, dscp=0)
    assert zero.flags == abi.F_PRESENT | abi.F_HAS_PRIORITY | abi.F_HAS_DSCP
    with pytest.raises(ValueError, match="outside the mark mask"):
        abi.color_entry(0x4002, 0xFF)
    with pytest.raises(ValueError, match="dscp 64"):
        abi.color_entry(0x1, 0xFF, dscp=64)
    with pytest.raises(ValueError, match="non-zero"):
        abi.color_entry(0, 0)


def test_slots():
    assert abi.color_slot(0, 1) == 1
    assert abi.color_slot(1, 63) == 127
    assert abi.stats_slot(2, "ingress") == 4 and abi.stats_slot(2, "egress") == 5
    with pytest.raises(ValueError):
        abi.color_slot(0, 64)
    with pytest.raises(ValueError):
        abi.color_slot(2, 1)
