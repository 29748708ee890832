"""Compile and load a classifier in a short-lived child; the parent's side of it.

Why a child (issue 5): BCC pulls LLVM/clang (hundreds of MB) into the process
that imports it, and the sidecar lives as long as its pod. So
``build_classifier`` starts ``python -m sidecar.datapath.child.build`` through
``spawn``; the child imports ``bcc``, compiles and loads the program this
module describes (``Program``: its source, entry points and maps), sends the
program and map fds back (SCM_RIGHTS) and exits. The kernel objects live on
through our copies of the fds. This process never imports ``bcc``: it checks
each map's layout against ``abi`` and drives the fds through ``bpfsys``.

When the child cannot build, it answers with the error envelope of ``spawn``;
``build_classifier`` raises that as ``DatapathError(step="compile")``.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.resources
import json
import logging
import os
import platform
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.datapath import abi, bpfsys, spawn
from sidecar.errors import DatapathError

log = logging.getLogger(__name__)

_MAX_FDS = 16
_MSG_MAX = 1 << 16


@dataclass
class Classifier:
    """The loaded classifier, as file descriptors the parent owns."""

    progs: dict[str, int]  # "ingress" / "egress" -> program fd
    maps: dict[str, int]  # abi map name -> map fd
    flow_table_size: int  # 0 for the node classifier, which has no flow maps
    prog_tags: dict[str, str] = field(default_factory=dict)  # hook -> kernel prog tag
    prog_ids: dict[str, int] = field(default_factory=dict)  # hook -> kernel prog id

    def close(self) -> None:
        """Close every fd; safe to call twice. Attached programs stay attached."""
        for fd in [*self.progs.values(), *self.maps.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.progs.clear()
        self.maps.clear()

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def source_dir() -> Path:
    """Where ``classifier.c`` and its headers are (they ship as package ``sidecar.bpf``)."""
    with contextlib.suppress(ModuleNotFoundError, TypeError, ValueError):
        src = importlib.resources.files("sidecar.bpf").joinpath("classifier.c")
        path = Path(str(src))
        if path.is_file():
            return path.parent
    # A source checkout whose install does not map sidecar.bpf: the repo's bpf/.
    fallback = Path(__file__).resolve().parents[2] / "bpf"
    if (fallback / "classifier.c").is_file():
        return fallback
    raise FileNotFoundError("classifier.c not found in package sidecar.bpf nor in ./bpf")


def build_classifier(flow_table_size: int, *, timeout: float = 60.0) -> Classifier:
    """Compile and load the pod classifier in a child process; return its fds.

    Raises ``DatapathError(step="compile")`` with the child's explanation when
    it fails, and when it does not answer within ``timeout`` seconds.
    """
    args = ["--flow-table-size", str(flow_table_size)]
    return _build(POD, args, flow_table_size, timeout)


def build_node_classifier(max_interfaces: int, *, timeout: float = 60.0) -> Classifier:
    """Compile and load the node classifier (bpf/node.c) in a child; as ``build_classifier``.

    ``max_interfaces`` sizes the counters (slot 0 counts interfaces without a
    slot); it must fit a classid's 16-bit minor (``abi.node_classid``).
    """
    args = ["--max-interfaces", str(max_interfaces)]
    return _build(NODE, args, 0, timeout, node_defines(max_interfaces))


# Machines whose kernels have efficient unaligned access, where the verifier lets a
# program load a word at any packet offset (elsewhere it refuses a misaligned load).
UNALIGNED_OK = frozenset({"x86_64", "aarch64", "ppc64le", "ppc64", "s390x"})


def node_defines(max_interfaces: int, machine: str | None = None) -> dict[str, int]:
    """The -D sizes of bpf/node_maps.h (Python owns map sizes), and SC_STRICT_ALIGN.

    ``machine`` (``platform.machine()`` when None) decides how bpf/node.c reads
    a frame's bytes 12..15: one word where unaligned loads are allowed, two
    aligned halves elsewhere.
    """
    defines = {"SC_NODE_MAX_IFACES": max_interfaces}
    if (machine or platform.machine()) not in UNALIGNED_OK:
        defines["SC_STRICT_ALIGN"] = 1
    return defines


def _build(
    program: Program,
    args: list[str],
    size: int,
    timeout: float,
    defines: dict[str, int] | None = None,
) -> Classifier:
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    with tempfile.TemporaryFile() as errfile:
        proc, ours = spawn.spawn(
            "sidecar.datapath.child.build",
            ["--program", program.name, *args],
            step="compile",
            stdout=errfile,
            stderr=errfile,
        )
        try:
            ours.settimeout(timeout)
            msg, fds, _, _ = socket.recv_fds(ours, _MSG_MAX, _MAX_FDS)
        except TimeoutError:
            proc.kill()
            proc.wait()
            raise DatapathError(
                "compile", f"the classifier build did not answer within {timeout:.0f} s"
            ) from None
        finally:
            ours.close()
        try:
            rc = proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        errfile.seek(0)
        stderr = errfile.read().decode(errors="replace")
    try:
        classifier = _accept(program, msg, fds, rc, stderr, size, defines or {})
    except BaseException:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    log.info(
        "%s classifier loaded in %.2f s: progs %s, %s",
        program.name,
        time.monotonic() - started,
        classifier.prog_ids,
        " ".join(args),
    )
    return classifier


def tail_lines(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _accept(
    program: Program,
    msg: bytes,
    fds: list[int],
    rc: int,
    stderr: str,
    size: int,
    defines: dict[str, int],
) -> Classifier:
    """Check the child's message and turn it into a Classifier (or raise)."""
    if not msg:
        detail = tail_lines(stderr) or "no output"
        raise DatapathError(
            "compile", f"the classifier build exited ({rc}) without answering:\n{detail}"
        )
    payload = json.loads(msg)
    if not payload.get("ok"):
        raise spawn.error_from_json(payload, "compile")
    progs = {hook: fds[i] for hook, i in payload["progs"].items()}
    maps = {name: fds[i] for name, i in payload["maps"].items()}
    if set(progs) != set(program.progs) or set(maps) != set(program.sizes):
        raise DatapathError(
            "compile",
            f"the build sent {sorted(progs)} / {sorted(maps)}, "
            f"expected {sorted(program.progs)} / {sorted(program.sizes)}",
        )
    _check_layout(program, maps, defines)
    return Classifier(
        progs=progs,
        maps=maps,
        flow_table_size=size,
        prog_tags=payload.get("prog_tags", {}),
        prog_ids=payload.get("prog_ids", {}),
    )


def flow_map_entries(flow_table_size: int) -> int:
    """Entries of each flow map for a policy's flow_table_size (in flows).

    Every flow takes two entries, its forward and its reverse key (maps.h), so
    the policy's number still means flows, as its documentation says.
    """
    return 2 * flow_table_size


@dataclass(frozen=True)
class Program:
    """One classifier source under bpf/: its entry points and its maps' layouts."""

    name: str  # --program of the build child
    source: str  # file name in source_dir()
    progs: dict[str, str]  # hook -> entry point
    # map name -> (key type or None for a u32 index, value type; a per-CPU value is one CPU's)
    sizes: dict[str, tuple[type | None, type]]
    # Maps the build child creates itself as single-value arrays the program reads in
    # place (bpf/node_maps.h), their fd passed as -D<NAME>_FD: map name -> the -D size
    # that counts the value types making up the one value, or None for exactly one.
    direct: dict[str, str | None] = field(default_factory=dict)

    def value_size(self, name: str, defines: dict[str, int]) -> int:
        """Bytes of one value of map ``name`` when built with ``defines``."""
        count = self.direct.get(name)
        return ctypes.sizeof(self.sizes[name][1]) * (defines[count] if count else 1)

    @staticmethod
    def fd_define(name: str) -> str:
        """The -D name that carries a direct map's fd into the C source."""
        return f"{name.upper()}_FD"


POD = Program(
    "pod",
    "classifier.c",
    abi.PROGS,
    {
        abi.MAPS.flows: (abi.FlowKey4, abi.FlowValue),
        abi.MAPS.flows6: (abi.FlowKey6, abi.FlowValue),
        abi.MAPS.colors: (None, abi.ColorEntry),
        abi.MAPS.config: (None, abi.Config),
        abi.MAPS.stats: (None, abi.Counter),
    },
)
NODE = Program(
    "node",
    "node.c",
    abi.NODE_PROGS,
    {
        abi.NODE_MAPS.colors: (None, abi.NodeTable),
        abi.NODE_MAPS.stats: (None, abi.NodeSlotCounters),
    },
    direct={abi.NODE_MAPS.colors: None},
)
PROGRAMS = {p.name: p for p in (POD, NODE)}


def _check_layout(program: Program, maps: dict[str, int], defines: dict[str, int]) -> None:
    """The kernel's view of each map must match abi.py, or we would write garbage."""
    for name, (key_t, _) in program.sizes.items():
        info = bpfsys.map_info(maps[name])
        want_key = ctypes.sizeof(key_t) if key_t is not None else 4
        want_value = program.value_size(name, defines)
        if (info.key_size, info.value_size) != (want_key, want_value):
            raise DatapathError(
                "compile",
                f"map {name} has key/value {info.key_size}/{info.value_size} bytes, abi.py "
                f"expects {want_key}/{want_value}: bpf/sc_abi.h and abi.py are out of sync",
            )
