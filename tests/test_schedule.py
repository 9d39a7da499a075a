"""Tests of ``acco.schedule``: the pure state machine that decides, at each step() call,
whether to launch a round, of which kind, and with how many micro-batches.

A wrong kind or count here silently changes the update rule of docs/design.md §1 (an estimate
that commits, a commit without its estimate's gradients, micro-batches counted twice or
lost), so the schedule is compared with an independent tiny model written below, on
random event sequences driven the way the optimizer facade drives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from acco.schedule import Launch, Mode, RoundKind, Schedule, round_kind

E, C = RoundKind.ESTIMATE, RoundKind.COMMIT
MODES = [Mode.ACCO, Mode.DPU, Mode.SYNC]

# ---------------------------------------------------------------------------------------
# an independent model of the expected behaviour
# ---------------------------------------------------------------------------------------


@dataclass
class Model:
    """What the schedule should do, written from docs/design.md §1 without using its code.

    * acco: rounds alternate estimate, commit, estimate, ... starting with an estimate;
      a commit also uses the gradients of the estimate before it.
    * dpu / sync: every round commits; sync waits for its round at once.
    * blocking: every step() call launches (after waiting for the round in flight);
      non-blocking: keep accumulating while the round in flight is not done.
    """

    mode: str
    blocking: bool
    calls: int = 0
    pending: int = 0
    kinds: list = field(default_factory=list)
    in_flight: bool = False

    def _next_kind(self) -> RoundKind:
        if self.mode == "acco":
            return E if len(self.kinds) % 2 == 0 else C
        return C

    def launch(self, contributes: bool = True) -> tuple:
        kind = self._next_kind()
        adds = kind == C and bool(self.kinds) and self.kinds[-1] == E
        count = self.pending if contributes else 0
        if contributes:
            self.pending = 0
        self.kinds.append(kind)
        self.in_flight = self.mode != "sync"
        return (len(self.kinds) - 1, kind, count, adds)

    def step(self, round_done: bool):
        """Returns the launch tuple, or None when the call only accumulates."""
        self.calls += 1
        self.pending += 1
        if not self.blocking and self.in_flight and not round_done:
            return None
        self.in_flight = False
        return self.launch()

    def install(self) -> None:
        self.in_flight = False


def facade_step(schedule: Schedule, round_done: bool) -> Launch | None:
    """One step() call, following the protocol of the optimizer facade."""
    schedule.record_call()
    if not schedule.should_launch(round_done):
        return None
    if schedule.in_flight:
        schedule.installed()
    launch = schedule.launch()
    if schedule.waits_after_launch:
        schedule.installed()
    return launch


def as_tuple(launch: Launch) -> tuple:
    return (launch.index, launch.kind, launch.local_count, launch.adds_estimate_gradients)


# events: ("step", round_done), ("install",) or ("drain",) -- a launch with no gradients
event_strategy = st.one_of(
    st.tuples(st.just("step"), st.booleans()),
    st.tuples(st.just("step"), st.booleans()),  # steps twice as likely
    st.tuples(st.just("install")),
    st.tuples(st.just("drain")),
)
scenario_strategy = st.tuples(
    st.sampled_from(MODES), st.booleans(), st.lists(event_strategy, min_size=0, max_size=40)
)


def run_scenario(mode, blocking, events):
    """Drive a Schedule and the Model side by side; check invariants after every event.

    Returns the schedule, the list of launches and, per step() call, whether it launched.
    """
    schedule = Schedule(mode, blocking=blocking)
    model = Model(Mode(mode).value, blocking)
    launches: list[Launch] = []
    step_launched: list[tuple[bool, bool, bool]] = []  # (round_done, in flight before, launched)

    for event in events:
        if event[0] == "step":
            round_done = event[1]
            before = schedule.in_flight
            launch = facade_step(schedule, round_done)
            expected = model.step(round_done)
            step_launched.append((round_done, before, launch is not None))
            if expected is None:
                assert launch is None
            else:
                assert launch is not None and as_tuple(launch) == expected
                launches.append(launch)
        elif event[0] == "install":
            if schedule.in_flight:
                schedule.installed()
                model.install()
        elif event[0] == "drain":
            if schedule.in_flight:
                schedule.installed()
                model.install()
            pending = schedule.pending_calls
            launch = schedule.launch(contributes=False)
            assert as_tuple(launch) == model.launch(contributes=False)
            assert launch.local_count == 0
            assert schedule.pending_calls == pending
            if schedule.waits_after_launch:
                schedule.installed()
                model.install()
            launches.append(launch)

        # invariants that hold after every event
        assert schedule.in_flight == model.in_flight
        assert schedule.rounds_launched - schedule.rounds_installed in (0, 1)
        assert schedule.rounds_launched == len(launches)
        assert schedule.pending_calls == model.pending
        assert sum(l.local_count for l in launches) + schedule.pending_calls == model.calls
        last = launches[-1].kind if launches else None
        assert schedule.last_launched_kind == last
        assert schedule.has_uncommitted_estimate == (last is E)
        if Mode(mode) is Mode.SYNC:
            assert not schedule.in_flight
    return schedule, launches, step_launched


# ---------------------------------------------------------------------------------------
# properties on random event sequences
# ---------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(scenario_strategy)
def test_schedule_matches_model(scenario):
    """Same launches (index, kind, count, estimate reuse) as the model; invariants hold
    throughout: one round in flight at most, counts conserved, sync never in flight."""
    run_scenario(*scenario)


@settings(max_examples=200, deadline=None)
@given(scenario_strategy)
def test_round_kinds_per_mode(scenario):
    """acco alternates E, C from E and only commits reuse the estimate's gradients;
    dpu / sync only commit and never reuse anything."""
    mode, blocking, events = scenario
    _, launches, _ = run_scenario(mode, blocking, events)
    assert [l.index for l in launches] == list(range(len(launches)))
    if mode is Mode.ACCO:
        assert [l.kind for l in launches] == [E, C] * (len(launches) // 2) + [E] * (len(launches) % 2)
        for prev, cur in zip([None] + launches, launches):
            follows_estimate = cur.kind is C and prev is not None and prev.kind is E
            assert cur.adds_estimate_gradients == follows_estimate
    else:
        assert all(l.kind is C and not l.adds_estimate_gradients for l in launches)


@settings(max_examples=200, deadline=None)
@given(scenario_strategy)
def test_when_step_launches(scenario):
    """Blocking: every step() launches. Non-blocking: a step() with the round in flight
    not yet done only accumulates; otherwise it launches."""
    mode, blocking, events = scenario
    _, _, steps = run_scenario(mode, blocking, events)
    for round_done, in_flight_before, launched in steps:
        if blocking:
            assert launched
        else:
            assert launched == (round_done or not in_flight_before)


@settings(max_examples=200, deadline=None)
@given(scenario_strategy)
def test_protocol_errors_leave_state_unchanged(scenario):
    """launch() while in flight and installed() with nothing in flight are protocol
    errors: they raise RuntimeError and change nothing."""
    mode, blocking, events = scenario
    schedule, _, _ = run_scenario(mode, blocking, events)
    snapshot = vars(schedule).copy()
    if schedule.in_flight:
        with pytest.raises(RuntimeError):
            schedule.launch()
        with pytest.raises(RuntimeError):
            schedule.launch(contributes=False)
        assert vars(schedule) == snapshot
        schedule.installed()
    with pytest.raises(RuntimeError):
        schedule.installed()
    assert not schedule.in_flight


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(MODES), st.booleans(), st.integers(min_value=0, max_value=6))
def test_launch_without_contribution_keeps_pending_calls(mode, blocking, calls):
    schedule = Schedule(mode, blocking=blocking)
    for _ in range(calls):
        schedule.record_call()
    launch = schedule.launch(contributes=False)
    assert launch.local_count == 0
    assert schedule.pending_calls == calls
    schedule.installed()
    launch = schedule.launch()
    assert launch.local_count == calls
    assert schedule.pending_calls == 0


# ---------------------------------------------------------------------------------------
# explicit examples
# ---------------------------------------------------------------------------------------


def test_blocking_acco_five_calls():
    schedule = Schedule("acco", blocking=True)
    launches = [facade_step(schedule, round_done=False) for _ in range(5)]
    assert [l.kind for l in launches] == [E, C, E, C, E]
    assert [l.index for l in launches] == [0, 1, 2, 3, 4]
    assert [l.local_count for l in launches] == [1, 1, 1, 1, 1]
    assert [l.adds_estimate_gradients for l in launches] == [False, True, False, True, False]
    assert schedule.in_flight
    assert schedule.has_uncommitted_estimate
    assert schedule.pending_calls == 0


def test_non_blocking_acco_accumulates_while_in_flight():
    schedule = Schedule("acco", blocking=False)
    first = facade_step(schedule, round_done=False)  # nothing in flight: launches
    assert (first.kind, first.local_count) == (E, 1)
    assert facade_step(schedule, round_done=False) is None
    assert facade_step(schedule, round_done=False) is None
    second = facade_step(schedule, round_done=True)  # estimate done: commit the 3 calls
    assert (second.kind, second.local_count, second.adds_estimate_gradients) == (C, 3, True)
    assert not schedule.has_uncommitted_estimate


def test_sync_and_dpu_sequences():
    sync = Schedule("sync", blocking=False)
    for i in range(3):
        launch = facade_step(sync, round_done=False)
        assert (launch.index, launch.kind, launch.local_count) == (i, C, 1)
        assert not sync.in_flight
    dpu = Schedule("dpu")
    launches = [facade_step(dpu, round_done=False) for _ in range(3)]
    assert [(l.kind, l.local_count, l.adds_estimate_gradients) for l in launches] == [(C, 1, False)] * 3
    assert dpu.in_flight and not dpu.has_uncommitted_estimate


def test_fresh_schedule():
    schedule = Schedule(Mode.ACCO)
    assert not schedule.in_flight
    assert schedule.last_launched_kind is None
    assert not schedule.has_uncommitted_estimate
    assert schedule.next_kind is E
    assert schedule.pending_calls == 0
    with pytest.raises(RuntimeError):
        schedule.installed()


@pytest.mark.parametrize("mode", MODES)
def test_round_kind(mode):
    for index in range(8):
        expected = E if mode is Mode.ACCO and index % 2 == 0 else C
        assert round_kind(mode, index) is expected
        assert round_kind(mode.value, index) is expected  # string modes accepted
    with pytest.raises(ValueError):
        round_kind(mode, -1)


def test_round_kind_unknown_mode():
    with pytest.raises(ValueError):
        round_kind("zero3", 0)
    with pytest.raises(ValueError):
        Schedule("zero3")


def test_string_values():
    assert [m.value for m in Mode] == ["acco", "dpu", "sync"]
    assert Mode("acco") is Mode.ACCO and Mode.DPU == "dpu" and Mode.SYNC == "sync"
    assert RoundKind.ESTIMATE == "estimate" and RoundKind.COMMIT == "commit"
    assert RoundKind("commit") is RoundKind.COMMIT
    assert Schedule("sync").mode is Mode.SYNC and Schedule("sync").waits_after_launch
    assert not Schedule("acco").waits_after_launch and not Schedule("dpu").waits_after_launch
