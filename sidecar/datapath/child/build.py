"""The build child: BCC compiles and loads a classifier, sends its fds to the parent, exits.

``python -m sidecar.datapath.child.build`` is started by ``build_classifier``
(``sidecar.datapath.build``) through ``spawn``. It imports ``bcc`` (LLVM and
clang, hundreds of MB of RSS), compiles ``bpf/classifier.c`` (a pod's) or
``bpf/node.c`` (the node agent's) with the sizes Python owns
(``-DSC_FLOW_MAP_SIZE``; ``-DSC_NODE_MAX_IFACES``),
first creating the maps the program reads in place (``Program.direct``, passed
as ``-D<NAME>_FD``), loads its entry points as SCHED_CLS and sends the program and map fds back
over the inherited Unix socket (SCM_RIGHTS) with a JSON message naming each
fd. When it cannot, it sends the error envelope of ``spawn`` with what is
missing and how to fix it, and exits non-zero. BCC's memory dies with it.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from sidecar.datapath import bpfsys, spawn
from sidecar.datapath.build import (
    PROGRAMS,
    Program,
    flow_map_entries,
    node_defines,
    source_dir,
    tail_lines,
)
from sidecar.errors import DatapathError

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
HINT_SECCOMP = (
    "this process holds CAP_BPF, yet bpf() was refused under a seccomp filter: the "
    "container runtime's default profile allows bpf() only with CAP_SYS_ADMIN (profiles "
    "before CAP_BPF was known do); run on a runtime whose RuntimeDefault allows bpf() "
    "with CAP_BPF, give the container a seccomp profile that does, or add SYS_ADMIN"
)


def _failure(error: str, hint: str = "", code: int | None = None, detail: str = ""):
    """A build failure as the parent will raise it: what failed, then the compiler's words."""
    return DatapathError("compile", f"{error}\n{detail}" if detail else error, code, hint)


def _status(field: str) -> str:
    """A field of /proc/self/status (``CapEff``, ``Seccomp``), or "" when absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return line.split()[1]
    return ""


def _capabilities() -> int:
    return int(_status("CapEff") or "0", 16)


def refused_hint(caps: int, seccomp: str) -> str:
    """What to do when the kernel said EPERM to a process holding these capabilities. Pure.

    With CAP_BPF (not CAP_SYS_ADMIN) and a seccomp filter on, the filter is the
    likely refuser: container runtimes' default profiles allowed bpf() only with
    CAP_SYS_ADMIN before they knew CAP_BPF (containers-common 0.50, Debian 12's,
    still does).
    """
    if caps >> _CAP_BPF & 1 and not caps >> _CAP_SYS_ADMIN & 1 and seccomp == "2":
        return HINT_SECCOMP
    return HINT_PERM


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


def _direct_maps(program: Program, defines: dict[str, int], what: str) -> dict[str, int]:
    """Create the maps the program reads in place (``Program.direct``): name -> fd."""
    fds: dict[str, int] = {}
    for name in program.direct:
        try:
            fds[name] = bpfsys.single_value_map(name, program.value_size(name, defines))
        except OSError as exc:
            for fd in fds.values():
                os.close(fd)
            hint = f"check {what} and the memory available to the process"
            if exc.errno in (errno.EPERM, errno.EACCES):
                hint = refused_hint(_capabilities(), _status("Seccomp"))
            raise _failure(
                f"the kernel refused to create map {name}: {exc.strerror}", hint, exc.errno
            ) from None
    return fds


def _compile(program: Program, defines: dict[str, int], what: str):
    """Return (BPF object, {hook: fn}, {map: fd}) or raise DatapathError("compile").

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
    direct = _direct_maps(program, defines, what)
    defines = {**defines, **{program.fd_define(name): fd for name, fd in direct.items()}}
    cflags = [f"-I{src}", *(f"-D{k}={v}" for k, v in sorted(defines.items()))]
    with _captured_stderr() as err:
        try:
            bpf = bcc.BPF(src_file=str(src / program.source).encode(), cflags=cflags)
            fns = {
                hook: bpf.load_func(name.encode(), bcc.BPF.SCHED_CLS)
                for hook, name in program.progs.items()
            }
            maps = {
                name: direct[name] if name in direct else bpf.get_table(name).map_fd
                for name in program.sizes
            }
            failure = None
        except Exception as exc:  # BCC raises bare Exception for every failure
            failure = exc
    if failure is None:
        return bpf, fns, maps
    for fd in direct.values():
        os.close(fd)
    detail = tail_lines(err[0] if err else "", 20)
    if "Operation not permitted" in detail or "super-user" in str(failure):
        raise _failure(
            f"the kernel refused the classifier: {failure}",
            refused_hint(caps, _status("Seccomp")),
            errno.EPERM,
            detail,
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
        bpf, fns, maps = _compile(program, defines, what)
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
    for name, map_fd in maps.items():
        payload["maps"][name] = len(fds)
        fds.append(map_fd)
    socket.send_fds(sock, [json.dumps(payload).encode()], fds)
    sock.close()
    del bpf  # BCC closes its fds at exit; the parent's copies keep the objects alive
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--program", choices=sorted(PROGRAMS), default="pod")
    parser.add_argument("--flow-table-size", type=int, help="pod: flows in the flow maps")
    parser.add_argument("--max-interfaces", type=int, help="node: counter slots")
    parser.add_argument(
        "--sock-fd", type=int, required=True, help="Unix SEQPACKET socket inherited from the parent"
    )
    args = parser.parse_args(argv)
    if args.program == "node":
        defines = node_defines(args.max_interfaces)
        what = f"max_interfaces={args.max_interfaces}"
    else:
        defines = {"SC_FLOW_MAP_SIZE": flow_map_entries(args.flow_table_size)}
        what = f"flow_table_size={args.flow_table_size}"
    return _child(PROGRAMS[args.program], defines, what, args.sock_fd)


if __name__ == "__main__":
    sys.exit(main())
