"""Compile and load the classifier in a short-lived child; hand its fds to the parent.

Why a child (issue 5): BCC pulls LLVM/clang (hundreds of MB) into the process
that imports it, and the sidecar lives as long as its pod. So the parent runs
``python -m sidecar.datapath.build`` which imports ``bcc``, compiles
``bpf/classifier.c`` (a pod's) or ``bpf/node.c`` (the node agent's) with the
sizes Python owns (``-DSC_FLOW_MAP_SIZE``; ``-DSC_NODE_IFINDEX_SLOTS``,
``-DSC_NODE_MAX_IFACES``), loads its entry points as SCHED_CLS and sends the
program and map fds back over a Unix socket (SCM_RIGHTS) with a JSON message
naming each fd, then exits.
The kernel objects live on through the parent's copies of the fds. The parent
never imports ``bcc``; it uses ``bpfsys`` (libbpf over ctypes) on the fds.

When the child cannot build, it sends the error envelope of ``spawn`` with
what is missing and how to fix it, and exits non-zero; ``build_classifier``
raises that as ``DatapathError(step="compile")``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import importlib.resources
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.datapath import abi, bpfsys, spawn
from sidecar.errors import DatapathError

log = logging.getLogger(__name__)

_MAX_FDS = 16
_MSG_MAX = 1 << 16
_DIST_PACKAGES = "/usr/lib/python3/dist-packages"  # Debian's python3-bpfcc

# Linux capability bits (linux/capability.h).
_CAP_NET_ADMIN = 12
_CAP_SYS_ADMIN = 21
_CAP_BPF = 39

HINT_BCC = (
    "install Debian's python3-bpfcc (apt-get install python3-bpfcc libbpfcc); "
    "PyPI's package named 'bcc' is unrelated"
)
HINT_HEADERS = (
    "BCC compiles against kernel headers: install linux-headers-$(uname -r) "
    "(or run `make kernel-headers` to link Debian's linux-headers-amd64), or in a "
    "container mount /lib/modules and /usr/src from the node (read-only)"
)
HINT_PERM = (
    "loading tc programs needs CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN): "
    "add them to the container's securityContext.capabilities or run as root"
)


# ------------------------------------------------------------------ parent side


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


def build_node_classifier(
    ifindex_slots: int, max_interfaces: int, *, timeout: float = 60.0
) -> Classifier:
    """Compile and load the node classifier (bpf/node.c) in a child; as ``build_classifier``.

    ``ifindex_slots`` (a power of two) sizes the ifindex -> counter slot map,
    ``max_interfaces`` the counters (slot 0 counts interfaces without a slot).
    """
    args = ["--ifindex-slots", str(ifindex_slots), "--max-interfaces", str(max_interfaces)]
    return _build(NODE, args, 0, timeout)


def _build(program: Program, args: list[str], size: int, timeout: float) -> Classifier:
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    with tempfile.TemporaryFile() as errfile:
        proc, ours = spawn.spawn(
            "sidecar.datapath.build",
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
        classifier = _accept(program, msg, fds, rc, stderr, size)
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


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _accept(
    program: Program, msg: bytes, fds: list[int], rc: int, stderr: str, size: int
) -> Classifier:
    """Check the child's message and turn it into a Classifier (or raise)."""
    if not msg:
        detail = _tail(stderr) or "no output"
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
    _check_layout(program, maps)
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
        abi.NODE_MAPS.colors: (None, abi.NodeColorEntry),
        abi.NODE_MAPS.config: (None, abi.Config),
        abi.NODE_MAPS.ifaces: (None, abi.NodeIface),
        abi.NODE_MAPS.stats: (None, abi.Counter),
    },
)
PROGRAMS = {p.name: p for p in (POD, NODE)}


def _check_layout(program: Program, maps: dict[str, int]) -> None:
    """The kernel's view of each map must match abi.py, or we would write garbage."""
    for name, (key_t, value_t) in program.sizes.items():
        info = bpfsys.map_info(maps[name])
        want_key = ctypes.sizeof(key_t) if key_t is not None else 4
        want_value = ctypes.sizeof(value_t)
        if (info.key_size, info.value_size) != (want_key, want_value):
            raise DatapathError(
                "compile",
                f"map {name} has key/value {info.key_size}/{info.value_size} bytes, abi.py "
                f"expects {want_key}/{want_value}: bpf/sc_abi.h and abi.py are out of sync",
            )


# ------------------------------------------------------------------- child side


def _failure(error: str, hint: str = "", code: int | None = None, detail: str = ""):
    """A build failure as the parent will raise it: what failed, then the compiler's words."""
    return DatapathError("compile", f"{error}\n{detail}" if detail else error, code, hint)


def _capabilities() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def _headers_problem() -> str | None:
    """Why BCC will not find kernel headers, or None when they look present."""
    override = os.environ.get("BCC_KERNEL_SOURCE")
    if override:
        if not Path(override, "include").is_dir():
            return f"BCC_KERNEL_SOURCE={override} has no include/ directory"
        return None
    build = Path("/lib/modules", os.uname().release, "build")
    if Path(build, "include").is_dir() or Path("/sys/kernel/kheaders.tar.xz").exists():
        return None
    return f"kernel headers not found: {build} does not exist"


@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Collect what C libraries (clang, libbpf) print on fd 2, and still show it."""
    out: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            sys.stderr.write(text)
            out.append(text)


def _fdinfo(fd: int) -> dict[str, str]:
    info = {}
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    return info


def _import_bcc():
    try:
        import bcc
    except ImportError:
        # Debian's module imports from any CPython 3.11 once its directory is on the path.
        if _DIST_PACKAGES not in sys.path and os.path.isdir(_DIST_PACKAGES):
            sys.path.append(_DIST_PACKAGES)
        try:
            import bcc
        except ImportError as exc:
            raise _failure(f"the bcc Python module is not importable ({exc})", HINT_BCC) from None
    return bcc


def _compile(program: Program, defines: dict[str, int], what: str):
    """Return (BPF object, {hook: fn}, {map: table}) or raise DatapathError("compile").

    ``defines`` are the sizes Python owns (-D), ``what`` names them for people.
    """
    caps = _capabilities()
    if not (caps >> _CAP_SYS_ADMIN & 1 or (caps >> _CAP_BPF & 1 and caps >> _CAP_NET_ADMIN & 1)):
        raise _failure("missing capabilities to load BPF programs", HINT_PERM, errno.EPERM)
    problem = _headers_problem()
    if problem:
        raise _failure(problem, HINT_HEADERS, errno.ENOENT)
    bcc = _import_bcc()
    try:
        src = source_dir()
    except FileNotFoundError as exc:
        raise _failure(
            str(exc), "the package must ship bpf/*.c and *.h as sidecar.bpf (pyproject)"
        ) from None
    cflags = [f"-I{src}", *(f"-D{k}={v}" for k, v in sorted(defines.items()))]
    with _captured_stderr() as err:
        try:
            bpf = bcc.BPF(src_file=str(src / program.source).encode(), cflags=cflags)
            fns = {
                hook: bpf.load_func(name.encode(), bcc.BPF.SCHED_CLS)
                for hook, name in program.progs.items()
            }
            tables = {name: bpf.get_table(name) for name in program.sizes}
            failure = None
        except Exception as exc:  # BCC raises bare Exception for every failure
            failure = exc
    if failure is None:
        return bpf, fns, tables
    detail = _tail(err[0] if err else "", 20)
    if "Operation not permitted" in detail or "super-user" in str(failure):
        raise _failure(
            f"the kernel refused the classifier: {failure}", HINT_PERM, errno.EPERM, detail
        )
    if "file not found" in detail and ".h" in detail:
        raise _failure(f"a kernel header is missing: {failure}", HINT_HEADERS, errno.ENOENT, detail)
    hint = ""
    if "could not open bpf map" in detail:
        hint = (
            f"the kernel refused to create a map: check {what} "
            "and the memory available to the process"
        )
    raise _failure(
        f"BCC could not build {src}/{program.source} with {what}; it said:",
        hint,
        None,
        detail or str(failure),
    )


def _child(program: Program, defines: dict[str, int], what: str, sock_fd: int) -> int:
    sock = socket.socket(fileno=sock_fd)
    try:
        bpf, fns, tables = _compile(program, defines, what)
    except DatapathError as exc:
        sock.send(json.dumps(spawn.error_to_json(exc)).encode())
        return 1
    fds: list[int] = []
    payload: dict = {"ok": True, "progs": {}, "maps": {}, "prog_tags": {}, "prog_ids": {}}
    for hook, fn in fns.items():
        payload["progs"][hook] = len(fds)
        fds.append(fn.fd)
        info = _fdinfo(fn.fd)
        payload["prog_tags"][hook] = info.get("prog_tag", "")
        payload["prog_ids"][hook] = int(info.get("prog_id", "0"))
    for name, table in tables.items():
        payload["maps"][name] = len(fds)
        fds.append(table.map_fd)
    socket.send_fds(sock, [json.dumps(payload).encode()], fds)
    sock.close()
    del bpf  # BCC closes its fds at exit; the parent's copies keep the objects alive
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--program", choices=sorted(PROGRAMS), default="pod")
    parser.add_argument("--flow-table-size", type=int, help="pod: flows in the flow maps")
    parser.add_argument("--ifindex-slots", type=int, help="node: entries of sc_node_ifaces")
    parser.add_argument("--max-interfaces", type=int, help="node: counter slots")
    parser.add_argument(
        "--sock-fd", type=int, required=True, help="Unix SEQPACKET socket inherited from the parent"
    )
    args = parser.parse_args(argv)
    if args.program == "node":
        defines = {
            "SC_NODE_IFINDEX_SLOTS": args.ifindex_slots,
            "SC_NODE_MAX_IFACES": args.max_interfaces,
        }
        what = f"ifindex_slots={args.ifindex_slots}, max_interfaces={args.max_interfaces}"
    else:
        defines = {"SC_FLOW_MAP_SIZE": flow_map_entries(args.flow_table_size)}
        what = f"flow_table_size={args.flow_table_size}"
    return _child(PROGRAMS[args.program], defines, what, args.sock_fd)


if __name__ == "__main__":
    sys.exit(main())
