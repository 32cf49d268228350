"""The autoscaler loop: demand in, spec.replicas out, for every backend with spec.autoscaling.

Leader-only (it runs as a companion of the controller's workers). It decides on every
change of the gateways' counts and at least once a second, writes spec.replicas through
the scale subresource when the decision differs, posts an Event per scale, and writes
status.autoscaling when it says something new (which is also its memory across restarts
and leader changes: `State.from_status`).

`kubectl scale` against the autoscaler: the autoscaler wins. A spec.replicas it did not
write is reported once (Warning ReplicasOverridden) and replaced by its own value.

All API writes go through `write` (threads, tracked by the controller so a stopping
leader waits for them); a failed write is logged and tried again at the next decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from kubernetes.client.exceptions import ApiException

from fabric_operator.api.v1alpha1 import Engine
from fabric_operator.autoscaler.policy import (
    Decision,
    Policy,
    State,
    autoscaling_status,
    decide,
    format_time,
    parse_time,
)
from fabric_operator.autoscaler.signal import Demand, Signal
from fabric_operator.config import OperatorConfig
from fabric_operator.machinery.metrics import Sample
from fabric_operator.machinery.rest import api_message
from fabric_operator.machinery.store import Store, resource_version
from fabric_operator.validation import validate

log = logging.getLogger(__name__)

BACKEND = "LLMBackend"
TICK_SECONDS = 1.0
# status.autoscaling: reason, desired replicas, scale time and the gateways counted are
# written at once; a message or demand that alone changed at most this often;
# lastDemandTime only when it moved this far (steady load would otherwise write every
# second). Each status write is also a watch event every gateway replica rebuilds its
# routes on, so a message that only follows the load waits 10 s.
MESSAGE_SECONDS = 10.0
DEMAND_TIME_SECONDS = 10.0
OVERRIDDEN = "ReplicasOverridden"
# A writer that keeps setting spec.replicas back (an HPA, a GitOps sync with self-heal)
# fights the autoscaler: the Warning is repeated, with a count, at most this often, so
# the fight is never silent after its first round and never an Event per write.
OVERRIDE_WARN_SECONDS = 600.0
T = TypeVar("T")
Key = tuple[str, str]


class Writer(Protocol):
    """The API calls the loop makes (controller.kube.Kube has them)."""

    def scale(self, namespace: str, name: str, replicas: int) -> dict[str, Any]: ...

    def patch_autoscaling(
        self, namespace: str, name: str, autoscaling: dict[str, Any]
    ) -> dict[str, Any]: ...

    def post_event(
        self, backend: dict[str, Any], type_: str, reason: str, message: str, timestamp: str
    ) -> None: ...


class Sources(Protocol):
    """Where the gateways' counts come from (discovery.Gateways), started when needed."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(fn, *args)


@dataclass
class Plan:
    """What one decision asks to write: spec.replicas, Events, status.autoscaling."""

    scale_to: int | None = None
    events: list[tuple[str, str, str]] = field(default_factory=list)  # type, reason, message
    status: dict[str, Any] | None = None  # the merge patch of status.autoscaling
    direction: str | None = None  # up or down, for the counter
    overridden: int | None = None  # the spec.replicas being replaced
    decision: Decision | None = None


@dataclass
class Tracked:
    """One autoscaled backend as the loop knows it."""

    state: State
    uid: str | None
    generation: int | None = None
    policy: Policy | None = None
    expected: int | None = None  # spec.replicas as this process wrote or agreed to it
    written_version: int | None = None  # resourceVersion its last scale write made
    warned: int | None = None  # the overriding spec.replicas already reported
    warned_at: float = float("-inf")  # when (wall clock, as `now`)
    overrides: int = 0  # overrides set back since that Warning
    status: dict[str, Any] = field(default_factory=dict)  # status.autoscaling as written
    status_at: float = float("-inf")  # monotonic time of that write
    demand: int = 0
    busy: bool = False


def scale_event(current: int, desired: int, message: str) -> tuple[str, str, str]:
    reason = "ScaledToZero" if desired == 0 else "ScaledUp" if desired > current else "ScaledDown"
    return ("Normal", reason, f"{current} -> {desired} replicas: {message}")


def status_worth_writing(
    old: dict[str, Any], new: dict[str, Any], seconds_since_write: float
) -> bool:
    """Whether status.autoscaling says something new enough to be written now."""
    at_once = ("reason", "desiredReplicas", "lastScaleTime", "gateways")
    if any(old.get(k) != new.get(k) for k in at_once):
        return True
    if any(old.get(k) != new.get(k) for k in ("message", "demand")):
        return seconds_since_write >= MESSAGE_SECONDS
    before, after = parse_time(old.get("lastDemandTime")), parse_time(new.get("lastDemandTime"))
    if after is None or before == after:
        return False
    return before is None or abs(after - before) >= DEMAND_TIME_SECONDS


def plan(
    tracked: Tracked,
    obj: dict[str, Any],
    *,
    demand: Demand,
    gateways: int,
    ready: int,
    now: float,
    since_status: float,
    partial: bool = False,
) -> Plan:
    """Observe and decide for one backend; what to write. Pure but for `tracked.state`,
    which the decision updates."""
    assert tracked.policy is not None
    spec = obj.get("spec") or {}
    replicas = int(spec.get("replicas", 1))
    version = resource_version((obj.get("metadata") or {}).get("resourceVersion"))
    state = tracked.state
    stale = tracked.written_version is not None and (
        version is None or version < tracked.written_version
    )
    overridden = not stale and tracked.expected is not None and replicas != tracked.expected
    # A store copy older than our own write still shows the replicas before it; one
    # changed by someone else is not taken as the current count either (ours wins).
    current = (
        tracked.expected if (stale or overridden) and tracked.expected is not None else replicas
    )
    if gateways:
        state.observe(now, demand.total)  # no reading is not a reading of zero
    decision = decide(
        tracked.policy,
        state,
        now,
        current_replicas=current,
        ready_replicas=ready,
        held=demand.held if gateways else 0,
        partial=partial,
    )
    tracked.demand = demand.total if gateways else 0
    out = Plan(decision=decision)
    if decision.desired != replicas and not stale:
        out.scale_to = decision.desired
        if decision.desired != current:
            out.direction = "up" if decision.desired > current else "down"
            out.events.append(scale_event(current, decision.desired, decision.message))
        if overridden:
            tracked.overrides += 1
        if overridden and (
            tracked.warned != replicas or now - tracked.warned_at >= OVERRIDE_WARN_SECONDS
        ):
            out.overridden = replicas
            times = "" if tracked.overrides <= 1 else f" ({tracked.overrides} times)"
            out.events.append(
                (
                    "Warning",
                    OVERRIDDEN,
                    f"spec.replicas was set to {replicas}{times}, but it is owned by "
                    f"spec.autoscaling: set back to {decision.desired}. Change "
                    "spec.autoscaling (minReplicas, maxReplicas) instead, or remove it "
                    "(or stop what keeps setting it: an HPA, a GitOps sync).",
                )
            )
    elif decision.desired == replicas and not stale:
        tracked.expected = replicas
    new = autoscaling_status(state, decision, gateways)
    if status_worth_writing(tracked.status, new, since_status):
        # A merge patch: keys of the old status that the new one lacks are removed.
        out.status = {**dict.fromkeys(tracked.status), **new}
    return out


class Autoscaler:
    """Keeps spec.replicas of every autoscaled backend where demand wants it."""

    def __init__(
        self,
        store: Store,
        writer: Writer,
        signal: Signal,
        sources: Sources,
        *,
        config: OperatorConfig | None = None,
        write: Callable[..., Awaitable[Any]] = _in_thread,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        tick: float = TICK_SECONDS,
    ) -> None:
        self.store, self.writer, self.signal, self.sources = store, writer, signal, sources
        self.config = config or OperatorConfig()
        self._write, self.clock, self.monotonic, self.tick = write, clock, monotonic, tick
        self.tracked: dict[Key, Tracked] = {}
        self.scale_events = {"up": 0, "down": 0}
        self._dirty: set[Key] = set()
        self._wake = asyncio.Event()
        self._acting: set[asyncio.Task[None]] = set()
        self._sourcing = False
        self._source_error: str | None = None

    # -- what wakes the loop -------------------------------------------------------------

    def backend_changed(self, namespace: str, name: str) -> None:
        """An LLMBackend event (its spec, its replicas, its deletion): look at it now."""
        self._dirty.add((namespace, name))
        self._wake.set()

    def demand_changed(self, keys: set[str] | None) -> None:
        """The gateways' sum changed for these backends ("ns/name"; None: all)."""
        if keys is None:
            self._dirty.update(self.tracked)
        else:
            for key in keys:
                namespace, _sep, name = key.partition("/")
                if (namespace, name) in self.tracked:
                    self._dirty.add((namespace, name))
        self._wake.set()

    # -- the loop ------------------------------------------------------------------------

    async def run(self) -> None:
        self._dirty.update(self.store.names(BACKEND))
        next_tick = self.monotonic()
        try:
            while True:
                everything = self.monotonic() >= next_tick
                if everything:
                    next_tick = self.monotonic() + self.tick
                await self.step(everything=everything)
                # Nothing autoscaled: no tick either, only an LLMBackend event wakes it.
                timeout = max(0.0, next_tick - self.monotonic()) if self.tracked else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
        finally:
            for task in list(self._acting):
                task.cancel()
            if self._sourcing:
                await self.sources.stop()

    async def step(self, *, everything: bool = False) -> None:
        """One round: the backends that changed (all of them at a tick) are decided."""
        self._wake.clear()
        dirty, self._dirty = self._dirty, set()
        keys = dirty | set(self.tracked) if everything else dirty
        objects: dict[Key, dict[str, Any]] = {}
        for key in keys:
            with self._surviving(key):
                if (obj := self._refresh(key)) is not None:
                    objects[key] = obj
        await self._source(bool(self.tracked))
        self.signal.expire()
        for key, obj in objects.items():
            tracked = self.tracked.get(key)
            if tracked is None or tracked.busy or tracked.policy is None:
                continue
            with self._surviving(key):
                self._decide(key, tracked, obj)

    @contextlib.contextmanager
    def _surviving(self, key: Key) -> Iterator[None]:
        """One backend that cannot be decided (an object the code did not foresee) is
        logged and skipped: the loop, which every other backend needs, goes on (its task
        ending would stop all autoscaling, silently, until the operator restarts)."""
        try:
            yield
        except Exception:
            log.exception("%s/%s: autoscaler decision failed; skipped", *key)

    async def _source(self, needed: bool) -> None:
        try:
            if needed and not self._sourcing:
                self._sourcing = True
                await self.sources.start()
            elif not needed and self._sourcing:
                self._sourcing = False
                await self.sources.stop()
        except Exception as err:  # tried again at the next round (said once)
            self._sourcing = not needed
            why = f"{type(err).__name__}: {str(err)[:200]}"
            level = logging.DEBUG if why == self._source_error else logging.WARNING
            self._source_error = why
            log.log(level, "autoscaler: gateway load sources failed: %s; trying again", why)
        else:
            self._source_error = None

    def _refresh(self, key: Key) -> dict[str, Any] | None:
        """The backend as the store holds it, if autoscaled; tracked (or forgotten)."""
        obj = self.store.get(BACKEND, *key)
        meta = (obj or {}).get("metadata") or {}
        if (
            obj is None
            or meta.get("deletionTimestamp")
            or not (obj.get("spec") or {}).get("autoscaling")
        ):
            self.tracked.pop(key, None)
            return None
        tracked = self.tracked.get(key)
        if tracked is None or tracked.uid != meta.get("uid"):
            # First sight (a restart, a new leader): resume from what status kept.
            found = dict((obj.get("status") or {}).get("autoscaling") or {})
            tracked = Tracked(State.from_status(found), meta.get("uid"), status=found)
            self.tracked[key] = tracked
        if tracked.generation != meta.get("generation") or tracked.generation is None:
            tracked.generation = meta.get("generation")
            backend, problems = validate(obj, self.config)
            scaling = backend.spec.autoscaling if backend is not None else None
            remote = backend is not None and (
                backend.spec.engine == Engine.REMOTE or backend.spec.remote is not None
            )
            # An invalid spec is the reconciler's to report; nothing is scaled meanwhile.
            tracked.policy = (
                Policy.from_spec(scaling) if scaling and not problems and not remote else None
            )
        return obj

    def _ready(self, key: Key) -> int:
        deployment = self.store.get("Deployment", *key) or {}
        return int((deployment.get("status") or {}).get("readyReplicas") or 0)

    def _decide(self, key: Key, tracked: Tracked, obj: dict[str, Any]) -> None:
        out = plan(
            tracked,
            obj,
            demand=self.signal.demand(f"{key[0]}/{key[1]}"),
            gateways=self.signal.gateways,
            ready=self._ready(key),
            now=self.clock(),
            since_status=self.monotonic() - tracked.status_at,
            partial=self.signal.partial,
        )
        if out.scale_to is None and out.status is None:
            return
        tracked.busy = True
        task = asyncio.create_task(self._act(key, tracked, obj, out))
        self._acting.add(task)
        task.add_done_callback(self._acting.discard)

    async def _act(self, key: Key, tracked: Tracked, obj: dict[str, Any], out: Plan) -> None:
        """Write what a decision asked for: the replicas first (a held request waits on
        them), then its Events, then status.autoscaling."""
        namespace, name = key
        step = "scale"
        try:
            if out.scale_to is not None:
                scale = await self._write(self.writer.scale, namespace, name, out.scale_to)
                tracked.expected = out.scale_to
                tracked.written_version = resource_version(
                    (scale.get("metadata") or {}).get("resourceVersion")
                )
                if out.direction:
                    self.scale_events[out.direction] += 1
                log.info(
                    "%s/%s: spec.replicas %s -> %d",
                    namespace,
                    name,
                    (obj.get("spec") or {}).get("replicas"),
                    out.scale_to,
                )
                if out.overridden is not None:
                    tracked.warned, tracked.warned_at = out.overridden, self.clock()
                    tracked.overrides = 0
                step = "events"
                stamp = format_time(self.clock())
                for type_, reason, message in out.events:
                    await self._write(self.writer.post_event, obj, type_, reason, message, stamp)
            if out.status is not None:
                step = "status"
                await self._write(self.writer.patch_autoscaling, namespace, name, out.status)
                tracked.status = {k: v for k, v in out.status.items() if v is not None}
                tracked.status_at = self.monotonic()
        except asyncio.CancelledError:
            raise
        except Exception as err:  # tried again at the next decision
            detail = api_message(err) if isinstance(err, ApiException) else type(err).__name__
            log.warning("%s/%s: autoscaler %s write failed: %s", namespace, name, step, detail)
        finally:
            tracked.busy = False

    # -- metrics -------------------------------------------------------------------------

    def samples(self) -> list[Sample]:
        out = [
            Sample(
                "fabric_operator_autoscaler_gateways",
                "gauge",
                "Gateway replicas whose load reports the autoscaler sums now.",
                (),
                float(self.signal.gateways),
            )
        ]
        for (namespace, name), t in sorted(self.tracked.items()):
            labels = (("namespace", namespace), ("name", name))
            if t.state.desired is not None:
                out.append(
                    Sample(
                        "fabric_operator_autoscaler_desired_replicas",
                        "gauge",
                        "Replicas the autoscaler wants for a backend.",
                        labels,
                        float(t.state.desired),
                    )
                )
        for (namespace, name), t in sorted(self.tracked.items()):
            out.append(
                Sample(
                    "fabric_operator_autoscaler_demand",
                    "gauge",
                    "Requests in flight plus held at the gateways for a backend.",
                    (("namespace", namespace), ("name", name)),
                    float(t.demand),
                )
            )
        for direction, count in sorted(self.scale_events.items()):
            out.append(
                Sample(
                    "fabric_operator_autoscaler_scale_events_total",
                    "counter",
                    "Replica changes the autoscaler wrote, by direction (to zero is down).",
                    (("direction", direction),),
                    float(count),
                )
            )
        return out
