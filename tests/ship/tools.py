"""Find the shipping tools (helm, kubernetes-validate, check-jsonschema, hadolint).

They are installed by ``make tools``. Outside CI a missing tool skips its test
with the command to run; in CI (``CI=true``) the tools are installed once, and a
tool that is still missing fails the test, because a skip in CI is a failure.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import IN_CI

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
HELM_IN_TOOLS = REPO / ".venv" / "tools" / "node_modules" / ".bin" / "helm"


def _find(name: str) -> str | None:
    if name == "helm" and HELM_IN_TOOLS.exists():
        return str(HELM_IN_TOOLS)
    local = VENV_BIN / name
    if local.exists():
        return str(local)
    return shutil.which(name)


@cache
def _install_tools() -> None:
    subprocess.run(["make", "-s", "tools"], cwd=REPO, check=False, timeout=600)


def tool(name: str) -> str:
    """Absolute path of ``name``; skip (or, in CI, install then fail) when missing."""
    found = _find(name)
    if found is None and IN_CI:
        _install_tools()
        found = _find(name)
        if found is None:
            pytest.fail(f"{name} is missing after `make tools`")
    if found is None:
        pytest.skip(f"{name} not installed: run `make tools`")
    return found


def module(name: str) -> ModuleType:
    """Import a tool's Python module (``kubernetes_validate``); missing: as :func:`tool`."""
    try:
        return importlib.import_module(name)
    except ImportError:
        pass
    if IN_CI:
        _install_tools()
        importlib.invalidate_caches()
        try:
            return importlib.import_module(name)
        except ImportError:
            pytest.fail(f"Python module {name} is missing after `make tools`")
    pytest.skip(f"Python module {name} not installed: run `make tools`")
