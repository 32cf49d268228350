"""Which JSON-patch ops put a child's keyed lists back in their rendered shape.

Server-side apply merges associative lists (containers, env, ports, volumes) by key: it
keeps entries another field manager added, and the position of entries that already
existed, appending new ones. So an apply alone never takes back a container or env var
added by hand, and after a spec change the env order can differ from the rendered one
(`$(VAR)` only expands variables defined earlier). The ops computed here replace such a
list by the rendered entries in rendered order. An entry that is there is kept as the
server has it (with its defaults and values; the apply is what corrects those), one that
is missing is taken as rendered: a Service port edited by hand is a new key to the
server, and only its replacement lets the apply through (it would refuse a second port
named "http").

Only lists the operator renders are touched: the pod template's containers (and init
containers when it renders some), each rendered container's env, ports and volumeMounts,
the pod's volumes, the Service's ports. A volume a container left in place still mounts
(an init container added by hand) is kept, or the template would be refused.

Sidecars added to the Deployment's pod template are removed like any other drift: the
operator owns that Deployment, and serves one engine container per pod. Service-mesh
sidecars (Istio, Linkerd) are injected by a mutating webhook into the Pods, not into the
Deployment, so they are not affected.

Pure: the reconciler sends the ops behind a resourceVersion test (`Kube.patch_guarded`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

Op = dict[str, Any]
Entry = dict[str, Any]
Key = tuple[Any, ...]


def _by_name(entry: Entry) -> Key:
    return (entry.get("name"),)


def _by_mount_path(entry: Entry) -> Key:
    return (entry.get("mountPath"),)


def _by_container_port(entry: Entry) -> Key:
    return (entry.get("containerPort"), entry.get("protocol") or "TCP")


def _by_service_port(entry: Entry) -> Key:
    return (entry.get("port"), entry.get("protocol") or "TCP")


@dataclass(frozen=True)
class _List:
    """A keyed list: its map keys (as the API's x-kubernetes-list-map-keys) and the keyed
    lists inside each of its entries."""

    key: Callable[[Entry], Key]
    inner: dict[str, _List] = field(default_factory=dict)


_CONTAINER = {
    "env": _List(_by_name),
    "ports": _List(_by_container_port),
    "volumeMounts": _List(_by_mount_path),
}
# Kind -> (path of the object holding the lists, the lists)
_LISTS: dict[str, tuple[tuple[str, ...], dict[str, _List]]] = {
    "Deployment": (
        ("spec", "template", "spec"),
        {
            "containers": _List(_by_name, _CONTAINER),
            "initContainers": _List(_by_name, _CONTAINER),
        },
    ),
    "Service": (("spec",), {"ports": _List(_by_service_port)}),
}
_VOLUMES = _List(_by_name)
_MOUNTING = ("containers", "initContainers", "ephemeralContainers")


@dataclass
class _Result:
    ops: list[Op] = field(default_factory=list)
    foreign: bool = False  # some live entry is not rendered (and will be removed)


def list_ops(desired: dict[str, Any], observed: dict[str, Any]) -> list[Op]:
    """JSON-patch ops (without the resourceVersion test) that make every rendered list of
    `observed` hold exactly the rendered entries in rendered order; [] when they do."""
    return _realign(desired, observed).ops


def has_foreign(desired: dict[str, Any], observed: dict[str, Any]) -> bool:
    """Whether a rendered list of `observed` holds entries the rendering does not: these
    are removed before an apply, which would otherwise merge with them."""
    return _realign(desired, observed).foreign


def snapshot(ops: list[Op], observed: dict[str, Any]) -> list[Any]:
    """The ops with the live values they would replace: what the reconciler remembers of
    ops the API server undid (a mutating webhook), to send them again only once the
    rendering or the live lists changed, whatever else changed."""
    taken = [(op["path"], op.get("value"), _resolve(observed, op["path"])) for op in ops]
    return copy.deepcopy(taken)  # kept while the watched copies it points into change


def _resolve(obj: Any, pointer: str) -> Any:
    for escaped in pointer.split("/")[1:]:
        token = escaped.replace("~1", "/").replace("~0", "~")
        if isinstance(obj, dict):
            obj = obj.get(token)
        elif isinstance(obj, list) and token.isdigit() and int(token) < len(obj):
            obj = obj[int(token)]
        else:
            return None
    return obj


def _realign(desired: dict[str, Any], observed: dict[str, Any]) -> _Result:
    result = _Result()
    where = _LISTS.get(str(desired.get("kind")))
    if where is None:
        return result
    path, lists = where
    rendered, live = _get(desired, path), _get(observed, path)
    if not isinstance(rendered, dict) or not isinstance(live, dict):
        return result
    pointer = "".join(f"/{_escape(p)}" for p in path)
    fixed = _fix_lists(live, rendered, lists, pointer, result)
    if desired["kind"] == "Deployment" and "volumes" in rendered:
        # After the containers: a volume still mounted by what stays is kept.
        mounted = {
            m.get("name")
            for c in _containers(fixed)
            for m in (c.get("volumeMounts") or []) + (c.get("volumeDevices") or [])
            if isinstance(m, dict)
        }
        _fix_list(
            live.get("volumes"),
            rendered["volumes"],
            _VOLUMES,
            f"{pointer}/volumes",
            result,
            keep=lambda v: v.get("name") in mounted,
        )
    return result


def _fix_lists(
    live: Entry, rendered: Entry, lists: dict[str, _List], pointer: str, result: _Result
) -> Entry:
    """`live` with each of `lists` that `rendered` sets realigned; ops added to `result`."""
    out = dict(live)
    for name, spec in lists.items():
        if name in rendered and isinstance(rendered[name], list):
            out[name] = _fix_list(
                live.get(name), rendered[name], spec, f"{pointer}/{_escape(name)}", result
            )
    return out


def _fix_list(
    live: Any,
    rendered: list[Any],
    spec: _List,
    pointer: str,
    result: _Result,
    *,
    keep: Callable[[Entry], bool] = lambda _: False,
) -> list[Any]:
    """The list as it should be. One op replaces it when its keys or their order differ
    (its entries' inner lists fixed within), else its entries' inner lists get theirs."""
    items: list[Any] = live if isinstance(live, list) else []
    entries = [e for e in items if isinstance(e, dict)]
    first: dict[Key, Entry] = {}
    for entry in entries:
        first.setdefault(spec.key(entry), entry)
    wanted = [(spec.key(r), r) for r in rendered]
    keys = {k for k, _ in wanted}
    kept = [e for e in entries if spec.key(e) not in keys and keep(e)]
    target = [first.get(k, r) for k, r in wanted] + kept
    if len(items) > sum(k in first for k in keys) + len(kept):
        result.foreign = True  # entries not rendered, duplicates: they go
    inner = _Result()
    fixed = [
        _fix_lists(t, r, spec.inner, f"{pointer}/{i}", inner)
        for i, (t, (_, r)) in enumerate(zip(target, wanted, strict=False))
    ] + kept
    result.foreign = result.foreign or inner.foreign
    same = len(entries) == len(items) and [spec.key(e) for e in entries] == [
        spec.key(t) for t in target
    ]
    if same:
        result.ops.extend(inner.ops)  # the live indices: the list itself stays as it is
    elif isinstance(live, list):
        result.ops.append({"op": "replace", "path": pointer, "value": fixed})
    else:
        result.ops.append({"op": "add", "path": pointer, "value": fixed})
    return fixed


def _containers(pod: Entry) -> Iterable[Entry]:
    for name in _MOUNTING:
        for c in pod.get(name) or []:
            if isinstance(c, dict):
                yield c


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def _escape(token: str) -> str:
    """A JSON pointer token (RFC 6901)."""
    return token.replace("~", "~0").replace("/", "~1")
