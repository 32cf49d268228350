"""Why an LLMBackend's pods are not serving, in one stable reason: pure, from pod status.

Kubernetes scatters the answer over pod conditions (the scheduler's message), container
states (waiting reasons, last termination) and init containers; users should not have to
dig. The worst problem across the pods wins.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

UNSCHEDULABLE = "Unschedulable"
IMAGE_PULL = "ImagePullBackOff"
CRASH_LOOP = "CrashLoopBackOff"
OOM_KILLED = "OOMKilled"
CONFIG_ERROR = "CreateContainerConfigError"
LOADING = "Loading"
STARTING = "Starting"
# Failures, most actionable first; Loading and Starting are not failures (they take time).
FAILURES = (CONFIG_ERROR, IMAGE_PULL, OOM_KILLED, CRASH_LOOP, UNSCHEDULABLE)
_PULL_REASONS = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"}
_CONFIG_REASONS = {"CreateContainerConfigError", "CreateContainerError"}


@dataclass(frozen=True)
class Diagnosis:
    reason: str
    message: str

    @property
    def failing(self) -> bool:
        return self.reason in FAILURES


def _containers(pod: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
    status = pod.get("status") or {}
    for kind in ("initContainerStatuses", "containerStatuses"):
        for cs in status.get(kind) or []:
            prefix = "init container " if kind == "initContainerStatuses" else "container "
            yield prefix + str(cs.get("name")), cs


def _pod_problem(pod: dict[str, Any]) -> Diagnosis | None:
    name = (pod.get("metadata") or {}).get("name", "?")
    found: list[Diagnosis] = []
    for what, cs in _containers(pod):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        last = (cs.get("lastState") or {}).get("terminated") or {}
        reason = waiting.get("reason")
        detail = waiting.get("message") or ""
        if reason in _PULL_REASONS:
            found.append(Diagnosis(IMAGE_PULL, f"pod {name} {what}: {reason}: {detail}".strip()))
        elif reason in _CONFIG_REASONS:
            found.append(Diagnosis(CONFIG_ERROR, f"pod {name} {what}: {detail}".strip()))
        elif last.get("reason") == "OOMKilled" and not cs.get("ready"):
            # lastState keeps an old OOM until the next restart: news only while not ready
            found.append(
                Diagnosis(
                    OOM_KILLED,
                    f"pod {name} {what} was OOMKilled "
                    f"({cs.get('restartCount', 0)} restarts): raise "
                    "spec.resources.limits.memory",
                )
            )
        elif reason == "CrashLoopBackOff":
            code = last.get("exitCode")
            # A container that failed to start has no logs: its termination says why.
            why = ": ".join(str(last[k])[:300] for k in ("reason", "message") if last.get(k))
            found.append(
                Diagnosis(
                    CRASH_LOOP,
                    f"pod {name} {what} keeps exiting"
                    f"{f' with code {code}' if code is not None else ''} "
                    f"({cs.get('restartCount', 0)} restarts): "
                    f"{why + '; ' if why and why != 'Error' else ''}see kubectl logs",
                )
            )
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if (
            cond.get("type") == "PodScheduled"
            and cond.get("status") == "False"
            and cond.get("reason") == "Unschedulable"
        ):
            found.append(Diagnosis(UNSCHEDULABLE, f"pod {name}: {cond.get('message', '')}"))
    if found:
        return min(found, key=lambda d: FAILURES.index(d.reason))
    return None


def _loading(pod: dict[str, Any]) -> bool:
    """Running (started, not crashed) but not ready yet: the model is loading."""
    status = pod.get("status") or {}
    if status.get("phase") != "Running":
        return False
    ready = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    return ready.get("Ready") != "True"


def _starting(pod: dict[str, Any]) -> str | None:
    """What a scheduled pod that is not running yet waits for (an image pull of an engine
    takes minutes: users should see it is under way, not a bare 0/1), else None."""
    status = pod.get("status") or {}
    scheduled = any(
        c.get("type") == "PodScheduled" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    if status.get("phase", "Pending") != "Pending" or not scheduled:
        return None
    for what, cs in _containers(pod):
        reason = ((cs.get("state") or {}).get("waiting") or {}).get("reason")
        if reason:
            return f"{what} {reason}"
    return "waiting for the node to start its containers"


def diagnose(pods: Iterable[dict[str, Any]]) -> Diagnosis | None:
    """The most actionable problem of the pods, else Loading, else Starting, else None."""
    live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    problems = [d for d in map(_pod_problem, live) if d is not None]
    if problems:
        return min(problems, key=lambda d: FAILURES.index(d.reason))
    loading = [p for p in live if _loading(p)]
    if loading:
        name = loading[0]["metadata"]["name"]
        return Diagnosis(
            LOADING,
            f"pod {name} is running and loading the model (the startup probe allows long loads)",
        )
    for p in live:
        if (waits := _starting(p)) is not None:
            name = p["metadata"]["name"]
            host = (p.get("status") or {}).get("hostIP")
            on = f" on {host}" if host else ""
            return Diagnosis(
                STARTING,
                f"pod {name} is scheduled{on} and starting: {waits} "
                "(the first pull of an engine image can take minutes)",
            )
    return None
