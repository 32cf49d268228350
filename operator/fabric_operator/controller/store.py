"""What the watches delivered: the latest copy of every object the operator looks at.

Reconciles read from here instead of the API. Writes the operator makes are put back
here at once (write-through), so a reconcile that runs before the watch echoes a write
does not see the old copy and write again.
"""

from __future__ import annotations

import threading
from typing import Any

from fabric_operator.render.workload import BACKEND_LABEL

Key = tuple[str, str, str]  # kind, namespace, name


def _version(obj: dict[str, Any]) -> int | None:
    try:
        return int(str((obj.get("metadata") or {}).get("resourceVersion")))
    except (TypeError, ValueError):
        return None


def _owner(obj: dict[str, Any]) -> str | None:
    # Children and pods carry their LLMBackend's name in this label.
    owner = ((obj.get("metadata") or {}).get("labels") or {}).get(BACKEND_LABEL)
    return str(owner) if owner else None


LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def slim(obj: dict[str, Any]) -> dict[str, Any]:
    """The object without what the operator never reads but that weighs the most:
    managedFields (server-side apply bookkeeping) and kubectl's last-applied copy."""
    meta = obj.get("metadata")
    if not meta or (
        "managedFields" not in meta and LAST_APPLIED not in (meta.get("annotations") or {})
    ):
        return obj
    meta = {k: v for k, v in meta.items() if k != "managedFields"}
    annotations = meta.get("annotations")
    if annotations and LAST_APPLIED in annotations:
        meta["annotations"] = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
    return {**obj, "metadata": meta}


class Store:
    def __init__(self) -> None:
        self._objects: dict[Key, dict[str, Any]] = {}
        # (kind, namespace, backend) -> names: a backend's pods without scanning them all.
        self._owned: dict[Key, set[str]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(kind: str, obj: dict[str, Any]) -> Key:
        meta = obj.get("metadata") or {}
        return kind, meta.get("namespace") or "", meta.get("name") or ""

    def put(self, kind: str, obj: dict[str, Any]) -> None:
        """Keep `obj` (slimmed) unless the store already holds a newer version of it."""
        obj = slim(obj)
        if kind == "Pod":  # only diagnose reads pods, and only their metadata and status
            obj = {k: v for k, v in obj.items() if k != "spec"}
        key = self.key(kind, obj)
        with self._lock:
            held = self._objects.get(key)
            new, old = _version(obj), _version(held) if held else None
            if held is None or new is None or old is None or new >= old:
                self._objects[key] = obj
                owner = _owner(obj)
                if owner:
                    self._owned.setdefault((kind, key[1], owner), set()).add(key[2])

    def delete(self, kind: str, namespace: str, name: str) -> None:
        with self._lock:
            obj = self._objects.pop((kind, namespace, name), None)
            owner = _owner(obj) if obj else None
            if owner:
                names = self._owned.get((kind, namespace, owner), set())
                names.discard(name)
                if not names:
                    self._owned.pop((kind, namespace, owner), None)

    def owned(self, kind: str, namespace: str, backend: str) -> list[dict[str, Any]]:
        """Objects of `kind` labelled as belonging to the LLMBackend `backend`."""
        with self._lock:
            names = self._owned.get((kind, namespace, backend), set())
            return [
                self._objects[(kind, namespace, n)]
                for n in sorted(names)
                if (kind, namespace, n) in self._objects
            ]

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._objects.get((kind, namespace, name))

    def names(self, kind: str) -> list[tuple[str, str]]:
        """(namespace, name) of every object of `kind`."""
        with self._lock:
            return [(k[1], k[2]) for k in self._objects if k[0] == kind]

    def count(self, kind: str) -> int:
        with self._lock:
            return sum(1 for k in self._objects if k[0] == kind)
