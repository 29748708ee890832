"""The build child: fds cross the process boundary and work; bcc stays out of the parent."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sidecar.datapath import abi, bpfsys
from sidecar.datapath.build import build_classifier, build_node_classifier
from sidecar.errors import DatapathError
from tests.bpf import packets as pk
from tests.conftest import require_root

pytestmark = pytest.mark.root

BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9

# Runs in a fresh interpreter, so nothing else in this test session can have imported bcc.
PARENT = textwrap.dedent(
    """
    import json, sys
    from sidecar.datapath import abi, bpfsys
    from sidecar.datapath.build import build_classifier
    from tests.bpf import packets as pk

    clf = build_classifier(1000)
    maps = {}
    for name, fd in clf.maps.items():
        info = bpfsys.map_info(fd)
        maps[name] = [info.name.decode(), info.type, info.max_entries]
    run = bpfsys.prog_test_run(clf.progs["ingress"], pk.tcp4(("198.18.0.1", 1), ("198.19.0.1", 2)))
    print(json.dumps({
        "bcc_imported": "bcc" in sys.modules,
        "progs": sorted(clf.progs), "maps": maps, "retval": run.retval,
        "ids": clf.prog_ids, "tags": clf.prog_tags,
    }))
    clf.close()
    clf.close()
    """
)


def test_fds_arrive_and_work_without_bcc_in_the_parent():
    require_root()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run(
        [sys.executable, "-c", PARENT], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["bcc_imported"] is False
    assert out["progs"] == ["egress", "ingress"]
    assert out["retval"] == abi.VERDICT_RETVAL
    # Two entries per flow (forward and reverse key) in each family's map.
    assert out["maps"] == {
        abi.MAPS.flows: [abi.MAPS.flows, BPF_MAP_TYPE_LRU_HASH, 2000],
        abi.MAPS.flows6: [abi.MAPS.flows6, BPF_MAP_TYPE_LRU_HASH, 2000],
        abi.MAPS.colors: [abi.MAPS.colors, BPF_MAP_TYPE_ARRAY, abi.SC_MAX_COLORS * 2],
        abi.MAPS.config: [abi.MAPS.config, BPF_MAP_TYPE_ARRAY, 1],
        abi.MAPS.stats: [abi.MAPS.stats, BPF_MAP_TYPE_PERCPU_ARRAY, abi.SC_STATS_SLOTS],
    }
    assert all(pid > 0 for pid in out["ids"].values())
    assert all(len(tag) == 16 for tag in out["tags"].values())


def test_close_closes_every_fd_and_is_idempotent():
    require_root()
    clf = build_classifier(16)
    fds = [*clf.progs.values(), *clf.maps.values()]
    for name, key_t in ((abi.MAPS.flows, abi.FlowKey4), (abi.MAPS.flows6, abi.FlowKey6)):
        info = bpfsys.map_info(clf.maps[name])
        assert (info.max_entries, info.key_size) == (32, ctypes.sizeof(key_t))
    clf.close()
    clf.close()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_missing_kernel_headers_explain_the_fix(monkeypatch):
    require_root()
    monkeypatch.setenv("BCC_KERNEL_SOURCE", "/nonexistent/kernel-headers")
    with pytest.raises(DatapathError) as info:
        build_classifier(1024)
    err = info.value
    assert err.step == "compile"
    assert "/nonexistent/kernel-headers" in str(err)
    assert "linux-headers" in err.hint and "/lib/modules" in err.hint


def test_kernel_refusal_reaches_the_parent_with_details():
    """A flow table of size 0 compiles but the kernel refuses the map: say so, with its words."""
    require_root()
    with pytest.raises(DatapathError) as info:
        build_classifier(0)
    text = str(info.value)
    assert info.value.step == "compile"
    assert "flow_table_size=0" in text
    assert "sc_flows" in text  # libbcc's own message names the map it could not create


def test_timeout_kills_the_child():
    require_root()
    with pytest.raises(DatapathError, match="did not answer within"):
        build_classifier(1024, timeout=0.05)


def test_node_table_is_a_single_value_the_program_only_reads():
    """bpf/node_maps.h: the color table is one value, read in place; counters one row per slot."""
    require_root()
    with build_node_classifier(8) as clf:
        info = {name: bpfsys.map_info(fd) for name, fd in clf.maps.items()}
        run = bpfsys.prog_test_run(
            clf.progs["ingress"], pk.tcp4(("198.18.0.1", 1), ("198.19.0.1", 2))
        )
    m = abi.NODE_MAPS
    assert {n: (i.type, i.max_entries, i.value_size) for n, i in info.items()} == {
        m.colors: (BPF_MAP_TYPE_ARRAY, 1, ctypes.sizeof(abi.NodeTable)),
        m.stats: (BPF_MAP_TYPE_PERCPU_ARRAY, 8, ctypes.sizeof(abi.NodeSlotCounters)),
    }
    assert info[m.colors].name.decode() == m.colors
    assert info[m.colors].map_flags & bpfsys.BPF_F_RDONLY_PROG, "the table is writable by programs"
    assert run.retval == abi.VERDICT_RETVAL


def test_node_sizes_the_kernel_or_the_source_refuse_are_named():
    """No counter slots (the kernel refuses the map), or more than a classid's minor holds."""
    require_root()
    with pytest.raises(DatapathError) as info:
        build_node_classifier(0)
    err = info.value
    assert err.step == "compile"
    assert "max_interfaces=0" in str(err) + err.hint
    with pytest.raises(DatapathError) as info:
        build_node_classifier(65537)
    assert "16-bit minor" in str(info.value)


# Compiles bpf/node.c as the build child does for a given machine, then loads its
# instructions with BPF_F_STRICT_ALIGNMENT (the verifier's default where the kernel
# lacks efficient unaligned access) and runs the loaded program on three frames.
_STRICT_LOAD = """
import ctypes, os, platform, sys
sys.path.append("/usr/lib/python3/dist-packages")
import bcc
from sidecar.datapath import abi, bpfsys
from sidecar.datapath.build import NODE, node_defines, source_dir
from sidecar.datapath.maps import NodeColorTable
from sidecar.policy import Color
from tests.bpf import packets as pk

defines = node_defines(8, machine=sys.argv[1])
table = bpfsys.single_value_map(abi.NODE_MAPS.colors, ctypes.sizeof(abi.NodeTable))
NodeColorTable(table).apply([Color("canary", 2, 0x2, dscp=10)], 0xFF)
flags = [f"-I{source_dir()}", f"-DSC_NODE_DSCPTAB_FD={table}"]
flags += [f"-D{k}={v}" for k, v in defines.items()]
insns = bcc.BPF(src_file=str(source_dir() / "node.c").encode(), cflags=flags).dump_func(
    b"sc_node_ingress"
)

class Attr(ctypes.Structure):  # the head of union bpf_attr for BPF_PROG_LOAD
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
                ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
                ("prog_flags", ctypes.c_uint32), ("prog_name", ctypes.c_char * 16),
                ("rest", ctypes.c_char * 64)]

code = ctypes.create_string_buffer(insns, len(insns))
lic = ctypes.create_string_buffer(b"GPL")
log = ctypes.create_string_buffer(1 << 20)
attr = Attr(prog_type=3, insn_cnt=len(insns) // 8, insns=ctypes.addressof(code),
            license=ctypes.addressof(lic), log_level=1, log_size=len(log),
            log_buf=ctypes.addressof(log), prog_flags=1, prog_name=b"sc_strict")
libc = ctypes.CDLL(None, use_errno=True)
nr = {"x86_64": 321, "aarch64": 280}[platform.machine()]  # bpf(2)
fd = libc.syscall(nr, 5, ctypes.byref(attr), ctypes.sizeof(attr))  # BPF_PROG_LOAD
if fd < 0:
    print("refused", "misaligned" in log.value.decode())
    sys.exit(0)
marks = []
for frame in (pk.tcp4(("198.18.0.1", 1), ("198.19.0.1", 2), tos=10 << 2),
              pk.tcp6(("fd00::1", 1), ("fd00::2", 2), tclass=10 << 2),
              pk.tcp4(("198.18.0.1", 1), ("198.19.0.1", 2), tos=12 << 2)):
    run = bpfsys.prog_test_run(fd, frame, ctx=abi.SkBuff())
    marks.append(abi.SkBuff.from_buffer_copy(run.ctx).mark)
print("loaded", *marks)
"""


@pytest.mark.parametrize(
    "machine, expected",
    [("mips64", "loaded 2 2 0"), ("riscv64", "loaded 2 2 0"), ("x86_64", "refused True")],
)
def test_the_node_classifier_loads_where_the_verifier_wants_aligned_loads(machine, expected):
    """Built for a machine without efficient unaligned access, it loads under strict
    alignment and reads the same DSCP; the one-word build is refused there (why it exists)."""
    require_root()
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", _STRICT_LOAD, machine],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == expected
