"""The lifecycle table and the owner's one way of changing a state."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from fakes.fleet import make_router
from modelfleet.errors import IllegalTransition
from modelfleet.lifecycle import BUSY, TRANSITIONS, UP, State, allowed


def test_every_state_has_a_row_and_every_target_is_a_state() -> None:
    assert set(TRANSITIONS) == set(State)
    for targets in TRANSITIONS.values():
        assert targets <= set(State)


def test_any_state_can_fail_and_failed_leaves_only_by_a_start_or_a_stop() -> None:
    for state in State:
        if state is not State.FAILED:
            assert allowed(state, State.FAILED)
    assert TRANSITIONS[State.FAILED] == {State.STOPPED, State.STARTING}


def test_up_and_busy_do_not_overlap() -> None:
    assert not UP & BUSY
    assert State.READY in UP and State.EJECTED in UP


def test_every_listed_move_is_taken_and_every_other_is_refused(tmp_path: Path) -> None:
    router, _, _ = make_router(tmp_path)
    inst = router.fleet.instances["server_9003"]
    for old, new in itertools.product(State, State):
        inst.state = old  # set up the case directly; the move under test goes through the owner
        if old is new or allowed(old, new):
            router.fleet.move(inst, new)
            assert inst.state is new
        else:
            with pytest.raises(IllegalTransition, match=f"{old} -> {new}"):
                router.fleet.move(inst, new)
            assert inst.state is old


def test_a_move_checks_the_state_the_caller_expects(tmp_path: Path) -> None:
    router, _, clock = make_router(tmp_path)
    inst = router.fleet.instances["server_9003"]
    router.fleet.move(inst, State.STARTING, "because")
    clock.advance(5)
    with pytest.raises(IllegalTransition, match="expected ready"):
        router.fleet.move(inst, State.DRAINING, expect={State.READY})
    router.fleet.move(inst, State.READY, expect={State.STARTING})
    assert (inst.state, inst.since) == (State.READY, clock())


def test_listeners_hear_each_change_once(tmp_path: Path) -> None:
    router, _, _ = make_router(tmp_path)
    heard: list[tuple[str, State, State]] = []
    router.fleet.listeners.append(lambda i, old, new: heard.append((i.name, old, new)))
    inst = router.fleet.instances["server_9005"]
    router.fleet.move(inst, State.STARTING)
    router.fleet.move(inst, State.STARTING, "still")
    router.fleet.move(inst, State.READY)
    assert heard == [("cold", State.STOPPED, State.STARTING), ("cold", State.STARTING, State.READY)]
