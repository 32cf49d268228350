"""Decide, without asking the API, whether a child must be (re)applied or patched.

A child needs an apply when the watched copy is missing, lacks a field the rendering sets
(drift, or a server that dropped it), or carries another config hash (the spec changed,
including fields the new rendering no longer sets, which only an apply removes).
Fields the server or other controllers add to maps are ignored: the desired manifest only
needs to be *contained* in the observed object. Entries added to the keyed lists the
operator renders, and an order other than the rendered one, are what an apply cannot
undo: `lists` computes the JSON patch for them, and `needs_write` reports both.
"""

from __future__ import annotations

import hashlib
import json
from decimal import InvalidOperation
from typing import Any

from kubernetes.utils import parse_quantity

from fabric_operator.api.backend import LLMBackend
from fabric_operator.controller.lists import list_ops, snapshot

HASH_ANNOTATION = "llm.fabric.dev/config-hash"
# Keys whose values are resource quantities: the server rewrites them canonically.
_QUANTITY_PARENTS = {"limits", "requests"}
_QUANTITY_KEYS = {"sizeLimit"}


def config_hash(manifest: dict[str, Any]) -> str:
    data = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def with_bookkeeping(manifest: dict[str, Any], backend: LLMBackend) -> dict[str, Any]:
    """The manifest as applied: plus the owner reference and the config hash."""
    out: dict[str, Any] = json.loads(json.dumps(manifest))
    meta = out["metadata"]
    meta["ownerReferences"] = [backend.owner_reference()]
    meta.setdefault("annotations", {})[HASH_ANNOTATION] = config_hash(manifest)
    return out


def _same_quantity(a: Any, b: Any) -> bool:
    try:
        return bool(parse_quantity(a) == parse_quantity(b))  # type: ignore[no-untyped-call]
    except (ValueError, InvalidOperation, TypeError):
        return False


def contains(observed: Any, desired: Any, key: str = "", parent: str = "") -> bool:
    """True when every field of `desired` is in `observed` with an equal value.

    Maps may hold more keys than desired (server defaults, other managers). Lists of named
    entries are matched by name; other lists (args, tolerations) element by element.
    """
    if desired == {}:
        return True  # an empty map asks for nothing
    if isinstance(desired, str | list | type(None)) and not desired:
        # The API server drops empty strings and lists (omitempty): absent is equal.
        return observed is None or (isinstance(observed, str | list | dict) and not observed)
    if isinstance(desired, dict):
        if not isinstance(observed, dict):
            return False
        return all(contains(observed.get(k), v, k, key) for k, v in desired.items())
    if isinstance(desired, list) and _named(desired) and _named(observed or []):
        # containers, env, ports, volumes, volumeMounts: server-side apply merges these by
        # key, keeping its position for an entry that exists and any entry another manager
        # added (a sidecar); ours must each be there for the apply to be done. The order and
        # the others are not the apply's to fix (an apply would change nothing): see lists.
        by_name = {o["name"]: o for o in observed or []}
        return all(contains(by_name.get(d["name"]), d, key, parent) for d in desired)
    if isinstance(desired, list):
        observed = [] if observed is None else observed
        if not isinstance(observed, list) or len(observed) != len(desired):
            return False
        return all(contains(o, d, key, parent) for o, d in zip(observed, desired, strict=True))
    if observed == desired:
        return True
    if parent in _QUANTITY_PARENTS or key in _QUANTITY_KEYS:
        return _same_quantity(observed, desired)
    return False


def _named(items: Any) -> bool:
    return isinstance(items, list) and all(isinstance(i, dict) and "name" in i for i in items)


def needs_apply(desired: dict[str, Any], observed: dict[str, Any] | None) -> bool:
    if observed is None:
        return True
    return not contains(observed, desired)


def needs_write(
    desired: dict[str, Any],
    observed: dict[str, Any] | None,
    *,
    undone: list[Any] | None = None,
) -> bool:
    """An apply is due, or a patch of the rendered lists (entries another manager added,
    an order the apply left): what the reconciler must write, nothing more, so that a
    child restored once is not written again. `undone`: the `lists.snapshot` of ops the
    API server undid as it took them (a mutating webhook): no reason to write again."""
    if observed is None or needs_apply(desired, observed):
        return True
    ops = list_ops(desired, observed)
    return bool(ops) and (undone is None or snapshot(ops, observed) != undone)
