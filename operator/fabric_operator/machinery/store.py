"""What the watches delivered: the latest copy of every object the operator looks at.

Reconciles read from here instead of the API. Writes the operator makes are put back
here at once (write-through), so a reconcile that runs before the watch echoes a write
does not see the old copy and write again.

Objects are held as compact JSON, deflated, not as the parsed dicts the watches deliver:
a tenth of their memory, and none of it shared with kopf's parsed listing. Sharing is
what kept a restart's memory: whatever outlives a parsed listing pins the allocator
arenas it was parsed into, so after listing 1,000 Deployments (33 MB parsed,
managedFields included) most of it stayed resident. `get` parses a fresh dict each time
(tens of µs), which the caller may change without changing the store.
"""

from __future__ import annotations

import json
import threading
import zlib
from collections.abc import Collection
from typing import Any, NamedTuple

Key = tuple[str, str, str]  # kind, namespace, name


def resource_version(value: Any) -> int | None:
    """A resourceVersion as the number it is (etcd's revision), for ordering; None if not."""
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def _version(obj: dict[str, Any]) -> int | None:
    return resource_version((obj.get("metadata") or {}).get("resourceVersion"))


def _owner(obj: dict[str, Any], label: str) -> str | None:
    owner = ((obj.get("metadata") or {}).get("labels") or {}).get(label)
    return str(owner) if owner else None


def _own(text: str) -> str:
    """An equal string that is not the parsed listing's object (see the module's doc)."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "surrogatepass")


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


class _Held(NamedTuple):
    version: int | None
    owner: str | None
    data: bytes  # the slimmed object as compact, deflated JSON


def _encode(obj: dict[str, Any]) -> bytes:
    # ASCII JSON (\u escapes keep any string as it was), deflated at the fastest level:
    # a Deployment's 2.6 KB become 1.1 KB for about 20 µs.
    return zlib.compress(json.dumps(obj, separators=(",", ":")).encode("ascii"), 1)


def _decode(data: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(zlib.decompress(data))
    return obj


class Store:
    """Objects by (kind, namespace, name), and by the owner named in their `owner_label`
    (an owner's pods without scanning them all). Objects of a kind in `specless` are held
    without their spec, for a controller that reads only their metadata and status."""

    def __init__(self, owner_label: str, *, specless: Collection[str] = ()) -> None:
        self.owner_label = owner_label
        self.specless = frozenset(specless)
        self._objects: dict[Key, _Held] = {}
        # (kind, namespace, owner) -> names
        self._owned: dict[Key, set[str]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(kind: str, obj: dict[str, Any]) -> Key:
        meta = obj.get("metadata") or {}
        return kind, meta.get("namespace") or "", meta.get("name") or ""

    def put(self, kind: str, obj: dict[str, Any]) -> None:
        """Keep `obj` (slimmed) unless the store already holds a newer version of it."""
        obj = slim(obj)
        if kind in self.specless:
            obj = {k: v for k, v in obj.items() if k != "spec"}
        _, namespace, name = self.key(kind, obj)
        key = (kind, _own(namespace), _own(name))  # a held key keeps its own strings
        owner = _owner(obj, self.owner_label)
        new = _Held(_version(obj), _own(owner) if owner else None, _encode(obj))
        with self._lock:
            held = self._objects.get(key)
            old = held.version if held else None
            if old is not None and new.version is not None and new.version < old:
                return
            self._objects[key] = new
            if held and held.owner and held.owner != new.owner:
                self._disown(kind, key[1], held.owner, key[2])
            if new.owner:
                self._owned.setdefault((kind, key[1], new.owner), set()).add(key[2])

    def _disown(self, kind: str, namespace: str, owner: str, name: str) -> None:
        names = self._owned.get((kind, namespace, owner), set())
        names.discard(name)
        if not names:
            self._owned.pop((kind, namespace, owner), None)

    def delete(self, kind: str, namespace: str, name: str, uid: str | None = None) -> bool:
        """Forget the object; given a uid, only if the one held is that object. kopf hands
        each uid's events to a worker of its own, so the DELETED event of an object can
        be handled after the ADDED event of a new one of the same name: the new one stays.
        True if something was forgotten."""
        key = (kind, namespace, name)
        with self._lock:
            held = self._objects.get(key)
            if held is None:
                return False
            if uid is not None and (_decode(held.data).get("metadata") or {}).get("uid") != uid:
                return False
            del self._objects[key]
            if held.owner:
                self._disown(kind, namespace, held.owner, name)
            return True

    def owned(self, kind: str, namespace: str, owner: str) -> list[dict[str, Any]]:
        """Objects of `kind` whose `owner_label` names `owner`."""
        with self._lock:
            names = self._owned.get((kind, namespace, owner), set())
            held = [self._objects.get((kind, namespace, n)) for n in sorted(names)]
        return [_decode(h.data) for h in held if h is not None]

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A fresh copy of the object, or None."""
        with self._lock:
            held = self._objects.get((kind, namespace, name))
        return None if held is None else _decode(held.data)

    def has(self, kind: str, namespace: str, name: str) -> bool:
        with self._lock:
            return (kind, namespace, name) in self._objects

    def names(self, kind: str) -> list[tuple[str, str]]:
        """(namespace, name) of every object of `kind`."""
        with self._lock:
            return [(k[1], k[2]) for k in self._objects if k[0] == kind]

    def absent_from(
        self,
        kind: str,
        namespace: str | None,
        listed: Collection[tuple[str, str]],
        version: int | None,
    ) -> list[dict[str, Any]]:
        """What a complete listing of `kind` (in `namespace`, or everywhere) lacks though it
        is held here: deleted unseen. Objects newer than the listing (written through since
        it was taken) are not counted."""
        with self._lock:
            gone = [
                held
                for (k, ns, name), held in self._objects.items()
                if k == kind
                and (namespace is None or ns == namespace)
                and (ns, name) not in listed
                and (version is None or held.version is None or held.version <= version)
            ]
        return [_decode(h.data) for h in gone]

    def count(self, kind: str) -> int:
        with self._lock:
            return sum(1 for k in self._objects if k[0] == kind)
