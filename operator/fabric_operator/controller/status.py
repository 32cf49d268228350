"""Compute an LLMBackend's status from what the operator observed: pure, so it is testable.

Conditions follow metav1.Condition; lastTransitionTime only moves when a condition's
status does, so re-computing an unchanged state yields an identical status (and no write).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fabric_operator.api.backend import LLMBackend
from fabric_operator.api.v1alpha1 import Phase
from fabric_operator.controller.diagnose import Diagnosis
from fabric_operator.render import toolcalls
from fabric_operator.render.workload import BACKEND_LABEL, endpoint

READY, PROGRESSING, DEGRADED = "Ready", "Progressing", "Degraded"
TOOL_CALLING = "ToolCalling"
CONDITION_TYPES = (READY, PROGRESSING, DEGRADED, TOOL_CALLING)
REASON_INVALID = "InvalidSpec"
REASON_APPLY_FAILED = "ApplyFailed"
REASON_UPGRADE_QUEUED = "UpgradeQueued"


@dataclass(frozen=True)
class Failure:
    """Why the operator could not (or would not) bring the children to the spec."""

    reason: str
    message: str
    retrying: bool = False  # a transient API error: nothing for the user to fix


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(type_: str, ok: bool | None, reason: str, message: str) -> dict[str, Any]:
    """`ok` None: Unknown."""
    # Never an empty message: the Python client sends "" in custom objects as null.
    message = message or reason
    return {
        "type": type_,
        "status": "Unknown" if ok is None else "True" if ok else "False",
        "reason": reason,
        "message": message,
    }


def _deployment_condition(deployment: dict[str, Any], type_: str) -> dict[str, Any]:
    for cond in (deployment.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return {}


def _rollout(
    backend: LLMBackend, deployment: dict[str, Any] | None, diagnosis: Diagnosis | None
) -> dict[str, Any]:
    """Ready/Progressing/Degraded and counts from the Deployment and pods as last observed.

    A pod-level diagnosis (Unschedulable, CrashLoopBackOff...) names the phase, so that
    `kubectl get llmb` says what is wrong without a describe."""
    desired = backend.spec.replicas
    st = (deployment or {}).get("status") or {}
    ready = int(st.get("readyReplicas") or 0)
    current = deployment is not None and int(st.get("observedGeneration") or 0) >= int(
        (deployment.get("metadata") or {}).get("generation") or 0
    )
    complete = (
        current
        and int(st.get("updatedReplicas") or 0) == desired
        and int(st.get("replicas") or 0) == desired
        and int(st.get("availableReplicas") or 0) == desired
    )
    progressing = _deployment_condition(deployment or {}, "Progressing")
    failure = _deployment_condition(deployment or {}, "ReplicaFailure")
    degraded: tuple[str, str] | None = None
    if diagnosis is not None and diagnosis.failing:
        degraded = (diagnosis.reason, diagnosis.message)
    elif progressing.get("reason") == "ProgressDeadlineExceeded":
        degraded = ("ProgressDeadlineExceeded", progressing.get("message", ""))
    elif failure.get("status") == "True":
        degraded = ("ReplicaFailure", failure.get("message", ""))

    counts = f"{ready}/{desired} replicas ready"
    if desired == 0:
        phase, ready_cond = Phase.STOPPED, _condition(READY, False, "ScaledToZero", counts)
    elif ready > 0:
        phase = Phase.READY if complete else Phase.PROGRESSING
        ready_cond = _condition(READY, True, "ReplicasReady", counts)
    elif diagnosis is not None:
        phase = Phase(diagnosis.reason)
        ready_cond = _condition(READY, False, diagnosis.reason, f"{counts}: {diagnosis.message}")
    else:
        phase, ready_cond = Phase.PENDING, _condition(READY, False, "NoReplicaReady", counts)
    if complete:
        prog_cond = _condition(PROGRESSING, False, "RolloutComplete", counts)
    else:
        prog_cond = _condition(
            PROGRESSING,
            True,
            "RollingOut",
            f"rolling out: {st.get('updatedReplicas') or 0}/{desired} updated, {counts}",
        )
    if degraded:
        phase = Phase(degraded[0]) if degraded[0] in Phase.__members__.values() else Phase.DEGRADED
        deg_cond = _condition(DEGRADED, True, *degraded)
    else:
        deg_cond = _condition(DEGRADED, False, "AsExpected", "no problem found")
    return {
        "phase": phase,
        "replicas": int(st.get("replicas") or 0),
        "readyReplicas": ready,
        "conditions": [ready_cond, prog_cond, deg_cond],
    }


def by_type(status: dict[str, Any] | None) -> dict[Any, dict[str, Any]]:
    """A status's conditions by type."""
    return {c.get("type"): c for c in (status or {}).get("conditions") or []}


def tool_calling(
    backend: LLMBackend, failure: Failure | None, previous: dict[str, Any] | None
) -> tuple[str | None, dict[str, Any]]:
    """status.toolCalling and the ToolCalling condition: agents fail on their first step
    where it is off, so the condition says why. With a refused spec the children were left
    as they were, and so is what is said of them (nothing yet for a new backend)."""
    if failure is not None:
        old = by_type(previous)
        if TOOL_CALLING in old:
            return (previous or {}).get("toolCalling"), dict(old[TOOL_CALLING])
        return None, _condition(
            TOOL_CALLING, None, failure.reason, "decided once the spec is accepted"
        )
    plan = toolcalls.plan(backend)
    return plan.summary, _condition(TOOL_CALLING, plan.enabled, plan.reason, plan.message)


def _without_unknown(status: dict[str, Any]) -> dict[str, Any]:
    """No status.toolCalling while nothing is known of it (a new backend refused), no
    status.lastStart before a pod exists."""
    return {
        k: v for k, v in status.items() if k not in ("toolCalling", "lastStart") or v is not None
    }


def _stamp(
    conditions: list[dict[str, Any]],
    previous: dict[str, Any] | None,
    generation: int | None,
    stamp: str,
) -> None:
    """Set observedGeneration, and keep each lastTransitionTime whose status held."""
    old = by_type(previous)
    for cond in conditions:
        cond["observedGeneration"] = generation
        before = old.get(cond["type"]) or {}
        held = before.get("status") == cond["status"] and "lastTransitionTime" in before
        cond["lastTransitionTime"] = before["lastTransitionTime"] if held else stamp


def compute(
    backend: LLMBackend,
    deployment: dict[str, Any] | None,
    failure: Failure | None,
    previous: dict[str, Any] | None,
    *,
    diagnosis: Diagnosis | None = None,
    cluster_domain: str = "cluster.local",
    timestamp: str | None = None,
    restarts: int = 0,
    last_start: dict[str, Any] | None = None,
    queued: str | None = None,
) -> dict[str, Any]:
    """The whole status; `previous` supplies transition times that did not change.
    `queued`: why an operator-caused rollout waits (paced upgrades)."""
    rollout = _rollout(backend, deployment, diagnosis)
    conditions = rollout["conditions"]
    if queued is not None:
        conditions[1] = _condition(PROGRESSING, False, REASON_UPGRADE_QUEUED, queued)
    phase = rollout["phase"]
    if failure is not None:
        phase = Phase.INVALID if failure.reason == REASON_INVALID else Phase.DEGRADED
        progressing = (
            _condition(PROGRESSING, True, "Retrying", "the API server refused for now; retrying")
            if failure.retrying
            else _condition(
                PROGRESSING,
                False,
                failure.reason,
                "the children were left as they were; fix the spec to continue",
            )
        )
        conditions = [
            conditions[0],
            progressing,
            _condition(DEGRADED, True, failure.reason, failure.message),
        ]
    tools, tools_condition = tool_calling(backend, failure, previous)
    conditions = [*conditions, tools_condition]
    _stamp(conditions, previous, backend.generation, timestamp or now())
    out = {
        "observedGeneration": backend.generation,
        "phase": str(phase),
        "endpoint": endpoint(backend, cluster_domain),
        "servedModelName": backend.served_model_name,
        "replicas": rollout["replicas"],
        "readyReplicas": rollout["readyReplicas"],
        "ready": f"{rollout['readyReplicas']}/{backend.spec.replicas}",
        "restarts": restarts,
        "lastStart": last_start,
        "selector": f"{BACKEND_LABEL}={backend.name}",
        "toolCalling": tools,
        "conditions": conditions,
    }
    return _without_unknown(out)


def remote_status(
    backend: LLMBackend,
    failure: Failure | None,
    previous: dict[str, Any] | None,
    timestamp: str | None = None,
) -> dict[str, Any]:
    """Status of a remote backend: no pods to watch, so Ready means a valid route."""
    remote = backend.spec.remote
    assert remote is not None
    if failure is None:
        phase = Phase.REMOTE
        conditions = [
            _condition(
                READY,
                True,
                "RemoteEndpoint",
                f"the gateway routes {backend.served_model_name} to {remote.provider} at "
                f"{remote.base_url}",
            ),
            _condition(PROGRESSING, False, "NoPods", "a remote backend runs no pods"),
            _condition(DEGRADED, False, "AsExpected", "no problem found"),
        ]
    else:
        phase = Phase.INVALID if failure.reason == REASON_INVALID else Phase.DEGRADED
        conditions = [
            _condition(READY, False, failure.reason, failure.message),
            _condition(PROGRESSING, False, failure.reason, "fix the spec to continue"),
            _condition(DEGRADED, True, failure.reason, failure.message),
        ]
    tools, tools_condition = tool_calling(backend, failure, previous)
    conditions = [*conditions, tools_condition]
    _stamp(conditions, previous, backend.generation, timestamp or now())
    out = {
        "observedGeneration": backend.generation,
        "phase": str(phase),
        "endpoint": remote.base_url,
        "servedModelName": backend.served_model_name,
        "toolCalling": tools,
        "conditions": conditions,
    }
    return _without_unknown(out)


def invalid_status(
    generation: int | None,
    failure: Failure,
    previous: dict[str, Any] | None,
    timestamp: str | None = None,
) -> dict[str, Any]:
    """Status of a backend whose spec cannot even be parsed: keep what was, flag the spec."""
    stamp = timestamp or now()
    old = by_type(previous)
    kept_ready = old.get(READY) or _condition(READY, False, REASON_INVALID, failure.message)
    conditions = [
        dict(kept_ready),
        _condition(PROGRESSING, False, failure.reason, "fix the spec to continue"),
        _condition(DEGRADED, True, failure.reason, failure.message),
    ]
    if TOOL_CALLING in old:  # what the running pods were started with still holds
        conditions.append(dict(old[TOOL_CALLING]))
    _stamp(conditions, previous, generation, stamp)
    out = {k: v for k, v in (previous or {}).items() if k != "conditions"}
    out.update(observedGeneration=generation, phase=str(Phase.INVALID), conditions=conditions)
    return out


# Reasons whose message is the user's own doing (a new spec mistake is news); other
# messages change as the cluster moves (the scheduler's node counts) and are not.
MESSAGE_MATTERS = {REASON_INVALID, REASON_APPLY_FAILED}


def transitions(previous: dict[str, Any] | None, current: dict[str, Any]) -> list[dict[str, Any]]:
    """Conditions that changed status or reason: each one is worth one Event."""
    old = by_type(previous)
    changed = []
    for cond in current.get("conditions") or []:
        before = old.get(cond["type"], {})
        keys = (
            ("status", "reason", "message")
            if cond.get("reason") in MESSAGE_MATTERS
            else ("status", "reason")
        )
        if any(before.get(k) != cond.get(k) for k in keys):
            changed.append(cond)
    return changed
