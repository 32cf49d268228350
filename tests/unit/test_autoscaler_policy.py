"""The autoscaling decision (autoscaler/policy.py, window.py) with a fake clock: every
`now` is explicit, nothing sleeps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from fabric_operator.api.v1alpha1 import Autoscaling, AutoscalingStatus, ScalingReason
from fabric_operator.autoscaler.policy import (
    PANIC_WINDOW,
    STABLE_WINDOW,
    Decision,
    Policy,
    State,
    autoscaling_status,
    decide,
    format_time,
    parse_time,
    replicas_for,
)
from fabric_operator.autoscaler.window import Window

T0 = 1_700_000_000.0  # wall-clock seconds, as the caller passes them
TARGET = 4
POLICY = Policy(max_replicas=20, min_replicas=1, target=TARGET, scale_down_delay=300)


def constant(value: int) -> Callable[[float], int]:
    return lambda _t: value


def step(before: int, after: int, at: float) -> Callable[[float], int]:
    return lambda t: after if t >= at else before


@dataclass
class Run:
    """A backend whose replicas follow the decisions at once (and are ready at once,
    unless `ready` says otherwise), one reading per tick."""

    policy: Policy
    state: State
    current: int
    trace: list[tuple[float, Decision]]

    def until(
        self,
        end: float,
        demand: Callable[[float], int],
        *,
        start: float | None = None,
        tick: float = 1.0,
        held: int = 0,
        ready: int | None = None,
    ) -> Decision:
        t = self.trace[-1][0] + tick if start is None else start
        decision = None
        while t <= end + 1e-9:
            self.state.observe(t, demand(t))
            decision = decide(
                self.policy,
                self.state,
                t,
                current_replicas=self.current,
                ready_replicas=self.current if ready is None else ready,
                held=held,
            )
            self.trace.append((t, decision))
            self.current = decision.desired
            t += tick
        assert decision is not None
        return decision

    def desired(self, since: float, until: float) -> set[int]:
        return {d.desired for t, d in self.trace if since <= t <= until}

    def first_time(self, desired: int, since: float = 0.0) -> float:
        return next(t for t, d in self.trace if t >= since and d.desired == desired)


def run(policy: Policy = POLICY, current: int = 1, state: State | None = None) -> Run:
    return Run(policy, state or State(), current, [])


def idle_then(r: Run, seconds: float) -> float:
    """Observe `seconds` of no demand from T0 (past the fresh state's first window);
    returns the time of the last reading."""
    r.until(T0 + seconds, constant(0), start=T0)
    return T0 + seconds


# --- the window --------------------------------------------------------------------------


def test_window_averages_only_what_it_saw() -> None:
    window = Window(STABLE_WINDOW)
    assert window.average(T0, STABLE_WINDOW) == 0.0
    window.add(T0, 24)
    assert window.average(T0, STABLE_WINDOW) == 24  # no time passed: the reading itself
    window.add(T0 + 1, 24)
    # One second observed, not 1/60 of 24: the 59 s before the first reading are unknown.
    assert window.average(T0 + 1, STABLE_WINDOW) == 24
    assert window.average(T0 + 1, PANIC_WINDOW) == 24


def test_window_weights_readings_by_time() -> None:
    window = Window(STABLE_WINDOW)
    for t, value in [(0, 0), (1, 10), (4, 2), (5, 2)]:
        window.add(T0 + t, value)
    # (0,1]: 10, (1,4]: 2, (4,5]: 2, and the newest holds to now (5,6]: 2.
    assert window.average(T0 + 6, STABLE_WINDOW) == pytest.approx((10 + 2 * 3 + 2 + 2) / 6)
    # The panic window's 6 s start before the first reading: still only what was seen.
    assert window.average(T0 + 6, PANIC_WINDOW) == pytest.approx(20 / 6)
    assert window.average(T0 + 10, 4) == 2  # the newest reading holds through a gap


def test_window_forgets_readings_older_than_its_length() -> None:
    window = Window(STABLE_WINDOW)
    for t in range(600):
        window.add(T0 + t, 100 if t < 300 else 1)
    assert len(window) <= STABLE_WINDOW + 2
    assert window.average(T0 + 599, STABLE_WINDOW) == 1
    window.add(T0 + 10, 1000)  # older than the newest: a reading never goes back in time
    assert window.latest == 1


def test_replicas_for_is_ceil_with_float_noise_tolerated() -> None:
    assert [replicas_for(d, 4) for d in (0, 0.01, 4, 4.01, 16, 16.000000000001)] == [
        0,
        1,
        1,
        2,
        4,
        4,
    ]
    assert replicas_for(15.9999999999, 4) == 4


# --- scaling up ----------------------------------------------------------------------------


def test_a_step_to_six_times_the_target_reaches_six_replicas_within_the_panic_window() -> None:
    r = run()
    last_idle = idle_then(r, 120)
    step_at = last_idle + 1
    r.until(step_at + 30, step(0, 6 * TARGET, step_at))
    reached = r.first_time(6, since=step_at)
    assert reached - step_at <= PANIC_WINDOW
    assert any(d.panic for t, d in r.trace if t >= step_at)
    assert r.desired(reached, step_at + 30) == {6}
    ups = [d for t, d in r.trace if t >= step_at and d.scale_event]
    assert ups and all(d.reason == ScalingReason.SCALING_UP for d in ups)
    assert ups[-1].message == "24 requests in flight, target 4/replica"


def test_a_fresh_autoscaler_sees_a_step_at_once() -> None:
    r = run()
    decision = r.until(T0, constant(6 * TARGET), start=T0)
    assert (decision.desired, decision.reason, decision.scale_event) == (
        6,
        ScalingReason.SCALING_UP,
        True,
    )


def test_short_spikes_below_twice_the_target_do_not_panic() -> None:
    r = run(current=2)
    r.until(T0 + 120, constant(6), start=T0)  # 1.5 per replica: 2 replicas
    spike = T0 + 121
    r.until(spike + 60, lambda t: 10 if spike <= t < spike + 3 else 6)
    assert not any(d.panic for _, d in r.trace)
    assert r.desired(T0 + 10, spike + 60) == {2}


def test_a_spike_over_twice_the_replicas_panics_and_follows_it() -> None:
    r = run(current=2)
    r.until(T0 + 120, constant(6), start=T0)
    spike = T0 + 121
    decision = r.until(spike + 5, lambda t: 60 if t >= spike else 6)
    assert decision.panic
    assert decision.desired >= 4


# --- scaling down --------------------------------------------------------------------------


def test_scale_down_waits_for_the_delay() -> None:
    r = run()
    r.until(T0 + 120, constant(6 * TARGET), start=T0)
    assert r.current == 6
    drop = T0 + 121
    r.until(drop + 900, lambda t: TARGET if t >= drop else 6 * TARGET)
    assert r.desired(drop, drop + POLICY.scale_down_delay - 1) == {6}
    assert r.current == 1
    down = [(t, d) for t, d in r.trace if t >= drop and d.scale_event]
    assert down and all(d.reason == ScalingReason.SCALING_DOWN for _, d in down)
    assert down[-1][1].message == "4 requests in flight, target 4/replica"
    # Down only, never back up: no flapping on the way.
    after = [d.desired for t, d in r.trace if t >= drop]
    assert after == sorted(after, reverse=True)


def test_a_dip_shorter_than_the_delay_keeps_the_replicas() -> None:
    r = run()
    r.until(T0 + 400, constant(3 * TARGET), start=T0)
    dip = T0 + 401
    r.until(dip + 600, lambda t: TARGET if dip <= t < dip + 200 else 3 * TARGET)
    assert r.desired(T0 + 100, dip + 600) == {3}


def test_scale_down_steps_through_what_was_asked_for_during_the_delay() -> None:
    policy = Policy(max_replicas=20, min_replicas=1, target=TARGET, scale_down_delay=100)
    r = run(policy)
    r.until(T0 + 200, constant(8 * TARGET), start=T0)
    mid = T0 + 201
    low = mid + 150
    r.until(low + 400, lambda t: TARGET if t >= low else (4 * TARGET if t >= mid else 32))
    # Each count goes 100 s after it was last asked for: 8 just after `mid`, then the
    # stable average's way down to 4 (asked for until `low`), then to 1.
    events = [(t, d.desired) for t, d in r.trace if t >= mid and d.scale_event]
    assert [k for _, k in events] == [7, 6, 5, 4, 3, 2, 1]
    assert events[0][0] - mid >= policy.scale_down_delay
    assert min(r.desired(mid, low + policy.scale_down_delay - 1)) == 4
    assert events[-1][0] - low >= policy.scale_down_delay


def test_scale_to_zero_after_the_delay_without_requests() -> None:
    policy = Policy(max_replicas=4, min_replicas=0, target=TARGET, scale_down_delay=300)
    r = run(policy)
    r.until(T0 + 100, constant(2), start=T0)
    stop = T0 + 101
    r.until(stop + 400, lambda t: 0 if t >= stop else 2)
    assert r.desired(T0, stop + 299) == {1}
    zero = r.first_time(0)
    assert zero == stop + 300
    events = [d for t, d in r.trace if t >= stop and d.scale_event]
    assert len(events) == 1
    assert (events[0].reason, events[0].message) == (
        ScalingReason.SCALED_TO_ZERO,
        "no requests for 300s",
    )
    # Staying at zero: the same reason, no more events.
    assert {(d.reason, d.scale_event) for t, d in r.trace if t > zero} == {
        (ScalingReason.SCALED_TO_ZERO, False)
    }


def test_never_to_zero_with_min_replicas_one() -> None:
    r = run()
    r.until(T0 + 100, constant(2), start=T0)
    stop = T0 + 101
    decision = r.until(stop + 3600, lambda t: 0 if t >= stop else 2, tick=5)
    assert r.desired(T0, stop + 3600) == {1}
    assert decision.reason == ScalingReason.STABLE
    assert decision.message == "no requests in flight, target 4/replica, minimum 1"


def test_a_backend_that_never_had_a_request_goes_to_zero_after_the_delay() -> None:
    policy = Policy(max_replicas=4, min_replicas=0, target=TARGET, scale_down_delay=300)
    r = run(policy)
    r.until(T0 + 400, constant(0), start=T0)
    assert r.first_time(0) == T0 + 300


# --- scaling from zero ---------------------------------------------------------------------


def test_held_requests_at_zero_ask_for_a_replica_at_once() -> None:
    policy = Policy(max_replicas=4, min_replicas=0, target=TARGET, scale_down_delay=300)
    r = run(policy)
    r.until(T0 + 400, constant(0), start=T0)
    assert r.current == 0
    arrival = T0 + 400.5
    decision = r.until(arrival, constant(1), start=arrival, held=1)
    assert (decision.desired, decision.reason, decision.scale_event) == (
        1,
        ScalingReason.SCALING_UP,
        True,
    )
    assert decision.message == "1 request held, scaling from zero"
    # The pod is starting: the request waits, and the status says so.
    decision = r.until(arrival + 30, constant(1), held=1, ready=0)
    assert (decision.desired, decision.reason, decision.scale_event) == (
        1,
        ScalingReason.HOLDING,
        False,
    )
    assert decision.message == "1 request held until a pod is ready"


def test_held_requests_scale_from_zero_even_for_a_fresh_autoscaler() -> None:
    policy = Policy(max_replicas=4, min_replicas=0, target=TARGET, scale_down_delay=300)
    r = run(policy, current=0, state=State.from_status({"desiredReplicas": 0}))
    decision = r.until(T0, constant(3), start=T0, held=3)
    assert (decision.desired, decision.scale_event) == (1, True)


def test_a_starting_pod_with_held_requests_is_not_scaled_away() -> None:
    """KServe #1247: a pod pending on a slow GPU node was deleted by scale-to-zero."""
    policy = Policy(max_replicas=4, min_replicas=0, target=TARGET, scale_down_delay=0)
    r = run(policy, current=3)
    r.until(T0 + 120, constant(0), start=T0)  # long enough for the fresh window to pass
    r.current = 3
    decision = r.until(T0 + 600, constant(2), start=T0 + 121, held=2, ready=1)
    assert r.desired(T0 + 121, T0 + 600) == {3}
    assert decision.reason == ScalingReason.STABLE
    # Once the pods are ready, the same demand is served by one replica.
    decision = r.until(T0 + 610, constant(2), held=0)
    assert decision.desired == 1


def test_a_pending_pod_outlives_the_delay_while_a_request_waits() -> None:
    policy = Policy(max_replicas=4, min_replicas=0, target=TARGET, scale_down_delay=30)
    r = run(policy, current=0)
    r.until(T0 + 100, constant(0), start=T0)
    r.until(T0 + 1000, constant(1), held=1, ready=0, tick=2)
    assert r.desired(T0 + 101, T0 + 1000) == {1}


# --- restarts ------------------------------------------------------------------------------


def _after_load(policy: Policy, demand: int, seconds: float) -> tuple[Run, float]:
    r = run(policy)
    r.until(T0 + seconds, constant(demand), start=T0)
    return r, T0 + seconds


def test_state_survives_a_restart_through_status() -> None:
    r, end = _after_load(POLICY, 6 * TARGET, 100)
    status = r.state.to_status()
    assert status == {
        "desiredReplicas": 6,
        "lastScaleTime": format_time(r.trace[0][0]),
        "lastDemandTime": format_time(end),
    }
    restored = State.from_status(status)
    assert restored.to_status() == status
    assert (restored.desired, restored.last_demand_time) == (6, end)
    assert AutoscalingStatus.model_validate(
        autoscaling_status(r.state, r.trace[-1][1], gateways=2)
    ) == AutoscalingStatus(
        desired_replicas=6,
        reason="Stable",
        message="24 requests in flight, target 4/replica",
        demand=24,
        last_scale_time=status["lastScaleTime"],
        last_demand_time=status["lastDemandTime"],
        gateways=2,
    )


@pytest.mark.parametrize(
    "status",
    [None, {}, {"desiredReplicas": "6", "lastScaleTime": "yesterday", "lastDemandTime": 5}],
)
def test_a_missing_or_mangled_status_is_a_fresh_state(status: dict[str, object] | None) -> None:
    state = State.from_status(status)
    assert (state.desired, state.last_scale_time, state.last_demand_time) == (None, None, None)
    assert state.to_status() == {}


def test_times_are_rfc3339_in_utc() -> None:
    assert format_time(0) == "1970-01-01T00:00:00Z"
    assert parse_time("1970-01-01T00:01:00Z") == 60
    assert parse_time("1970-01-01T00:01:00") == 60
    assert parse_time("1970-01-01T01:01:00+01:00") == 60


def test_a_restarted_autoscaler_does_not_scale_down_before_a_stable_window() -> None:
    policy = Policy(max_replicas=20, min_replicas=1, target=TARGET, scale_down_delay=0)
    r, end = _after_load(policy, 6 * TARGET, 100)
    restart = end + 5
    status = r.state.to_status()
    r2 = run(policy, current=6, state=State.from_status(status))
    # After the restart the load is one replica's worth; the new process cannot know
    # what came before it, so it keeps the replicas for one full stable window.
    r2.until(restart + 120, constant(TARGET), start=restart)
    assert r2.desired(restart, restart + STABLE_WINDOW - 1) == {6}
    assert r2.current == 1


def test_a_restarted_autoscaler_keeps_the_last_scale_for_the_delay() -> None:
    r, end = _after_load(POLICY, 6 * TARGET, 100)
    last_scale = r.state.last_scale_time
    assert last_scale is not None
    restart = end + 5
    r2 = run(POLICY, current=6, state=State.from_status(r.state.to_status()))
    r2.until(restart + 400, constant(TARGET), start=restart)
    assert r2.desired(restart, last_scale + POLICY.scale_down_delay - 1) == {6}
    assert r2.current == 1


def test_a_restart_mid_load_neither_drops_to_zero_nor_flaps() -> None:
    policy = Policy(max_replicas=20, min_replicas=0, target=TARGET, scale_down_delay=300)
    r, end = _after_load(policy, 3 * TARGET, 600)
    assert r.current == 3
    r2 = run(policy, current=3, state=State.from_status(r.state.to_status()))
    # The first ticks after the restart: no gateway has reported yet, then the load again.
    restart = end + 10
    r2.until(restart + 600, lambda t: 3 * TARGET if t >= restart + 5 else 0, start=restart)
    assert r2.desired(restart, restart + 600) == {3}
    assert not any(d.scale_event for _, d in r2.trace)


def test_a_restarted_autoscaler_counts_idle_time_from_the_last_request() -> None:
    policy = Policy(max_replicas=4, min_replicas=0, target=TARGET, scale_down_delay=300)
    r, end = _after_load(policy, 2, 100)
    r.until(end + 200, constant(0))  # 200 s idle, then the operator restarts
    r2 = run(policy, current=1, state=State.from_status(r.state.to_status()))
    restart = end + 210
    r2.until(restart + 300, constant(0), start=restart)
    # Zero 300 s after the last request (end + 1), not 300 s after the restart.
    assert r2.first_time(0) == end + 1 + 300


def test_a_restarted_autoscaler_may_scale_up_at_once() -> None:
    r2 = run(POLICY, current=2, state=State.from_status({"desiredReplicas": 2}))
    decision = r2.until(T0, constant(10 * TARGET), start=T0)
    assert (decision.desired, decision.scale_event) == (10, True)


def test_no_readings_is_no_reason_to_scale_down() -> None:
    policy = Policy(max_replicas=4, min_replicas=0, target=TARGET, scale_down_delay=0)
    state = State.from_status({"desiredReplicas": 2})
    for t in range(0, 600, 10):  # no gateway reports: nothing observed
        decision = decide(policy, state, T0 + t, current_replicas=2, ready_replicas=2, held=0)
        assert decision.desired == 2


# --- bounds and steadiness -----------------------------------------------------------------


def test_demand_over_the_maximum_is_clamped_and_says_so() -> None:
    policy = Policy(max_replicas=8, min_replicas=1, target=TARGET, scale_down_delay=300)
    r = run(policy)
    decision = r.until(T0 + 30, constant(100), start=T0)
    assert (decision.desired, decision.reason) == (8, ScalingReason.AT_MAXIMUM)
    assert decision.message == (
        "100 requests in flight, target 4/replica: 25 replicas wanted, maximum 8"
    )
    assert max(d.desired for _, d in r.trace) == 8


def test_the_minimum_holds_without_demand() -> None:
    policy = Policy(max_replicas=8, min_replicas=2, target=TARGET, scale_down_delay=0)
    r = run(policy, current=0)
    decision = r.until(T0 + 200, constant(0), start=T0)
    assert r.desired(T0, T0 + 200) == {2}
    assert r.trace[0][1].reason == ScalingReason.SCALING_UP
    assert decision.message == "no requests in flight, target 4/replica, minimum 2"


def test_a_manual_scale_is_overwritten_with_an_event() -> None:
    r = run()
    r.until(T0 + 120, constant(2 * TARGET), start=T0)
    r.current = 7  # kubectl scale: the next decision takes it back, after the delay
    r.until(T0 + 500, constant(2 * TARGET))
    events = [(t, d) for t, d in r.trace if t > T0 + 120 and d.scale_event]
    assert [d.desired for _, d in events] == [2]
    assert events[0][0] - (T0 + 120) <= POLICY.scale_down_delay + 1


@pytest.mark.parametrize("ticks", [(1.0,), (0.7, 1.3), (0.1, 0.3, 2.9)])
def test_a_steady_load_at_the_boundary_does_not_flap(ticks: tuple[float, ...]) -> None:
    """Exactly 4 x target, read at irregular times: float sums must not make it 5."""
    state, current, t, i = State(), 1, T0, 0
    decisions = []
    while t < T0 + 1200:
        state.observe(t, 4 * TARGET)
        decision = decide(
            POLICY, state, t, current_replicas=current, ready_replicas=current, held=0
        )
        decisions.append(decision)
        current = decision.desired
        t += ticks[i % len(ticks)]
        i += 1
    assert decisions[0].desired == 4
    assert {d.desired for d in decisions} == {4}
    assert [d.scale_event for d in decisions].count(True) == 1
    assert decisions[-1].reason == ScalingReason.STABLE


def test_policy_from_the_spec() -> None:
    spec = Autoscaling(max_replicas=5)
    assert Policy.from_spec(spec) == Policy(
        max_replicas=5, min_replicas=1, target=4, scale_down_delay=300.0
    )
