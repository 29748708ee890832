"""The bpf(2) calls the long-lived sidecar needs, through libbpf.so.1 and ctypes.

Why not BCC: the sidecar process never imports ``bcc`` (issue 5); a short-lived
child compiles the classifier and hands over file descriptors, and from then on
the parent only reads and writes maps and runs test packets, which libbpf's
low-level API does with plain fds. libbpf 1.x returns ``-errno``; every wrapper
turns that into ``OSError`` with the errno and the call's name, except "no such
entry", which callers expect and get as ``None``/``False``.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

BPF_ANY = 0  # create or update
BPF_NOEXIST = 1  # create only
BPF_EXIST = 2  # update only
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_MAP_TYPE_ARRAY = 2
BPF_F_RDONLY_PROG = 1 << 7  # programs may read the map, never write it

_c_void_p = ctypes.c_void_p
_c_int = ctypes.c_int
_c_uint32 = ctypes.c_uint32


class TestRunOpts(ctypes.Structure):
    """libbpf's ``struct bpf_test_run_opts`` (bpf.h, libbpf >= 1.0)."""

    __test__ = False  # not a pytest class, despite the name
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", _c_void_p),
        ("data_out", _c_void_p),
        ("data_size_in", _c_uint32),
        ("data_size_out", _c_uint32),
        ("ctx_in", _c_void_p),
        ("ctx_out", _c_void_p),
        ("ctx_size_in", _c_uint32),
        ("ctx_size_out", _c_uint32),
        ("retval", _c_uint32),
        ("repeat", _c_int),
        ("duration", _c_uint32),
        ("flags", _c_uint32),
        ("cpu", _c_uint32),
        ("batch_size", _c_uint32),
    ]


class MapCreateOpts(ctypes.Structure):
    """libbpf's ``struct bpf_map_create_opts`` (bpf.h, libbpf >= 1.0)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("btf_fd", _c_uint32),
        ("btf_key_type_id", _c_uint32),
        ("btf_value_type_id", _c_uint32),
        ("btf_vmlinux_value_type_id", _c_uint32),
        ("inner_map_fd", _c_uint32),
        ("map_flags", _c_uint32),
        ("map_extra", ctypes.c_uint64),
        ("numa_node", _c_uint32),
        ("map_ifindex", _c_uint32),
    ]


class MapInfo(ctypes.Structure):
    """The head of the kernel's ``struct bpf_map_info`` (linux/bpf.h)."""

    _fields_ = [
        ("type", _c_uint32),
        ("id", _c_uint32),
        ("key_size", _c_uint32),
        ("value_size", _c_uint32),
        ("max_entries", _c_uint32),
        ("map_flags", _c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class BatchOpts(ctypes.Structure):
    """libbpf's ``struct bpf_map_batch_opts``."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


@dataclass(frozen=True)
class TestRun:
    """What one BPF_PROG_TEST_RUN returned."""

    __test__ = False
    retval: int
    data: bytes  # the packet after the program (data_out)
    duration_ns: int  # kernel-measured mean per repetition
    ctx: bytes | None  # ctx_out, when a context was passed in


@cache
def _lib() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    except OSError as exc:
        raise OSError(
            errno.ENOENT,
            "libbpf.so.1 not found: install the Debian package libbpf1 (apt-get install libbpf1)",
        ) from exc
    sigs: dict[str, tuple[list, type]] = {
        "bpf_map_update_elem": ([_c_int, _c_void_p, _c_void_p, ctypes.c_uint64], _c_int),
        "bpf_map_lookup_elem": ([_c_int, _c_void_p, _c_void_p], _c_int),
        "bpf_map_delete_elem": ([_c_int, _c_void_p], _c_int),
        "bpf_map_get_next_key": ([_c_int, _c_void_p, _c_void_p], _c_int),
        "bpf_map_update_batch": (
            [_c_int, _c_void_p, _c_void_p, ctypes.POINTER(_c_uint32), _c_void_p],
            _c_int,
        ),
        "bpf_prog_test_run_opts": ([_c_int, ctypes.POINTER(TestRunOpts)], _c_int),
        "bpf_obj_get_info_by_fd": ([_c_int, _c_void_p, ctypes.POINTER(_c_uint32)], _c_int),
        "bpf_prog_load": (
            [_c_int, ctypes.c_char_p, ctypes.c_char_p, _c_void_p, ctypes.c_size_t, _c_void_p],
            _c_int,
        ),
        "bpf_map_create": (
            [
                _c_int,
                ctypes.c_char_p,
                _c_uint32,
                _c_uint32,
                _c_uint32,
                ctypes.POINTER(MapCreateOpts),
            ],
            _c_int,
        ),
        "libbpf_num_possible_cpus": ([], _c_int),
    }
    for fn, (argtypes, restype) in sigs.items():
        func = getattr(lib, fn)
        func.argtypes = argtypes
        func.restype = restype
    return lib


def _check(ret: int, call: str) -> int:
    """libbpf returns -errno (and sets errno); raise it as OSError."""
    if ret < 0:
        code = -ret if ret != -1 else (ctypes.get_errno() or errno.EIO)
        raise OSError(code, f"{call}: {os.strerror(code)}")
    return ret


def _buf(obj: ctypes.Structure | ctypes.Array | bytes) -> ctypes.Array | ctypes.Structure:
    return ctypes.create_string_buffer(obj, len(obj)) if isinstance(obj, bytes) else obj


def map_update(fd: int, key, value, flags: int = BPF_ANY) -> None:
    """Write one entry (key and value are ctypes objects or bytes of the map's sizes)."""
    k, v = _buf(key), _buf(value)
    _check(
        _lib().bpf_map_update_elem(fd, ctypes.byref(k), ctypes.byref(v), flags),
        "bpf_map_update_elem",
    )


def map_lookup(fd: int, key, value_size: int) -> bytes | None:
    """The value under ``key``, or None when there is no such entry."""
    k = _buf(key)
    out = ctypes.create_string_buffer(value_size)
    ret = _lib().bpf_map_lookup_elem(fd, ctypes.byref(k), out)
    if ret == -errno.ENOENT:
        return None
    _check(ret, "bpf_map_lookup_elem")
    return out.raw


def map_delete(fd: int, key) -> bool:
    """Delete ``key``; False when it was not there."""
    k = _buf(key)
    ret = _lib().bpf_map_delete_elem(fd, ctypes.byref(k))
    if ret == -errno.ENOENT:
        return False
    _check(ret, "bpf_map_delete_elem")
    return True


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """Every key, in the kernel's order (a racing writer may skip or repeat one)."""
    lib = _lib()
    cur = ctypes.create_string_buffer(key_size)
    nxt = ctypes.create_string_buffer(key_size)
    ret = lib.bpf_map_get_next_key(fd, None, nxt)
    while ret == 0:
        yield nxt.raw
        ctypes.memmove(cur, nxt, key_size)
        ret = lib.bpf_map_get_next_key(fd, cur, nxt)
    if ret != -errno.ENOENT:
        _check(ret, "bpf_map_get_next_key")


def map_update_batch(fd: int, keys: bytes, values: bytes, count: int) -> int:
    """Write ``count`` packed keys/values in one call; returns how many were written."""
    n = _c_uint32(count)
    opts = BatchOpts(sz=ctypes.sizeof(BatchOpts))
    kb = ctypes.create_string_buffer(keys, len(keys))
    vb = ctypes.create_string_buffer(values, len(values))
    _check(
        _lib().bpf_map_update_batch(fd, kb, vb, ctypes.byref(n), ctypes.byref(opts)),
        "bpf_map_update_batch",
    )
    return n.value


def single_value_map(name: str, value_size: int) -> int:
    """Create an array map of one ``value_size``-byte value that programs only read; its fd.

    For values a program addresses in place (BPF_PSEUDO_MAP_VALUE needs an
    array with exactly one entry); user space reads and writes the value as
    key 0. BCC creates only the maps it declares, so its build child makes
    these (bpf/node_maps.h says why).
    """
    opts = MapCreateOpts(sz=ctypes.sizeof(MapCreateOpts), map_flags=BPF_F_RDONLY_PROG)
    fd = _lib().bpf_map_create(BPF_MAP_TYPE_ARRAY, name.encode(), 4, value_size, 1, opts)
    return _check(fd, f"bpf_map_create({name})")


def map_info(fd: int) -> MapInfo:
    """Type, sizes and name of the map behind ``fd``."""
    info = MapInfo()
    size = _c_uint32(ctypes.sizeof(info))
    _check(
        _lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
        "bpf_obj_get_info_by_fd",
    )
    return info


def num_possible_cpus() -> int:
    """How many values a per-CPU map returns per key."""
    return _check(_lib().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


def prog_test_run(
    fd: int,
    data: bytes,
    *,
    ctx: ctypes.Structure | None = None,
    repeat: int = 1,
    data_out_size: int | None = None,
) -> TestRun:
    """Run the program on one packet in the kernel (BPF_PROG_TEST_RUN), no network needed.

    ``ctx`` (for tc programs an ``abi.SkBuff``) goes in as ctx_in and comes back
    from ctx_out in ``TestRun.ctx``: that is how a test reads ``skb->mark``.
    """
    data_in = ctypes.create_string_buffer(data, len(data))
    out_size = data_out_size if data_out_size is not None else len(data) + 256
    data_out = ctypes.create_string_buffer(out_size)
    opts = TestRunOpts(sz=ctypes.sizeof(TestRunOpts))
    opts.data_in = ctypes.cast(data_in, _c_void_p)
    opts.data_size_in = len(data)
    opts.data_out = ctypes.cast(data_out, _c_void_p)
    opts.data_size_out = out_size
    opts.repeat = repeat
    ctx_out = None
    if ctx is not None:
        ctx_in = ctypes.create_string_buffer(bytes(ctx), ctypes.sizeof(ctx))
        ctx_out = ctypes.create_string_buffer(ctypes.sizeof(ctx))
        opts.ctx_in = ctypes.cast(ctx_in, _c_void_p)
        opts.ctx_size_in = ctypes.sizeof(ctx)
        opts.ctx_out = ctypes.cast(ctx_out, _c_void_p)
        opts.ctx_size_out = ctypes.sizeof(ctx)
    _check(_lib().bpf_prog_test_run_opts(fd, ctypes.byref(opts)), "bpf_prog_test_run_opts")
    return TestRun(
        retval=opts.retval,
        data=data_out.raw[: opts.data_size_out],
        duration_ns=opts.duration,
        ctx=ctx_out.raw[: opts.ctx_size_out] if ctx_out is not None else None,
    )


def prog_load_sched_cls(insns: bytes, name: str = "sc_baseline") -> int:
    """Load raw BPF instructions as a SCHED_CLS program; returns its fd.

    Only for baselines (an empty program to measure BPF_PROG_TEST_RUN's own
    overhead next to the classifier); the classifier itself comes from BCC.
    """
    if len(insns) % 8:
        raise ValueError("BPF instructions are 8 bytes each")
    buf = ctypes.create_string_buffer(insns, len(insns))
    fd = _lib().bpf_prog_load(
        BPF_PROG_TYPE_SCHED_CLS, name.encode(), b"GPL", buf, len(insns) // 8, None
    )
    return _check(fd, "bpf_prog_load")


# mov r0, 0 (TC_ACT_OK); exit
RETURN_OK_INSNS = bytes.fromhex("b7000000000000009500000000000000")
