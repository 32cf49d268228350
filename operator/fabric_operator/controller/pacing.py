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

SPEC_HASH = "llm.fabric.dev/spec-hash"
TEMPLATE_HASH = "llm.fabric.dev/template-hash"
# An admitted rollout counts until its Deployment shows it (the store lags the write).
ADMIT_GRACE_SECONDS = 60.0

Key = tuple[str, str]


def _hash(value: Any) -> str:
    data = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def spec_hash(backend: LLMBackend) -> str:
    """The user's spec, but for what the autoscaler writes (replicas)."""
    return _hash(backend.spec.model_dump(by_alias=True, exclude={"replicas"}))


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
    if SPEC_HASH in notes:
        return bool(notes[SPEC_HASH] == wanted[SPEC_HASH])
    # Written by an earlier version: the spec was applied if status says so.
    return bool(observed_generation == backend.generation)


def rolling(deployment: dict[str, Any]) -> bool:
    """A Deployment still rolling out (not all replicas updated and available), unless it
    gave up (ProgressDeadlineExceeded): a stuck backend must not hold the others forever."""
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    desired = int(spec.get("replicas", 1) or 0)
    if desired == 0:
        return False
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return False
    generation = int((deployment.get("metadata") or {}).get("generation") or 0)
    complete = (
        int(status.get("observedGeneration") or 0) >= generation
        and int(status.get("updatedReplicas") or 0) == desired
        and int(status.get("availableReplicas") or 0) == desired
        and int(status.get("replicas") or 0) == desired
    )
    return not complete


class Pacer:
    """Admits operator-caused rollouts, `limit` at a time (0: no limit). Thread-safe: the
    reconcile workers are threads."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self._clock = limit, clock
        self._lock = threading.Lock()
        self._admitted: dict[Key, float] = {}

    def admit(self, key: Key, rolling_now: Iterable[Key]) -> tuple[bool, int]:
        """(admitted, how many others roll): `rolling_now` are the backends whose
        Deployments are rolling; those admitted lately count until theirs shows it."""
        if self.limit == 0:
            return True, 0
        with self._lock:
            now = self._clock()
            for k, at in list(self._admitted.items()):
                if now - at > ADMIT_GRACE_SECONDS:
                    del self._admitted[k]
            busy = (set(rolling_now) | set(self._admitted)) - {key}
            if len(busy) >= self.limit:
                return False, len(busy)
            self._admitted[key] = now
            return True, len(busy)
