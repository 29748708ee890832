"""The data path's process boundary holds: long-lived processes never load what children run.

A pod's sidecar (``sidecar.runtime``) and the node agent (``sidecar.node``)
live as long as their pod or node; BCC, pyroute2 and libnftables belong to
the short-lived children in ``sidecar.datapath.child``. Two views of the same
rule: what a fresh interpreter has loaded after importing every long-lived
module, and every import statement (lazy ones inside functions included)
reachable from the long-lived entry points. Plus: no import cycle in the data
path, and none at run time anywhere in ``sidecar``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "sidecar"
CHILD = "sidecar.datapath.child"
HEAVY = ("bcc", "pyroute2", "nftables")

# What the long-lived processes run: the sidecar and the node agent, and the
# parent side of every child they start.
ENTRY_POINTS = ("sidecar.runtime", "sidecar.node")
# Short-lived commands that may read netlink in-process with the children's code.
SHORT_LIVED = ("sidecar.datapath.doctor", "sidecar.preflight")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def imports_of(name: str, typing: bool = True) -> set[str]:
    """Every module ``name`` imports, at the top or inside a function (sidecar's or not);
    ``typing=False`` leaves out what it imports only for annotations (``TYPE_CHECKING``)."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    skipped: set[int] = set()
    if not typing:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.add(base)
            # ``from sidecar.datapath import tc``: tc may be a module of its own.
            out.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
    return {m for m in out if m}


def graph(typing: bool = True) -> dict[str, set[str]]:
    """sidecar module -> the sidecar modules it imports (a package's __init__ included)."""
    out: dict[str, set[str]] = {}
    for name in MODULES:
        deps = set()
        for m in imports_of(name, typing):
            if m in MODULES and m != name:
                deps.add(m)
        out[name] = deps
    return out


def reachable(starts: tuple[str, ...], edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), list(starts)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(edges.get(m, ()))
    return seen


def long_lived_modules() -> list[str]:
    """Every sidecar module but the children's, the short-lived commands' and the CLI's."""
    return sorted(
        m
        for m in MODULES
        if not m.startswith(CHILD)
        and m not in SHORT_LIVED
        and m not in ("sidecar.cli", "sidecar.__main__")
        and not m.startswith(("sidecar.demo", "sidecar.inject", "sidecar.analyze"))
    )


def test_no_long_lived_import_reaches_a_child_module_or_a_heavy_library() -> None:
    edges = graph()
    live = reachable(ENTRY_POINTS, edges)
    assert "sidecar.datapath.manager" in live and "sidecar.datapath.node" in live
    assert "sidecar.datapath.links" in live, "the node agent's link watcher is long-lived"
    leaks = {
        (m, dep)
        for m in live
        for dep in imports_of(m)
        if dep.startswith(CHILD) or dep.split(".")[0] in HEAVY or dep in SHORT_LIVED
    }
    assert leaks == set(), f"a long-lived module imports child-only code: {sorted(leaks)}"


def test_every_datapath_module_outside_child_stays_clear_of_child_code() -> None:
    """Only children and short-lived commands import ``sidecar.datapath.child``."""
    importers = {
        m
        for m in MODULES
        if not m.startswith(CHILD)
        and any(d.startswith(CHILD) or d.split(".")[0] in HEAVY for d in imports_of(m))
    }
    assert importers <= set(SHORT_LIVED), sorted(importers - set(SHORT_LIVED))


def test_child_modules_run_the_heavy_libraries_themselves() -> None:
    """Each child that needs a library imports it; the boundary test above would see a leak."""
    heavy_of = {
        m: {d.split(".")[0] for d in imports_of(m)} & set(HEAVY)
        for m in MODULES
        if m.startswith(CHILD + ".")
    }
    assert heavy_of[f"{CHILD}.build"] == {"bcc"}
    assert heavy_of[f"{CHILD}.nft"] == {"nftables"}
    for m in ("links", "netlink", "tc", "routing"):
        assert heavy_of[f"{CHILD}.{m}"] == {"pyroute2"}, m
    # The netlink helper reaches pyroute2 through the modules it serves with.
    assert reachable((f"{CHILD}.ctl",), graph()) >= {f"{CHILD}.tc", f"{CHILD}.routing"}


def test_a_fresh_interpreter_importing_every_long_lived_module_loads_none_of_it() -> None:
    names = long_lived_modules()
    assert "sidecar.proxy.server" in names and "sidecar.datapath.bpfsys" in names
    code = (
        "import importlib, json, sys\n"
        f"for m in {names!r}:\n"
        "    importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout)
    assert "sidecar.datapath.manager" in loaded and "sidecar.node" in loaded
    bad = [m for m in loaded if m.startswith(CHILD) or m.split(".")[0] in HEAVY]
    assert bad == []


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles among sidecar modules (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def without_packages(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """Drop edges to a package's ``__init__`` that only serve to reach its submodules."""
    return {m: {d for d in deps if MODULES[d].name != "__init__.py"} for m, deps in edges.items()}


def test_the_datapath_has_no_import_cycle() -> None:
    edges = without_packages(graph())
    datapath = {m: {d for d in e if d.startswith("sidecar.datapath")} for m, e in edges.items()}
    datapath = {m: e for m, e in datapath.items() if m.startswith("sidecar.datapath")}
    assert cycles(datapath) == []


def test_no_module_imports_one_that_imports_it_back() -> None:
    """Anywhere in ``sidecar``, at run time (lazy imports included). Imports made only for
    annotations may point back: the proxy's connection kinds and their pools name each
    other's types, and nothing is loaded for that."""
    assert cycles(without_packages(graph(typing=False))) == []
