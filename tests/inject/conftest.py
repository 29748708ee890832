"""Fixtures of the injection tests that run what injection writes."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def volume() -> Iterator[Path]:
    """The ConfigMap volume: a directory any uid can read, as the kubelet mounts it."""
    path = Path(tempfile.mkdtemp(prefix="tc16k-policy-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
