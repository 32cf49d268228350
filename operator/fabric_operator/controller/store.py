"""What the watches delivered: the latest copy of every object the operator looks at.

Reconciles read from here instead of the API. Writes the operator makes are put back
here at once (write-through), so a reconcile that runs before the watch echoes a write
does not see the old copy and write again.
"""

from __future__ import annotations

import threading
from typing import Any

Key = tuple[str, str, str]  # kind, namespace, name


def _version(obj: dict[str, Any]) -> int | None:
    try:
        return int(str((obj.get("metadata") or {}).get("resourceVersion")))
    except (TypeError, ValueError):
        return None


class Store:
    def __init__(self) -> None:
        self._objects: dict[Key, dict[str, Any]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(kind: str, obj: dict[str, Any]) -> Key:
        meta = obj.get("metadata") or {}
        return kind, meta.get("namespace") or "", meta.get("name") or ""

    def put(self, kind: str, obj: dict[str, Any]) -> None:
        """Keep `obj` unless the store already holds a newer version of it."""
        key = self.key(kind, obj)
        with self._lock:
            held = self._objects.get(key)
            new, old = _version(obj), _version(held) if held else None
            if held is None or new is None or old is None or new >= old:
                self._objects[key] = obj

    def delete(self, kind: str, namespace: str, name: str) -> None:
        with self._lock:
            self._objects.pop((kind, namespace, name), None)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            return self._objects.get((kind, namespace, name))

    def count(self, kind: str) -> int:
        with self._lock:
            return sum(1 for k in self._objects if k[0] == kind)
