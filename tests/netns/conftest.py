"""Fixtures shared by the data path tests: the router topology and managers closed after use."""

from __future__ import annotations

import pytest

from sidecar.datapath.manager import DatapathManager
from tests.netns.netnsutil import Lab, servers
from tests.netns.test_manager import PORT, SVC4, SVC6, Topo


@pytest.fixture(scope="module")
def topo():
    with Lab() as lab:
        t = Topo(lab)
        with servers(
            (t.stable, SVC4, PORT, "stable"),
            (t.canary, SVC4, PORT, "canary"),
            (t.stable, SVC6, PORT, "stable"),
            (t.canary, SVC6, PORT, "canary"),
        ):
            yield t


@pytest.fixture
def mgr_factory(topo):
    made: list[DatapathManager] = []

    def make(policy) -> DatapathManager:
        m = DatapathManager(policy)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()
    topo.assert_clean()
