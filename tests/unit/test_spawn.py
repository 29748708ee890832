"""The data path's error envelope: a child's DatapathError arrives in the parent unchanged."""

from __future__ import annotations

import json

import pytest

from sidecar.datapath import spawn
from sidecar.errors import DatapathError


@pytest.mark.parametrize(
    "exc",
    [
        DatapathError("attach", "interface 'x' not found", 19, "fix the policy"),
        DatapathError("compile", "BCC said:\nline 1\nline 2"),
        DatapathError("routes", "a (parenthesised) message (not a hint)", None, ""),
    ],
)
def test_round_trip_keeps_step_message_code_and_hint(exc):
    answer = json.loads(json.dumps(spawn.error_to_json(exc)))
    assert answer["ok"] is False
    back = spawn.error_from_json(answer, "other")
    assert (back.step, back.code, back.hint, str(back)) == (exc.step, exc.code, exc.hint, str(exc))


def test_an_answer_without_a_step_takes_the_callers():
    back = spawn.error_from_json({"ok": False}, "netlink")
    assert back.step == "netlink" and str(back) == "netlink: failed"


def test_a_child_that_cannot_start_is_a_datapath_error():
    with pytest.raises(DatapathError) as info:
        spawn.spawn("sidecar.datapath.child.ctl", [], step="netlink", stdout=-5)
    assert info.value.step == "netlink"
