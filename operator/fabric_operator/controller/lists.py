"""Which JSON-patch ops put a child's keyed lists back in their rendered shape.

Server-side apply merges associative lists (containers, env, ports, volumes) by key: it
keeps entries another field manager added, and the position of entries that already
existed, appending new ones. So an apply alone never takes back a container or env var
added by hand, and after a spec change the env order can differ from the rendered one
(`$(VAR)` only expands variables defined earlier). `list_ops` removes the entries the
rendering does not have and puts the others in rendered order, as the server has them
(their values are the apply's to correct).

It never adds an entry: what a JSON patch adds is owned by the patch's Update field
manager, and stays when a later apply drops it (measured: an env var added so outlived
the apply that no longer had it; removing and reordering gave that manager nothing).
Adding is the apply's job, so a list none of whose entries is rendered is left for it
(emptied, it could be refused: a pod needs a container). One exception, `port_ops`,
before an apply: port names are unique, so a port edited by hand (Service port 8080 ->
9999, a new key to the server, still named "http") makes the apply of ours refused
('Duplicate value'); such a list is replaced by the rendered ports. Safe: the rendering
sets every field of a port, and the list is realigned after every apply.

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

from fabric_operator.render.cache import PRELOAD_CONTAINER
from fabric_operator.render.ollama import PULL_CONTAINER

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
POD = ("spec", "template", "spec")
# Kind -> (path of the object holding the lists, the lists)
_LISTS: dict[str, tuple[tuple[str, ...], dict[str, _List]]] = {
    "Deployment": (
        POD,
        {
            "containers": _List(_by_name, _CONTAINER),
            "initContainers": _List(_by_name, _CONTAINER),
        },
    ),
    "Service": (("spec",), {"ports": _List(_by_service_port)}),
}
_VOLUMES = _List(_by_name)
RENDERED_INIT = frozenset({PULL_CONTAINER, PRELOAD_CONTAINER})  # what any rendering has
_MOUNTING = ("containers", "initContainers", "ephemeralContainers")


def list_ops(desired: dict[str, Any], observed: dict[str, Any]) -> list[Op]:
    """JSON-patch ops (without the resourceVersion test) that leave in each rendered list
    of `observed` only rendered entries, in rendered order; [] when that is so."""
    ops: list[Op] = []
    where = _LISTS.get(str(desired.get("kind")))
    if where is None:
        return ops
    path, lists = where
    rendered, live = _get(desired, path), _get(observed, path)
    if not isinstance(rendered, dict) or not isinstance(live, dict):
        return ops
    pointer = _pointer(path)
    fixed = _fix_lists(live, rendered, lists, pointer, ops)
    if desired["kind"] == "Deployment" and "initContainers" not in rendered:
        fixed = _drop_our_init_containers(fixed, pointer, ops)
    if desired["kind"] == "Deployment" and isinstance(rendered.get("volumes"), list):
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
            ops,
            keep=lambda v: v.get("name") in mounted,
        )
    return ops


def _drop_our_init_containers(pod: Entry, pointer: str, ops: list[Op]) -> Entry:
    """A rendering without init containers (an engine switched from ollama): the init
    containers the operator renders are taken out, others kept (see the module's
    docstring). The apply removes them when it owns them; not when its ownership was
    lost, as when the operator was killed between a child's create and the patch that
    turns the create's fields into applied ones."""
    live = pod.get("initContainers")
    if not isinstance(live, list):
        return pod
    left = [c for c in live if not (isinstance(c, dict) and c.get("name") in RENDERED_INIT)]
    if len(left) == len(live):
        return pod
    path = f"{pointer}/initContainers"
    ops.append(
        {"op": "replace", "path": path, "value": left} if left else {"op": "remove", "path": path}
    )
    return {**pod, "initContainers": left}


def port_ops(desired: dict[str, Any], observed: dict[str, Any]) -> list[Op]:
    """Before an apply: ops that replace each rendered port list holding a port the
    rendering does not have by the rendered ports (live copies kept), which the apply
    would otherwise be refused beside (port names are unique)."""
    ops: list[Op] = []
    kind = desired.get("kind")
    if kind == "Service":
        rendered, live = _get(desired, ("spec", "ports")), _get(observed, ("spec", "ports"))
        if isinstance(rendered, list):
            _replace_ports(live, rendered, _by_service_port, "/spec/ports", ops)
    elif kind == "Deployment":
        ours = {c.get("name"): c for c in _get(desired, (*POD, "containers")) or [] if "ports" in c}
        live_containers = _get(observed, (*POD, "containers"))
        for i, c in enumerate(live_containers if isinstance(live_containers, list) else []):
            if isinstance(c, dict) and c.get("name") in ours:
                pointer = f"{_pointer(POD)}/containers/{i}/ports"
                rendered_ports = ours[c.get("name")]["ports"]
                _replace_ports(c.get("ports"), rendered_ports, _by_container_port, pointer, ops)
    return ops


def _replace_ports(
    live: Any, rendered: list[Entry], key: Callable[[Entry], Key], pointer: str, ops: list[Op]
) -> None:
    items: list[Any] = live if isinstance(live, list) else []
    keys = {key(r) for r in rendered}
    if all(isinstance(e, dict) and key(e) in keys for e in items):
        return
    first: dict[Key, Entry] = {}
    for entry in items:
        if isinstance(entry, dict):
            first.setdefault(key(entry), entry)
    value = [first.get(key(r), r) for r in rendered]
    ops.append({"op": "replace", "path": pointer, "value": value})


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


def _fix_lists(
    live: Entry, rendered: Entry, lists: dict[str, _List], pointer: str, ops: list[Op]
) -> Entry:
    """`live` with each of `lists` that `rendered` sets realigned; ops added to `ops`."""
    out = dict(live)
    for name, spec in lists.items():
        if name in rendered and isinstance(rendered[name], list):
            out[name] = _fix_list(
                live.get(name), rendered[name], spec, f"{pointer}/{_escape(name)}", ops
            )
    return out


def _fix_list(
    live: Any,
    rendered: list[Any],
    spec: _List,
    pointer: str,
    ops: list[Op],
    *,
    keep: Callable[[Entry], bool] = lambda _: False,
) -> list[Any]:
    """The list as it should be: the live entries of rendered keys, in rendered order
    (then those `keep` keeps). One op replaces it when its keys or their order differ
    (its entries' inner lists fixed within), else its entries' inner lists get theirs.
    A list holding no rendered entry is left for the apply to add them first."""
    items: list[Any] = live if isinstance(live, list) else []
    entries = [e for e in items if isinstance(e, dict)]
    first: dict[Key, Entry] = {}
    for entry in entries:
        first.setdefault(spec.key(entry), entry)
    ours = [(first[k], r) for k, r in ((spec.key(r), r) for r in rendered) if k in first]
    if rendered and not ours:
        return items
    rendered_keys = {spec.key(r) for r in rendered}
    kept = [e for e in entries if spec.key(e) not in rendered_keys and keep(e)]
    inner: list[Op] = []
    fixed = [
        _fix_lists(t, r, spec.inner, f"{pointer}/{i}", inner) for i, (t, r) in enumerate(ours)
    ] + kept
    target = [t for t, _ in ours] + kept
    if len(entries) == len(items) and [id(e) for e in entries] == [id(t) for t in target]:
        ops.extend(inner)  # the live indices: the list itself stays as it is
    else:
        ops.append({"op": "replace", "path": pointer, "value": fixed})
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


def _pointer(path: tuple[str, ...]) -> str:
    return "".join(f"/{_escape(p)}" for p in path)


def _escape(token: str) -> str:
    """A JSON pointer token (RFC 6901)."""
    return token.replace("~", "~0").replace("/", "~1")
