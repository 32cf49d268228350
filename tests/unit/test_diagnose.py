"""Pod status → one stable reason, and what the LLMBackend status makes of it."""

from __future__ import annotations

from typing import Any

import pytest

from fabric_operator.api.backend import LLMBackend
from fabric_operator.controller.diagnose import diagnose
from fabric_operator.controller.status import compute, transitions

SCHEDULER = (
    "0/3 nodes are available: 1 Insufficient nvidia.com/gpu, 2 node(s) didn't match node selector."
)


def pod(
    name: str = "p",
    *,
    phase: str = "Pending",
    ready: bool = False,
    waiting: str | None = None,
    message: str = "",
    last: dict[str, Any] | None = None,
    unschedulable: bool = False,
    scheduled: bool = False,
    init: bool = False,
    deleting: bool = False,
) -> dict[str, Any]:
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    if unschedulable:
        conditions.append(
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": SCHEDULER,
            }
        )
    if scheduled:
        conditions.append({"type": "PodScheduled", "status": "True"})
    cs: dict[str, Any] = {
        "name": "engine",
        "restartCount": 4,
        "ready": ready,
        "state": {"waiting": {"reason": waiting, "message": message}}
        if waiting
        else {"running": {}},
    }
    if last:
        cs["lastState"] = {"terminated": last}
    meta: dict[str, Any] = {"name": name}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    key = "initContainerStatuses" if init else "containerStatuses"
    return {"metadata": meta, "status": {"phase": phase, "conditions": conditions, key: [cs]}}


@pytest.mark.parametrize(
    ("pods", "reason", "words"),
    [
        (
            [pod(unschedulable=True)],
            "Unschedulable",
            "pod p: 0/3 nodes are available: 1 Insufficient nvidia.com/gpu",
        ),
        (
            [pod(waiting="ImagePullBackOff", message='Back-off pulling image "vllm:nope"')],
            "ImagePullBackOff",
            "container engine: ImagePullBackOff: Back-off pulling image",
        ),
        ([pod(waiting="ErrImagePull")], "ImagePullBackOff", "ErrImagePull"),
        (
            [pod(phase="Running", waiting="CrashLoopBackOff", last={"exitCode": 3})],
            "CrashLoopBackOff",
            "keeps exiting with code 3 (4 restarts)",
        ),
        (
            [
                pod(
                    phase="Running",
                    waiting="CrashLoopBackOff",
                    last={"exitCode": 137, "reason": "OOMKilled"},
                )
            ],
            "OOMKilled",
            "raise spec.resources.limits.memory",
        ),
        (
            [pod(waiting="CreateContainerConfigError", message='secret "k" not found')],
            "CreateContainerConfigError",
            'secret "k" not found',
        ),
        (
            [
                pod(
                    phase="Running",
                    waiting="CrashLoopBackOff",
                    last={"exitCode": 128, "reason": "StartError", "message": "no such flag"},
                )
            ],
            "CrashLoopBackOff",
            "code 128 (4 restarts): StartError: no such flag; see kubectl logs",
        ),
        (
            [pod(init=True, waiting="CrashLoopBackOff", last={"exitCode": 1})],
            "CrashLoopBackOff",
            "init container engine keeps exiting",
        ),
        ([pod(phase="Running")], "Loading", "loading the model"),
        # The most actionable problem wins over the others.
        (
            [pod("a", unschedulable=True), pod("b", waiting="ImagePullBackOff")],
            "ImagePullBackOff",
            "pod b",
        ),
        ([pod("a", phase="Running"), pod("b", unschedulable=True)], "Unschedulable", "pod b"),
        # Scheduled, not running yet: what it waits for (an engine image pull, say).
        (
            [pod(scheduled=True, waiting="ContainerCreating")],
            "Starting",
            "pod p is scheduled and starting: container engine ContainerCreating",
        ),
        (
            [pod(scheduled=True, init=True, waiting="PodInitializing")],
            "Starting",
            "init container engine PodInitializing",
        ),
        (
            [pod("a", scheduled=True, waiting="ContainerCreating"), pod("b", phase="Running")],
            "Loading",
            "pod b",
        ),
        (
            [pod("a", scheduled=True, waiting="ContainerCreating"), pod("b", unschedulable=True)],
            "Unschedulable",
            "pod b",
        ),
    ],
)
def test_diagnosis(pods: list[dict[str, Any]], reason: str, words: str) -> None:
    found = diagnose(pods)
    assert found is not None
    assert found.reason == reason
    assert words in found.message


def test_healthy_or_terminating_pods_need_no_diagnosis() -> None:
    assert diagnose([]) is None
    assert diagnose([pod(phase="Running", ready=True)]) is None
    assert diagnose([pod(unschedulable=True, deleting=True)]) is None


def test_a_scheduled_pod_without_container_statuses_is_starting() -> None:
    bare = {
        "metadata": {"name": "p"},
        "status": {
            "phase": "Pending",
            "hostIP": "10.0.0.7",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
        },
    }
    found = diagnose([bare])
    assert found is not None and not found.failing
    assert found.message.startswith("pod p is scheduled on 10.0.0.7 and starting: waiting")
    # Not scheduled yet (no condition at all): nothing to say beyond the counts.
    assert diagnose([{"metadata": {"name": "p"}, "status": {"phase": "Pending"}}]) is None


def backend(replicas: int = 1) -> LLMBackend:
    return LLMBackend.from_manifest(
        {
            "metadata": {"name": "m", "namespace": "n", "generation": 1},
            "spec": {
                "engine": "vllm",
                "model": {"huggingface": {"repo": "a/b"}},
                "resources": {"gpu": {"count": 16}},
                "replicas": replicas,
            },
        }
    )


def test_unschedulable_names_the_phase_and_degrades() -> None:
    status = compute(backend(), None, None, None, diagnosis=diagnose([pod(unschedulable=True)]))
    assert status["phase"] == "Unschedulable"
    ready, _, degraded, _ = status["conditions"]
    assert (ready["status"], ready["reason"]) == ("False", "Unschedulable")
    assert (degraded["status"], degraded["reason"]) == ("True", "Unschedulable")
    assert "Insufficient nvidia.com/gpu" in degraded["message"]


def test_loading_is_not_a_failure() -> None:
    status = compute(backend(), None, None, None, diagnosis=diagnose([pod(phase="Running")]))
    assert status["phase"] == "Loading"
    assert status["conditions"][0]["reason"] == "Loading"
    assert status["conditions"][2]["status"] == "False"


def test_serving_with_a_failing_replica_is_ready_but_degraded() -> None:
    deployment = {
        "metadata": {"generation": 1},
        "status": {
            "observedGeneration": 1,
            "replicas": 2,
            "readyReplicas": 1,
            "updatedReplicas": 2,
            "availableReplicas": 1,
        },
    }
    status = compute(
        backend(2),
        deployment,
        None,
        None,
        diagnosis=diagnose([pod("a", phase="Running", ready=True), pod("b", unschedulable=True)]),
    )
    assert status["conditions"][0]["status"] == "True"
    assert status["conditions"][2]["reason"] == "Unschedulable"
    assert status["phase"] == "Unschedulable"


def test_one_event_per_transition_even_when_the_scheduler_message_moves() -> None:
    first = compute(backend(), None, None, None, diagnosis=diagnose([pod(unschedulable=True)]))
    moved = pod(unschedulable=True)
    moved["status"]["conditions"][1]["message"] = "0/4 nodes are available: ..."
    second = compute(backend(), None, None, first, diagnosis=diagnose([moved]))
    assert second["conditions"][2]["message"] != first["conditions"][2]["message"]
    assert transitions(first, second) == []


def test_starting_is_a_phase_not_a_failure() -> None:
    starting = diagnose([pod(scheduled=True, waiting="ContainerCreating")])
    status = compute(backend(), None, None, None, diagnosis=starting)
    assert status["phase"] == "Starting"
    ready, _, degraded, _ = status["conditions"]
    assert (ready["status"], ready["reason"]) == ("False", "Starting")
    assert "ContainerCreating" in ready["message"]
    assert degraded["status"] == "False"
