"""Shared test fixtures.

Kernel tiers (network namespaces, tc, BPF) need root. On a laptop they skip with
the reason; under CI (``CI=true``, root) a missing capability is a failure, never a
silent skip.
"""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_root(reason: str = "needs root (network namespaces, tc, BPF)") -> None:
    """Skip outside CI, fail inside CI, when not running as root."""
    if os.geteuid() == 0:
        return
    if IN_CI:
        pytest.fail(f"CI must run kernel tests as root: {reason}")
    pytest.skip(reason)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``root`` check for root before they run."""
    for item in items:
        if item.get_closest_marker("root") is not None:
            item.add_marker(pytest.mark.usefixtures("_root_required"))


@pytest.fixture
def _root_required() -> None:
    require_root()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI a skipped test is a failure: say so and fail the session."""
    if not IN_CI:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped:
        reporter.write_line(f"CI: {len(skipped)} test(s) skipped; skips are failures in CI")
        if exitstatus == 0:
            session.exitstatus = 1
