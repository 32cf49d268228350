"""Where the newest pod's start went (status.lastStart): pure, from what pods report.

A model's start is minutes of scheduling (a GPU node), image pull (tens of GB), weight
download and load; users ask which. The pod says it already: its creation, the
PodScheduled and Initialized conditions (init containers: the preload or Ollama's pull),
the engine container's startedAt (after its image is pulled) and the Ready condition.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fabric_operator.render.workload import CONTAINER_NAME


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _condition_time(pod: dict[str, Any], type_: str) -> datetime | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_ and cond.get("status") == "True":
            return _time(cond.get("lastTransitionTime"))
    return None


def _engine_started(pod: dict[str, Any]) -> datetime | None:
    """When the engine container's first run started; None after a restart (startedAt is
    then the restart's, which says nothing of the pod's start)."""
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == CONTAINER_NAME and not cs.get("restartCount"):
            return _time(((cs.get("state") or {}).get("running") or {}).get("startedAt"))
    return None


def _seconds(later: datetime | None, earlier: datetime | None) -> int | None:
    if later is None or earlier is None:
        return None
    return max(0, round((later - earlier).total_seconds()))


def last_start(
    pods: list[dict[str, Any]], previous: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """status.lastStart of the newest pod not being deleted; None without one. A start
    measured to the end (`previous`, of the same pod) stays as it was: a later readiness
    flap or restart moves the pod's times, not how its start went."""
    live = [
        p
        for p in pods
        if not (p.get("metadata") or {}).get("deletionTimestamp")
        and _time((p.get("metadata") or {}).get("creationTimestamp")) is not None
    ]
    if not live:
        return None
    pod = max(live, key=lambda p: (p["metadata"]["creationTimestamp"], p["metadata"].get("name")))
    if (
        previous is not None
        and previous.get("pod") == pod["metadata"].get("name")
        and "totalSeconds" in previous
    ):
        return previous
    created = _time(pod["metadata"]["creationTimestamp"])
    scheduled = _condition_time(pod, "PodScheduled")
    initialized = _condition_time(pod, "Initialized")
    started = _engine_started(pod)
    # Ready moves on a later readiness failure; until the engine runs, it says nothing.
    ready = _condition_time(pod, "Ready") if started else None
    if ready is not None and started is not None and ready < started:
        ready = None
    init_done = max(filter(None, (scheduled, initialized)), default=None)
    out = {
        "pod": pod["metadata"].get("name"),
        "created": pod["metadata"]["creationTimestamp"],
        "scheduledSeconds": _seconds(scheduled, created),
        "initSeconds": _seconds(initialized, scheduled),
        "startedSeconds": _seconds(started, init_done),
        "readySeconds": _seconds(ready, started),
        "totalSeconds": _seconds(ready, created),
    }
    return {k: v for k, v in out.items() if v is not None}
