"""Controller pure parts: diff (apply decisions), status, the object store, the work queue."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from fabric_operator.api.backend import LLMBackend
from fabric_operator.controller.diff import (
    HASH_ANNOTATION,
    config_hash,
    contains,
    needs_apply,
    with_bookkeeping,
)
from fabric_operator.controller.reconciler import new_store
from fabric_operator.controller.status import Failure, compute, invalid_status, transitions
from fabric_operator.machinery.store import Store
from fabric_operator.machinery.workqueue import WorkQueue
from fabric_operator.render import render

LLAMA = {"engine": "llamacpp", "model": {"url": "https://h.invalid/m.gguf"}}


def backend(
    spec: dict[str, Any] | None = None, name: str = "m", namespace: str = "ns", generation: int = 3
) -> LLMBackend:
    meta = {"name": name, "namespace": namespace, "uid": "uid-1", "generation": generation}
    return LLMBackend.from_manifest({"metadata": meta, "spec": spec or LLAMA})


# --- diff -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("observed", "desired", "expected"),
    [
        ({"a": 1, "b": {"c": 2, "server": "x"}, "extra": 3}, {"a": 1, "b": {"c": 2}}, True),
        ({"a": 1}, {"a": 1, "b": 2}, False),
        ({"a": {"b": 1}}, {"a": {"b": 2}}, False),
        ({"a": 1}, {"a": False}, False),
        ({"l": [1, 2, 3]}, {"l": [1, 2]}, False),
        ({"l": [1]}, {"l": [1, 2]}, False),
        ({"l": [{"n": 1, "x": 9}]}, {"l": [{"n": 1}]}, True),
        ({"l": [{"n": 2}, {"n": 1}]}, {"l": [{"n": 1}, {"n": 2}]}, False),
        ({}, {"l": []}, True),
        ({"l": "x"}, {"l": []}, False),
        (None, {}, True),
        ({"a": "scalar"}, {"a": {}}, True),
        ({}, {"a": {}}, True),
        ("scalar", {"a": 1}, False),
    ],
)
def test_contains(observed: Any, desired: Any, expected: bool) -> None:
    assert contains(observed, desired) is expected


@pytest.mark.parametrize(
    ("observed", "desired", "expected"),
    [
        ("1073741824", "1Gi", True),
        ("0.5", "500m", True),
        ("1", "1000m", True),
        ("1G", "1Gi", False),
        ("2", "1", False),
        ("not-a-quantity", "1", False),
        (None, "1", False),
    ],
)
@pytest.mark.parametrize("kind", ["limits", "requests"])
def test_quantities_compare_by_value_under_resources(
    observed: Any, desired: str, expected: bool, kind: str
) -> None:
    wrap = lambda v: {"resources": {kind: {"memory": v}}}  # noqa: E731
    assert contains(wrap(observed), wrap(desired)) is expected


def test_size_limit_is_a_quantity_but_other_keys_are_not() -> None:
    assert contains({"emptyDir": {"sizeLimit": "2048Mi"}}, {"emptyDir": {"sizeLimit": "2Gi"}})
    assert not contains({"labels": {"size": "1073741824"}}, {"labels": {"size": "1Gi"}})
    assert not contains({"spec": {"replicas": "1.0"}}, {"spec": {"replicas": "1"}})


def test_config_hash_is_stable_and_follows_the_manifest() -> None:
    manifest = render(backend()).deployment
    reordered = dict(reversed(list(manifest.items())))
    assert config_hash(manifest) == config_hash(reordered)
    assert len(config_hash(manifest)) == 16
    other = render(backend({**LLAMA, "replicas": 2})).deployment
    assert config_hash(other) != config_hash(manifest)
    changed = copy.deepcopy(manifest)
    changed["spec"]["template"]["spec"]["containers"][0]["args"].append("--x")
    assert config_hash(changed) != config_hash(manifest)


def test_with_bookkeeping_adds_owner_and_hash_without_mutating() -> None:
    b = backend()
    manifest = render(b).service
    manifest["metadata"]["annotations"] = {"keep": "me"}
    before = copy.deepcopy(manifest)
    out = with_bookkeeping(manifest, b)
    assert manifest == before
    meta = out["metadata"]
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "llm.fabric.dev/v1alpha1",
            "kind": "LLMBackend",
            "name": "m",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert meta["annotations"] == {"keep": "me", HASH_ANNOTATION: config_hash(before)}
    out["spec"]["ports"][0]["port"] = 1
    assert manifest["spec"]["ports"][0]["port"] != 1


def test_with_bookkeeping_needs_a_uid() -> None:
    b = LLMBackend.from_manifest({"metadata": {"name": "m"}, "spec": LLAMA})
    with pytest.raises(ValueError, match="uid"):
        with_bookkeeping(render(b).service, b)


def test_needs_apply() -> None:
    b = backend({**LLAMA, "resources": {"limits": {"memory": "1Gi", "cpu": "500m"}}})
    desired = with_bookkeeping(render(b).deployment, b)
    assert needs_apply(desired, None) is True
    served = copy.deepcopy(desired)
    served["metadata"]["resourceVersion"] = "42"
    served["status"] = {"readyReplicas": 1}
    container = served["spec"]["template"]["spec"]["containers"][0]
    container["resources"]["limits"] = {"memory": "1073741824", "cpu": "0.5"}
    container["terminationMessagePath"] = "/dev/termination-log"
    assert needs_apply(desired, served) is False
    container["args"].pop()
    assert needs_apply(desired, served) is True


# --- status -----------------------------------------------------------------------------


def deployment(
    replicas: int = 2,
    ready: int | None = None,
    updated: int | None = None,
    available: int | None = None,
    generation: int = 5,
    observed: int = 5,
    conditions: tuple[dict[str, Any], ...] = (),
) -> dict[str, Any]:
    return {
        "metadata": {"generation": generation},
        "status": {
            "observedGeneration": observed,
            "replicas": replicas,
            "readyReplicas": replicas if ready is None else ready,
            "updatedReplicas": replicas if updated is None else updated,
            "availableReplicas": replicas if available is None else available,
            "conditions": list(conditions),
        },
    }


def conds(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


DEADLINE = {
    "type": "Progressing",
    "status": "False",
    "reason": "ProgressDeadlineExceeded",
    "message": "ReplicaSet m-1 has timed out progressing.",
}
QUOTA = {
    "type": "ReplicaFailure",
    "status": "True",
    "reason": "FailedCreate",
    "message": "exceeded quota",
}
T0, T1, T2 = "2025-01-01T00:00:00Z", "2025-01-01T00:01:00Z", "2025-01-01T00:02:00Z"
DONE = ("False", "RolloutComplete")
ROLLING = ("True", "RollingOut")
HEALTHY = ("False", "AsExpected")


@pytest.mark.parametrize(
    ("replicas", "dep", "phase", "ready", "progressing", "degraded"),
    [
        pytest.param(2, None, "Pending", ("False", "NoReplicaReady"), ROLLING, HEALTHY,
                     id="no-deployment"),
        pytest.param(2, deployment(), "Ready", ("True", "ReplicasReady"), DONE, HEALTHY,
                     id="ready"),
        pytest.param(2, deployment(ready=1, available=1), "Progressing",
                     ("True", "ReplicasReady"), ROLLING, HEALTHY, id="partly-ready"),
        pytest.param(2, deployment(observed=4), "Progressing", ("True", "ReplicasReady"),
                     ROLLING, HEALTHY, id="stale-observed-generation"),
        pytest.param(2, deployment(updated=1), "Progressing", ("True", "ReplicasReady"),
                     ROLLING, HEALTHY, id="not-all-updated"),
        pytest.param(2, deployment(ready=0, available=0), "Pending",
                     ("False", "NoReplicaReady"), ROLLING, HEALTHY, id="none-ready"),
        pytest.param(0, deployment(replicas=0), "Stopped", ("False", "ScaledToZero"), DONE,
                     HEALTHY, id="scaled-to-zero"),
        pytest.param(2, deployment(ready=0, available=0, conditions=(DEADLINE,)), "Degraded",
                     ("False", "NoReplicaReady"), ROLLING,
                     ("True", "ProgressDeadlineExceeded"), id="deadline"),
        pytest.param(2, deployment(ready=1, available=1, conditions=(QUOTA,)), "Degraded",
                     ("True", "ReplicasReady"), ROLLING, ("True", "ReplicaFailure"),
                     id="replica-failure"),
        pytest.param(2, deployment(conditions=({**QUOTA, "status": "False"},)), "Ready",
                     ("True", "ReplicasReady"), DONE, HEALTHY, id="replica-failure-cleared"),
    ],
)  # fmt: skip
def test_compute_phase_and_conditions(
    replicas: int,
    dep: dict[str, Any] | None,
    phase: str,
    ready: tuple[str, str],
    progressing: tuple[str, str],
    degraded: tuple[str, str],
) -> None:
    status = compute(backend({**LLAMA, "replicas": replicas}), dep, None, None, timestamp=T0)
    assert status["phase"] == phase
    assert conds(status) == {
        "Ready": ready,
        "Progressing": progressing,
        "Degraded": degraded,
        "ToolCalling": ("True", "ChatTemplate"),  # llama-server --jinja
    }
    assert [c["type"] for c in status["conditions"]] == [
        "Ready",
        "Progressing",
        "Degraded",
        "ToolCalling",
    ]
    for c in status["conditions"]:
        assert c["observedGeneration"] == 3
        assert c["lastTransitionTime"] == T0
        assert c["message"]


def test_compute_messages_and_fields() -> None:
    b = backend({**LLAMA, "replicas": 2, "servedModelName": "chat"}, name="qwen", namespace="ai")
    status = compute(b, deployment(ready=1, updated=1), None, None, timestamp=T0)
    assert {k: v for k, v in status.items() if k != "conditions"} == {
        "observedGeneration": 3,
        "phase": "Progressing",
        "endpoint": "http://qwen.ai.svc.cluster.local:8080/v1",
        "servedModelName": "chat",
        "replicas": 2,
        "readyReplicas": 1,
        "ready": "1/2",
        "restarts": 0,
        "selector": "llm.fabric.dev/backend=qwen",
        "toolCalling": "jinja",
    }
    assert compute(b, None, None, None, restarts=3)["restarts"] == 3
    messages = {c["type"]: c["message"] for c in status["conditions"]}
    assert messages["Ready"] == "1/2 replicas ready"
    assert messages["Progressing"] == "rolling out: 1/2 updated, 1/2 replicas ready"
    assert compute(b, None, None, None, cluster_domain="k.local")["endpoint"] == (
        "http://qwen.ai.svc.k.local:8080/v1"
    )


def test_compute_degraded_carries_the_deployment_message() -> None:
    status = compute(backend(), deployment(conditions=(DEADLINE,)), None, None, timestamp=T0)
    assert status["conditions"][2]["message"] == DEADLINE["message"]


@pytest.mark.parametrize(
    ("reason", "phase"), [("InvalidSpec", "Invalid"), ("ApplyFailed", "Degraded")]
)
def test_compute_with_failure(reason: str, phase: str) -> None:
    b = backend({**LLAMA, "replicas": 2})
    status = compute(b, deployment(), Failure(reason, "spec.x: bad"), None, timestamp=T0)
    assert status["phase"] == phase
    ready, progressing, degraded, _ = status["conditions"]
    assert (ready["status"], ready["reason"]) == ("True", "ReplicasReady")
    assert (progressing["status"], progressing["reason"]) == ("False", reason)
    assert (degraded["status"], degraded["reason"], degraded["message"]) == (
        "True",
        reason,
        "spec.x: bad",
    )


def test_last_transition_time_moves_only_with_status() -> None:
    b = backend({**LLAMA, "replicas": 2})
    first = compute(b, deployment(ready=0, available=0), None, None, timestamp=T0)
    again = compute(b, deployment(ready=0, available=0), None, first, timestamp=T1)
    assert again == first
    ready = compute(b, deployment(), None, again, timestamp=T2)
    times = {c["type"]: c["lastTransitionTime"] for c in ready["conditions"]}
    assert times == {"Ready": T2, "Progressing": T2, "Degraded": T0, "ToolCalling": T0}


def test_transitions_lists_only_changed_conditions() -> None:
    b = backend({**LLAMA, "replicas": 2})
    first = compute(b, None, None, None, timestamp=T0)
    assert [c["type"] for c in transitions(None, first)] == [
        "Ready",
        "Progressing",
        "Degraded",
        "ToolCalling",
    ]
    assert transitions(first, compute(b, None, None, first, timestamp=T1)) == []
    partly = compute(b, deployment(ready=0, updated=1, available=0), None, first, timestamp=T1)
    # Only the message moved (1/2 updated): news for the status, not worth an Event.
    assert partly["conditions"][1]["message"] == "rolling out: 1/2 updated, 0/2 replicas ready"
    assert transitions(first, partly) == []
    assert {c["type"] for c in transitions(partly, compute(b, deployment(), None, partly))} == {
        "Ready",
        "Progressing",
    }


def test_invalid_status_keeps_the_previous_ready_condition() -> None:
    previous = compute(backend({**LLAMA, "replicas": 2}), deployment(), None, None, timestamp=T0)
    failure = Failure("InvalidSpec", "spec.engine: Input should be 'vllm', ...")
    status = invalid_status(7, failure, previous, timestamp=T1)
    assert status["phase"] == "Invalid"
    assert status["observedGeneration"] == 7
    for kept in ("endpoint", "servedModelName", "ready", "selector", "replicas"):
        assert status[kept] == previous[kept]
    ready, progressing, degraded, _ = status["conditions"]
    assert {k: v for k, v in ready.items() if k != "observedGeneration"} == {
        k: v for k, v in previous["conditions"][0].items() if k != "observedGeneration"
    }
    assert ready["observedGeneration"] == 7
    assert (progressing["status"], progressing["reason"], progressing["lastTransitionTime"]) == (
        "False",
        "InvalidSpec",
        T0,
    )
    assert degraded == {
        "type": "Degraded",
        "status": "True",
        "reason": "InvalidSpec",
        "message": failure.message,
        "observedGeneration": 7,
        "lastTransitionTime": T1,
    }
    assert previous["phase"] == "Ready"


def test_invalid_status_without_previous() -> None:
    status = invalid_status(1, Failure("InvalidSpec", "bad"), None, timestamp=T0)
    assert status["phase"] == "Invalid" and "endpoint" not in status
    assert status["conditions"][0] == {
        "type": "Ready",
        "status": "False",
        "reason": "InvalidSpec",
        "message": "bad",
        "observedGeneration": 1,
        "lastTransitionTime": T0,
    }


# --- store ------------------------------------------------------------------------------


def obj(rv: str | None, name: str = "m", ns: str = "ns", tag: str = "") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if rv is not None:
        meta["resourceVersion"] = rv
    return {"metadata": meta, "tag": tag}


def test_store_keeps_the_newest_version() -> None:
    store = new_store()
    store.put("Deployment", obj("10", tag="a"))
    store.put("Deployment", obj("9", tag="older"))
    assert store.get("Deployment", "ns", "m") == obj("10", tag="a")
    store.put("Deployment", obj("10", tag="same"))
    assert store.get("Deployment", "ns", "m") == obj("10", tag="same")
    store.put("Deployment", obj("11", tag="newer"))
    assert store.get("Deployment", "ns", "m") == obj("11", tag="newer")
    store.put("Deployment", obj(None, tag="unversioned"))
    assert store.get("Deployment", "ns", "m") == obj(None, tag="unversioned")


def test_store_keys_and_delete() -> None:
    store = new_store()
    store.put("Deployment", obj("1"))
    store.put("Service", obj("1"))
    store.put("Deployment", obj("1", name="n"))
    assert (store.count("Deployment"), store.count("Service")) == (2, 1)
    assert store.get("Deployment", "other", "m") is None
    store.delete("Deployment", "ns", "m")
    store.delete("Deployment", "ns", "absent")
    assert store.get("Deployment", "ns", "m") is None
    assert store.get("Service", "ns", "m") == obj("1")
    assert store.count("Deployment") == 1
    assert Store.key("Node", {"metadata": {"name": "x"}}) == ("Node", "", "x")


# --- work queue -------------------------------------------------------------------------


async def _nothing_within(queue: WorkQueue[str], seconds: float = 0.05) -> bool:
    try:
        await asyncio.wait_for(queue.get(), seconds)
    except TimeoutError:
        return True
    return False


def test_adds_are_deduplicated() -> None:
    async def run() -> None:
        q: WorkQueue[str] = WorkQueue()
        for key in ("a", "b", "a", "a"):
            q.add(key)
        assert len(q) == 2
        assert [await q.get(), await q.get()] == ["a", "b"]
        assert len(q) == 0
        assert await _nothing_within(q)

    asyncio.run(run())


def test_key_added_while_processing_comes_back_after_done() -> None:
    async def run() -> None:
        q: WorkQueue[str] = WorkQueue()
        q.add("a")
        assert await q.get() == "a"
        q.add("a")
        q.add("a")
        assert len(q) == 1
        assert await _nothing_within(q), "a key must not go to two workers at once"
        q.done("a")
        assert await asyncio.wait_for(q.get(), 1) == "a"
        q.done("a")
        assert await _nothing_within(q)

    asyncio.run(run())


def test_retry_backoff_doubles_up_to_the_max() -> None:
    async def run() -> None:
        q: WorkQueue[str] = WorkQueue(base_delay=1.0, max_delay=5.0)
        assert [q.retry("a") for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
        assert q.retry("b") == 1.0
        q.forget("a")
        assert q.retry("a") == 1.0
        q.drop("a")
        q.drop("b")

    asyncio.run(run())


def test_retry_adds_the_key_back_after_the_delay() -> None:
    async def run() -> None:
        q: WorkQueue[str] = WorkQueue(base_delay=0.02)
        assert q.retry("a") == 0.02
        assert len(q) == 0
        assert await asyncio.wait_for(q.get(), 1) == "a"

    asyncio.run(run())


def test_add_after_keeps_the_earlier_timer() -> None:
    async def run() -> None:
        q: WorkQueue[str] = WorkQueue()
        q.add_after("a", 0.02)
        q.add_after("a", 30)
        q.add_after("b", 30)
        q.add_after("b", 0.02)
        got = {await asyncio.wait_for(q.get(), 1), await asyncio.wait_for(q.get(), 1)}
        assert got == {"a", "b"}
        q.drop("a")
        q.drop("b")

    asyncio.run(run())


def test_drop_cancels_timers_and_backoff() -> None:
    async def run() -> None:
        q: WorkQueue[str] = WorkQueue(base_delay=0.02)
        q.retry("a")
        q.retry("a")
        q.drop("a")
        await asyncio.sleep(0.1)
        assert len(q) == 0
        assert await _nothing_within(q)
        assert q.retry("a") == 0.02
        q.drop("a")

    asyncio.run(run())


def test_store_keeps_pods_without_their_spec() -> None:
    store = new_store()
    pod = {
        "metadata": {"name": "p", "namespace": "n", "labels": {"llm.fabric.dev/backend": "b"}},
        "spec": {"containers": [{"name": "engine", "image": "x"}]},
        "status": {"phase": "Running"},
    }
    store.put("Pod", pod)
    [kept] = store.owned("Pod", "n", "b")
    assert "spec" not in kept and kept["status"] == {"phase": "Running"}
    assert "spec" in pod  # the caller's object is untouched


def test_named_lists_match_by_name_in_any_order_with_others_entries_left_alone() -> None:
    desired = {"env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]}
    shuffled = {
        "env": [
            {"name": "X", "value": "sidecar"},
            {"name": "B", "value": "2"},
            {"name": "A", "value": "1"},
        ]
    }
    assert contains(shuffled, desired)
    assert not contains({"env": [{"name": "A", "value": "1"}]}, desired)  # ours removed
    assert not contains(
        {"env": [{"name": "A", "value": "9"}, {"name": "B", "value": "2"}]}, desired
    )
    assert not contains({"args": ["--b", "--a"]}, {"args": ["--a", "--b"]})  # args keep order
