"""The autoscaler loop's decision -> write mapping, with a recorded writer in place of the
API (the real API server is tests/integration/test_autoscaler.py)."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from kubernetes.client.exceptions import ApiException

from fabric_operator.autoscaler.discovery import Gateways
from fabric_operator.autoscaler.loop import OVERRIDE_WARN_SECONDS, Autoscaler, status_worth_writing
from fabric_operator.autoscaler.signal import Demand, Report, Signal
from fabric_operator.autoscaler.streams import Streams
from fabric_operator.controller.reconciler import new_store
from fabric_operator.machinery import metrics
from fabric_operator.machinery.store import Store

START = 1_800_000_000.0


class Recorder:
    """The writer: records each call; a scale answers with the next resourceVersion."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.version = 100
        self.fail: int | None = None

    def scale(self, namespace: str, name: str, replicas: int) -> dict[str, Any]:
        if self.fail:
            raise ApiException(status=self.fail, reason="Service Unavailable")
        self.version += 1
        self.calls.append(("scale", name, replicas))
        return {"metadata": {"resourceVersion": str(self.version)}, "spec": {"replicas": replicas}}

    def patch_autoscaling(
        self, namespace: str, name: str, autoscaling: dict[str, Any]
    ) -> dict[str, Any]:
        self.calls.append(("status", name, autoscaling))
        return {}

    def post_event(
        self, backend: dict[str, Any], type_: str, reason: str, message: str, timestamp: str
    ) -> None:
        self.calls.append(("event", type_, reason, message))

    def of(self, kind: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == kind]


class Sources:
    def __init__(self) -> None:
        self.started = self.stopped = 0

    async def start(self) -> None:
        self.started += 1

    async def stop(self) -> None:
        self.stopped += 1


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def backend(
    name: str = "b",
    replicas: int = 0,
    version: int = 10,
    status: dict[str, Any] | None = None,
    **autoscaling: Any,
) -> dict[str, Any]:
    scaling = {"minReplicas": 0, "maxReplicas": 4, "targetRequests": 2}
    scaling["scaleDownDelaySeconds"] = 3
    scaling.update(autoscaling)
    obj: dict[str, Any] = {
        "apiVersion": "llm.fabric.dev/v1alpha1",
        "kind": "LLMBackend",
        "metadata": {
            "name": name,
            "namespace": "t",
            "uid": f"uid-{name}",
            "generation": 1,
            "resourceVersion": str(version),
        },
        "spec": {
            "engine": "llamacpp",
            "model": {"url": "https://h.invalid/m.gguf"},
            "replicas": replicas,
            "autoscaling": scaling,
        },
    }
    if status is not None:
        obj["status"] = {"autoscaling": status}
    return obj


class Harness:
    def __init__(self, *objs: dict[str, Any]) -> None:
        self.store: Store = new_store()
        for obj in objs:
            self.store.put("LLMBackend", obj)
        self.writer = Recorder()
        self.sources = Sources()
        self.clock = Clock(START)
        self.mono = Clock(1000.0)
        self.signal = Signal(clock=self.mono)

        async def direct(fn: Callable[..., Any], *args: Any) -> Any:
            return fn(*args)

        self.scaler = Autoscaler(
            self.store,
            self.writer,
            self.signal,
            self.sources,
            write=direct,
            clock=self.clock,
            monotonic=self.mono,
        )
        self.signal.on_change = self.scaler.demand_changed

    def load(self, in_flight: int = 0, held: int = 0, name: str = "b") -> None:
        self.signal.update("u0", Report("gw-0", {f"t/{name}": Demand(in_flight, held)}))

    def step(self, seconds: float = 0.0, *, everything: bool = True) -> None:
        self.clock.now += seconds
        self.mono.now += seconds

        async def once() -> None:
            if not self.scaler.tracked:
                self.scaler.backend_changed("t", "b")
                for namespace, name in self.store.names("LLMBackend"):
                    self.scaler.backend_changed(namespace, name)
            await self.scaler.step(everything=everything)
            await asyncio.gather(*self.scaler._acting)

        asyncio.run(once())

    def echo(self, replicas: int) -> None:
        """The watch delivering the backend as the scale write left it."""
        obj = self.store.get("LLMBackend", "t", "b")
        assert obj is not None
        obj["spec"]["replicas"] = replicas
        obj["metadata"]["resourceVersion"] = str(self.writer.version)
        self.store.put("LLMBackend", obj)


def test_an_operator_without_autoscaled_backends_starts_no_source_and_writes_nothing() -> None:
    plain = backend()
    del plain["spec"]["autoscaling"]
    h = Harness(plain)
    h.step()
    h.step(1.0)
    assert h.sources.started == 0 and h.writer.calls == []


def test_a_held_request_at_zero_scales_to_one_with_an_event_and_status() -> None:
    h = Harness(backend(replicas=0))
    h.load(held=0)
    h.step()
    assert h.sources.started == 1
    assert h.writer.of("scale") == []  # no demand, at zero: nothing to do
    [(_k, _n, status)] = h.writer.of("status")
    assert status["reason"] == "ScaledToZero" and status["gateways"] == 1
    h.writer.calls.clear()
    h.load(held=1)
    h.step(0.1, everything=False)  # woken by the change, not by a tick
    assert h.writer.of("scale") == [("scale", "b", 1)]
    [(_k, type_, reason, message)] = h.writer.of("event")
    assert (type_, reason) == ("Normal", "ScaledUp")
    assert message == "0 -> 1 replicas: 1 request held, scaling from zero"
    [(_k, _n, status)] = h.writer.of("status")
    assert status["reason"] == "ScalingUp" and status["desiredReplicas"] == 1
    assert h.scaler.scale_events == {"up": 1, "down": 0}
    assert h.writer.calls[0][0] == "scale"  # the replicas first: a request waits on them


def test_the_store_lagging_behind_our_write_causes_no_second_write() -> None:
    h = Harness(backend(replicas=0))
    h.load(held=1)
    h.step()
    assert h.writer.of("scale") == [("scale", "b", 1)]
    h.step(0.5)  # the watch has not delivered spec.replicas 1 yet
    h.step(0.5)
    assert h.writer.of("scale") == [("scale", "b", 1)]
    assert not [c for c in h.writer.of("event") if c[2] == "ReplicasOverridden"]


def test_load_above_the_maximum_is_capped_and_said() -> None:
    h = Harness(backend(replicas=1, maxReplicas=4))
    h.load(in_flight=12)
    h.step()
    assert h.writer.of("scale") == [("scale", "b", 4)]
    status = h.writer.of("status")[-1][2]
    assert status["reason"] == "AtMaximum" and "maximum 4" in status["message"]


def test_a_manual_scale_is_overridden_once_with_a_warning() -> None:
    h = Harness(backend(replicas=1))
    h.load(in_flight=2)
    h.step()
    assert h.writer.of("scale") == []  # 2 requests, target 2: one replica is right
    h.writer.version = 20
    h.echo(3)  # kubectl scale --replicas=3
    h.step(1.0)
    assert h.writer.of("scale") == [("scale", "b", 1)]
    warnings = [c for c in h.writer.of("event") if c[1] == "Warning"]
    assert [w[2] for w in warnings] == ["ReplicasOverridden"]
    assert "owned by spec.autoscaling" in warnings[0][3]
    assert not [c for c in h.writer.of("event") if c[2].startswith("Scaled")]
    h.step(1.0)  # before the echo of our write: no second warning, no second write
    h.echo(1)
    h.step(1.0)
    assert len(h.writer.of("scale")) == 1
    assert len([c for c in h.writer.of("event") if c[1] == "Warning"]) == 1


def test_a_restarted_autoscaler_keeps_the_replicas_it_set() -> None:
    """State comes back from status.autoscaling: no scale-down at a restart."""
    kept = {
        "desiredReplicas": 4,
        "reason": "ScalingUp",
        "lastScaleTime": "2027-01-15T08:00:00Z",
        "lastDemandTime": "2027-01-15T08:00:00Z",
    }
    h = Harness(backend(replicas=4, status=kept))
    h.clock.now = 1_800_000_000.0 + 30
    h.load(in_flight=1)  # less than at the scale: a fresh state never scales down
    for _ in range(10):
        h.step(1.0)
    assert h.writer.of("scale") == []
    assert h.scaler.tracked["t", "b"].state.last_scale_time is not None


def test_no_gateway_is_no_reading_the_replicas_stay() -> None:
    h = Harness(backend(replicas=2))
    for _ in range(5):
        h.step(1.0)
    assert h.writer.of("scale") == []
    assert h.writer.of("status")[-1][2]["gateways"] == 0


def test_steady_load_writes_the_status_once() -> None:
    h = Harness(backend(replicas=2))
    h.load(in_flight=4)
    for _ in range(8):
        h.load(in_flight=4)  # heartbeats
        h.step(1.0)
    assert len(h.writer.of("status")) == 1
    h.step(10.0)  # lastDemandTime moved 10 s
    assert len(h.writer.of("status")) == 2


def test_a_failed_write_is_tried_again_at_the_next_decision() -> None:
    h = Harness(backend(replicas=0))
    h.load(held=1)
    h.writer.fail = 503
    h.step()
    assert h.writer.of("scale") == [] and h.writer.of("event") == []
    h.writer.fail = None
    h.step(1.0)
    assert h.writer.of("scale") == [("scale", "b", 1)]


def test_an_invalid_autoscaling_spec_is_left_alone() -> None:
    h = Harness(backend(replicas=7, minReplicas=5, maxReplicas=2))
    h.load(in_flight=10)
    h.step()
    assert h.writer.calls == []


def test_a_backend_no_longer_autoscaled_stops_the_sources() -> None:
    h = Harness(backend(replicas=1))
    h.step()
    assert h.sources.started == 1
    obj = copy.deepcopy(h.store.get("LLMBackend", "t", "b"))
    assert obj is not None
    del obj["spec"]["autoscaling"]
    obj["metadata"]["resourceVersion"] = "500"
    obj["metadata"]["generation"] = 2
    h.store.put("LLMBackend", obj)
    h.step(1.0)
    assert h.sources.stopped == 1 and h.scaler.tracked == {}


def test_metrics_per_backend_and_direction() -> None:
    h = Harness(backend(replicas=0))
    h.load(held=1)
    h.step()
    text = "\n".join(metrics.sample_lines(h.scaler.samples()))
    samples = metrics.parse(text)
    assert samples["fabric_operator_autoscaler_gateways"] == 1
    assert samples['fabric_operator_autoscaler_desired_replicas{namespace="t",name="b"}'] == 1
    assert samples['fabric_operator_autoscaler_demand{namespace="t",name="b"}'] == 1
    assert samples['fabric_operator_autoscaler_scale_events_total{direction="up"}'] == 1
    assert text.count("# TYPE fabric_operator_autoscaler_demand gauge") == 1


def test_what_makes_a_status_worth_writing() -> None:
    old = {"reason": "Stable", "desiredReplicas": 2, "message": "m", "demand": 3}
    assert status_worth_writing(old, {**old, "reason": "ScalingUp"}, 0.1)
    assert not status_worth_writing(old, {**old, "message": "n"}, 9.5)
    assert status_worth_writing(old, {**old, "message": "n"}, 10.0)
    with_time = {**old, "lastDemandTime": "2027-01-01T00:00:00Z"}
    assert status_worth_writing(old, with_time, 0.1)
    assert not status_worth_writing(
        with_time, {**old, "lastDemandTime": "2027-01-01T00:00:09Z"}, 60
    )
    assert status_worth_writing(with_time, {**old, "lastDemandTime": "2027-01-01T00:00:10Z"}, 60)


# -- review of issue 16: what a missing gateway, a failing start or a fight must not do ---


def test_a_gateway_replica_not_counted_blocks_scale_down_but_not_up() -> None:
    """A second gateway replica is known but its stream fails (refused: its 16 watch
    slots taken by whoever reaches the port; or down): its held requests are missing
    from the sum, so nothing is scaled away on that sum; once it reports, it is."""
    h = Harness(backend(replicas=1, scaleDownDelaySeconds=3))
    h.signal.expect({"u0", "u1"})  # what Streams.set_urls tells it

    def step(in_flight: int, *, both: bool) -> None:
        h.load(in_flight=in_flight)
        if both:
            h.signal.update("u1", Report("gw-1", {}))
        h.step(1.0)
        if h.writer.of("scale"):
            h.echo(h.writer.of("scale")[-1][2])  # the watch delivers each write

    for _ in range(70):  # past the stable window and the delay; only u0 reports
        step(0, both=False)
    assert h.writer.of("scale") == []
    assert h.signal.gateways == 1
    for _ in range(6):  # a partial sum still scales up
        step(6, both=False)
    assert h.writer.of("scale")[-1][2] >= 2
    for _ in range(100):  # u1 reports at last: the sum is whole (and panic is over)
        step(0, both=True)
    assert h.writer.of("scale")[-1] == ("scale", "b", 0)


def test_streams_tell_the_signal_which_sources_to_expect() -> None:
    async def run() -> None:
        signal = Signal()
        streams = Streams(signal, transport=httpx.MockTransport(lambda _r: httpx.Response(503)))
        streams.set_urls({"http://10.0.0.1:9090/load", "http://10.0.0.2:9090/load"})
        assert signal.partial
        signal.update("http://10.0.0.1:9090/load", Report("gw-0", {}))
        assert signal.partial
        signal.update("http://10.0.0.2:9090/load", Report("gw-1", {}))
        assert not signal.partial
        streams.set_urls({"http://10.0.0.1:9090/load"})
        assert not signal.partial
        await streams.close()
        assert not signal.partial

    asyncio.run(run())


class FailingSources(Sources):
    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def start(self) -> None:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("no kubeconfig")
        await super().start()


def test_sources_that_fail_to_start_are_tried_again_and_the_loop_goes_on() -> None:
    h = Harness(backend(replicas=0))
    h.scaler.sources = h.sources = FailingSources(2)
    h.step()
    h.step(1.0)
    assert h.sources.started == 0
    h.step(1.0)
    assert h.sources.started == 1
    h.load(held=1)
    h.step(1.0)
    assert h.writer.of("scale") == [("scale", "b", 1)]


def test_gateways_left_half_started_by_a_failure_start_again() -> None:
    gateways = Gateways(Signal(), namespace="gw", kubeconfig="/nonexistent/kubeconfig")

    async def run() -> None:
        for _ in range(2):
            with pytest.raises(Exception):  # noqa: B017 - kubernetes' ConfigException
                await gateways.start()
            assert not gateways.running
        await gateways.stop()

    asyncio.run(run())


def test_a_fight_over_spec_replicas_is_warned_again_with_a_count() -> None:
    """An HPA or a GitOps self-heal setting spec.replicas back again and again: the
    autoscaler wins each round, and the fight is said again (not once, then silently)."""
    h = Harness(backend(replicas=1))
    h.load(in_flight=2)
    h.step()
    for round_ in range(5):
        h.writer.version += 10
        h.echo(3)  # the other writer
        h.step(1.0)
        assert h.writer.of("scale")[-1] == ("scale", "b", 1), round_
        h.echo(1)
        h.step(1.0)
    warnings = [c for c in h.writer.of("event") if c[2] == "ReplicasOverridden"]
    assert len(warnings) == 1
    h.step(OVERRIDE_WARN_SECONDS)
    h.writer.version += 10
    h.echo(3)
    h.step(1.0)
    warnings = [c for c in h.writer.of("event") if c[2] == "ReplicasOverridden"]
    assert len(warnings) == 2 and "set to 3 (5 times)" in warnings[1][3]
    assert not [c for c in h.writer.of("event") if c[2].startswith("Scaled")]
