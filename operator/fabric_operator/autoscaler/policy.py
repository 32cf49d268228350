"""The autoscaling decision: demand in, desired replicas out, Knative-style.

Pure (no clock, no API, no I/O): the caller feeds demand readings and replica counts with
an explicit `now` (wall-clock seconds, because the state kept in status carries RFC 3339
times), so every rule below is tested with a fake clock. The rules:

- Demand is requests held at the gateways plus those in flight through them (summed over
  gateway replicas) or, if more, those the engine pods report running and waiting (their
  own gauges, which see requests that bypassed the gateways). Two averages of it: the
  stable window (60 s) and the panic window (6 s); each asks for
  ceil(average / targetRequests) replicas.
- Panic: when the panic window asks for at least twice the current replicas (at least 2),
  follow it at once; panic lasts until a stable window has passed since it last triggered,
  and never scales down. Otherwise the stable window decides.
- Scale-up is immediate. Scale-down waits until nothing above the new count was asked for
  during scaleDownDelaySeconds. Zero (minReplicas 0 only) once no request was in flight or
  held for scaleDownDelaySeconds.
- Held requests ask for one replica at once (scale from zero), and while a pod is still
  starting with requests held for it, nothing is scaled down (it would be the pod they
  wait for).
- A sum that misses a gateway replica (its stream failed or was refused) scales up but
  never down: the requests it misses may be held for the very pods it would remove.
- A fresh state (operator restart, new leader) scales up but not down until it has
  observed a full stable window; what it restores from status keeps the last scale's
  replicas for scaleDownDelaySeconds from when they were set.
- The result is clamped to [minReplicas, maxReplicas]; AtMaximum says demand wanted more.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fabric_operator.api.v1alpha1 import Autoscaling, ScalingReason
from fabric_operator.autoscaler.window import Window

STABLE_WINDOW = 60.0
PANIC_WINDOW = 6.0
PANIC_THRESHOLD = 2.0
# Averages are floats: 16.000000001 requests at a target of 4 must still be 4 replicas.
_EPSILON = 1e-9


@dataclass(frozen=True)
class Policy:
    """The knobs of spec.autoscaling the decision uses."""

    max_replicas: int
    min_replicas: int = 1
    target: int = 4
    scale_down_delay: float = 300.0

    @classmethod
    def from_spec(cls, spec: Autoscaling) -> Policy:
        return cls(
            max_replicas=spec.max_replicas,
            min_replicas=spec.min_replicas,
            target=spec.target_requests,
            scale_down_delay=float(spec.scale_down_delay_seconds),
        )


@dataclass(frozen=True)
class Decision:
    """What to do now, and the words for status and the scale Event."""

    desired: int
    reason: ScalingReason
    message: str
    scale_event: bool
    demand: int = 0
    panic: bool = False


@dataclass
class State:
    """What the autoscaler of one backend remembers between decisions.

    Only desired replicas, the last scale time and the last demand time outlive the
    process (in status.autoscaling); the windows are rebuilt by observing.
    """

    window: Window = field(default_factory=lambda: Window(STABLE_WINDOW))
    started: float | None = None  # first reading this process observed
    last_demand_time: float | None = None
    last_scale_time: float | None = None
    desired: int | None = None
    panic_since: float | None = None  # last time the panic threshold was crossed
    panic_max: int = 0
    # (time, replicas asked for), times increasing and replicas decreasing: its head is
    # the most asked for during the scale-down delay.
    asked: deque[tuple[float, int]] = field(default_factory=deque)

    def observe(self, now: float, demand: int) -> None:
        """Record one reading of the demand summed over the gateways (feed none when no
        gateway reported: no reading is not a reading of zero)."""
        if self.started is None:
            self.started = now
        previous = self.window.latest
        self.window.add(now, max(demand, 0))
        # A drop to zero ends demand now, not at the previous reading.
        if (demand > 0 or (previous or 0) > 0) and now >= (self.last_demand_time or now):
            self.last_demand_time = now

    @classmethod
    def from_status(cls, status: Mapping[str, Any] | None) -> State:
        """The state a restarted operator (or a new leader) resumes from."""
        status = status or {}
        desired = status.get("desiredReplicas")
        state = cls(
            desired=desired if isinstance(desired, int) and desired >= 0 else None,
            last_scale_time=parse_time(status.get("lastScaleTime")),
            last_demand_time=parse_time(status.get("lastDemandTime")),
        )
        if state.desired is not None and state.last_scale_time is not None:
            state.asked.append((state.last_scale_time, state.desired))
        return state

    def to_status(self) -> dict[str, Any]:
        """The fields of status.autoscaling that from_status restores."""
        out: dict[str, Any] = {}
        if self.desired is not None:
            out["desiredReplicas"] = self.desired
        if self.last_scale_time is not None:
            out["lastScaleTime"] = format_time(self.last_scale_time)
        if self.last_demand_time is not None:
            out["lastDemandTime"] = format_time(self.last_demand_time)
        return out

    def most_asked(self, now: float, asked: int, delay: float) -> int:
        """Record `asked` and return the most asked for in the last `delay` seconds."""
        while self.asked and self.asked[0][0] <= now - delay:
            self.asked.popleft()
        while self.asked and self.asked[-1][1] <= asked:
            self.asked.pop()
        self.asked.append((now, asked))
        return self.asked[0][1]

    def idle(self, now: float, seconds: float) -> bool:
        """Whether no request was in flight or held for `seconds` (counted from the first
        reading when there never was one); never before a reading."""
        if self.started is None or (self.window.latest or 0) > 0:
            return False
        since = self.started if self.last_demand_time is None else self.last_demand_time
        return now - since >= seconds


def parse_time(value: Any) -> float | None:
    """RFC 3339 to seconds; None for anything else (a hand-edited status must not crash)."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def format_time(seconds: float) -> str:
    """As the other status times: RFC 3339, UTC, whole seconds."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def replicas_for(demand: float, target: int) -> int:
    return max(math.ceil(demand / target - _EPSILON), 0)


def _panicking(state: State, now: float, panic_wants: int, current: int) -> bool:
    if panic_wants >= PANIC_THRESHOLD * max(current, 1):
        state.panic_since = now
    elif state.panic_since is not None and now - state.panic_since >= STABLE_WINDOW:
        state.panic_since, state.panic_max = None, 0
    return state.panic_since is not None


def _requests(n: int) -> str:
    if n == 0:
        return "no requests"
    return f"{n} request{'' if n == 1 else 's'}"


def decide(
    policy: Policy,
    state: State,
    now: float,
    *,
    current_replicas: int,
    ready_replicas: int,
    held: int,
    partial: bool = False,
) -> Decision:
    """The replicas wanted now, given the readings `state` has observed, the replicas the
    backend has (spec.replicas and the ready ones) and the requests held at the gateways.
    `partial`: some gateway replica is not counted, so the readings are a lower bound:
    nothing is scaled down. Updates `state` (panic, scale-down memory, desired, last
    scale time)."""
    current, ready = current_replicas, ready_replicas
    stable_wants = replicas_for(state.window.average(now, STABLE_WINDOW), policy.target)
    panic_wants = replicas_for(state.window.average(now, PANIC_WINDOW), policy.target)
    panic = _panicking(state, now, panic_wants, current)
    if panic:
        asked = max(stable_wants, panic_wants, state.panic_max)
        state.panic_max = asked
    else:
        asked = stable_wants
    if held > 0:
        asked = max(asked, 1)
    delay = policy.scale_down_delay
    wanted = state.most_asked(now, asked, delay)
    if not panic and held == 0 and state.idle(now, delay):
        wanted = 0
    elif current > 0:
        # The stable average forgets a request after a minute: zero waits for the delay.
        wanted = max(wanted, 1)

    fresh = state.started is None or now - state.started < STABLE_WINDOW
    starting_with_held = ready < current and held > 0
    floor = current if fresh or panic or starting_with_held or partial else 0
    desired = min(max(wanted, floor, policy.min_replicas), policy.max_replicas)

    demand = int(state.window.latest or 0)
    reason, message = _explain(
        policy,
        desired=desired,
        wanted=wanted,
        current=current,
        ready=ready,
        held=held,
        demand=demand,
    )
    scale_event = desired != current
    state.desired = desired
    if scale_event:
        state.last_scale_time = now
    return Decision(desired, reason, message, scale_event, demand, panic)


def _explain(
    policy: Policy, *, desired: int, wanted: int, current: int, ready: int, held: int, demand: int
) -> tuple[ScalingReason, str]:
    """The reason and message for status and the scale Event."""
    load = f"{_requests(demand)} in flight, target {policy.target}/replica"
    if wanted < policy.min_replicas and desired == policy.min_replicas:
        load += f", minimum {policy.min_replicas}"
    if desired == 0:
        return ScalingReason.SCALED_TO_ZERO, f"no requests for {policy.scale_down_delay:g}s"
    if wanted > policy.max_replicas:
        return ScalingReason.AT_MAXIMUM, (
            f"{load}: {wanted} replicas wanted, maximum {policy.max_replicas}"
        )
    if desired > current:
        if current == 0 and held > 0:
            return ScalingReason.SCALING_UP, f"{_requests(held)} held, scaling from zero"
        return ScalingReason.SCALING_UP, load
    if desired < current:
        return ScalingReason.SCALING_DOWN, load
    if held > 0 and ready == 0:
        return ScalingReason.HOLDING, f"{_requests(held)} held until a pod is ready"
    return ScalingReason.STABLE, load


def autoscaling_status(state: State, decision: Decision, gateways: int) -> dict[str, Any]:
    """status.autoscaling after a decision (camelCase, as AutoscalingStatus)."""
    return {
        **state.to_status(),
        "reason": decision.reason.value,
        "message": decision.message,
        "demand": decision.demand,
        "gateways": gateways,
    }
