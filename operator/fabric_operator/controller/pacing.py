"""Paced upgrades: a new operator version must not re-roll every GPU backend at once.

When this operator renders a backend's pod template differently while the backend's spec
did not change (a new pinned engine image, a new default, an image mirror in the config),
the rollout is the operator's, not the user's: at most `limit` backends roll at a time,
the others wait with status saying so. A spec change by the user is never held, and
neither is a change of replicas (the autoscaler's): a held backend still scales.

Which is which is read off two annotations the reconciler writes on each Deployment: the
hash of the spec it was rendered from (replicas left out) and the hash of the rendered pod
template. A Deployment written by an earlier version has neither: its template change is
taken as the operator's when status.observedGeneration says the spec was already applied.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from fabric_operator.api.backend import LLMBackend
from fabric_operator.controller.diff import contains

SPEC_HASH = "llm.fabric.dev/spec-hash"
TEMPLATE_HASH = "llm.fabric.dev/template-hash"
# An admitted rollout counts until its Deployment runs the new template, ready again (the
# store lags the write); at most this long (a backstop for a lost watch event).
ADMIT_GRACE_SECONDS = 3600.0

Key = tuple[str, str]


def _hash(value: Any) -> str:
    data = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()[:16]


# Spec fields that do not shape the pods: a change to them alone is not the user's
# rollout, so it must not carry the operator's pending one through unpaced.
NOT_POD_FIELDS = frozenset(
    {"replicas", "service", "fallback", "routing", "autoscaling", "network_policy", "strategy"}
)


def spec_hash(backend: LLMBackend) -> str:
    """What the user wrote of the fields that shape the pods (fields left unset stay out,
    so a field or default added by a later version changes nothing here)."""
    return _hash(
        backend.spec.model_dump(by_alias=True, exclude_unset=True, exclude=set(NOT_POD_FIELDS))
    )


def template_hash(deployment: dict[str, Any]) -> str:
    return _hash(deployment["spec"]["template"])


def annotate(deployment: dict[str, Any], backend: LLMBackend) -> None:
    """Write both hashes into a rendered Deployment (before its config hash is taken)."""
    notes = deployment["metadata"].setdefault("annotations", {})
    notes[SPEC_HASH] = spec_hash(backend)
    notes[TEMPLATE_HASH] = template_hash(deployment)


def is_upgrade(
    backend: LLMBackend,
    desired: dict[str, Any],
    live: dict[str, Any] | None,
    observed_generation: Any,
) -> bool:
    """Whether applying `desired` over `live` rolls the pods for the operator's reasons."""
    if live is None or backend.spec.replicas == 0:
        return False  # nothing runs: nothing to pace
    notes = (live.get("metadata") or {}).get("annotations") or {}
    wanted = desired["metadata"]["annotations"]
    if notes.get(TEMPLATE_HASH) == wanted[TEMPLATE_HASH]:
        return False  # the pods stay as they are (replicas, labels, drift)
    if TEMPLATE_HASH not in notes and contains(
        (live.get("spec") or {}).get("template") or {}, desired["spec"]["template"]
    ):
        return False  # written by an earlier version, and the pods would not change
    if SPEC_HASH in notes:
        return bool(notes[SPEC_HASH] == wanted[SPEC_HASH])
    # Written by an earlier version (no hashes yet): the spec was applied if status says so;
    # the reconciler then writes the spec hash beside the held Deployment, so this guess
    # is made once.
    return bool(observed_generation == backend.generation)


def rolled(deployment: dict[str, Any] | None, template: str) -> bool:
    """Whether `deployment` runs `template` (a TEMPLATE_HASH) on all its replicas, ready
    again: the rollout admitted for it is over. One that does not get there (a broken new
    image) keeps its slot: an upgrade that breaks backends halts instead of marching on."""
    if deployment is None:
        return True  # gone: nothing rolls
    notes = (deployment.get("metadata") or {}).get("annotations") or {}
    desired = int((deployment.get("spec") or {}).get("replicas", 1) or 0)
    available = int((deployment.get("status") or {}).get("availableReplicas") or 0)
    return notes.get(TEMPLATE_HASH) == template and not rolling(deployment) and available >= desired


def rolling(deployment: dict[str, Any]) -> bool:
    """A Deployment in a rollout: a template its controller has not seen yet, replicas not
    all updated, or old ones still there. Not one that merely lacks available replicas (a
    crash loop, a lost node, a scale-up waiting for GPUs: no rollout ends those), nor one
    that gave up (ProgressDeadlineExceeded): they must not hold every upgrade forever."""
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    desired = int(spec.get("replicas", 1) or 0)
    if desired == 0:
        return False
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return False
    generation = int((deployment.get("metadata") or {}).get("generation") or 0)
    return (
        int(status.get("observedGeneration") or 0) < generation
        or int(status.get("updatedReplicas") or 0) < desired
        or int(status.get("replicas") or 0) > desired
    )


class Pacer:
    """Admits operator-caused rollouts, `limit` at a time (0: no limit). Thread-safe: the
    reconcile workers are threads."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self._clock = limit, clock
        self._lock = threading.Lock()
        self._admitted: dict[Key, tuple[float, str]] = {}  # when, and to which template

    def admit(
        self,
        key: Key,
        template: str,
        rolling_now: Iterable[Key],
        done: Callable[[Key, str], bool],
    ) -> tuple[bool, int]:
        """(admitted, how many others roll): `rolling_now` are the backends whose
        Deployments are rolling; one admitted counts until `done(key, template)` says its
        Deployment runs that template everywhere (the watch may not have shown the write
        yet)."""
        if self.limit == 0:
            return True, 0
        with self._lock:
            now = self._clock()
            for k, (at, wanted) in list(self._admitted.items()):
                if now - at > ADMIT_GRACE_SECONDS or (k != key and done(k, wanted)):
                    del self._admitted[k]
            busy = (set(rolling_now) | set(self._admitted)) - {key}
            if len(busy) >= self.limit:
                return False, len(busy)
            self._admitted[key] = (now, template)
            return True, len(busy)

    def release(self, key: Key) -> None:
        """An admitted rollout that did not start (the Deployment was not written)."""
        with self._lock:
            self._admitted.pop(key, None)
