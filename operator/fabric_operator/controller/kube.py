"""The operator's only door to the API server: apply children, patch status, read Secret
keys, post Events. Everything here is synchronous and runs in worker threads.

Responses are read as plain JSON (no model deserialization): the watch cache holds plain
dicts too, and the comparison in `diff` works on those.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
from collections import Counter
from typing import Any
from urllib.parse import quote

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from fabric_operator.api.v1alpha1 import API_VERSION, GROUP, KIND, PLURAL, VERSION

log = logging.getLogger(__name__)

FIELD_MANAGER = "fabric-operator"
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
TIMEOUT = (5, 30)
PING_TIMEOUT = 3.0
# Child kind -> (its API group, "" for the core group; resource); all are at version v1
CHILD_APIS = {
    "Deployment": ("apps", "deployments"),
    "Service": ("", "services"),
    "NetworkPolicy": ("networking.k8s.io", "networkpolicies"),
}
# What an apply body escapes: what YAML refuses raw (DEL, C1 controls, U+FFFE/U+FFFF, lone
# surrogates), what YAML 1.1 reads as a line break, folded into a space inside a quoted
# scalar (NEL: measured; U+2028, U+2029), and the BOM. json.dumps escapes C0 controls.
_YAML_UNSAFE = re.compile(r"[\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff\ud800-\udfff]")


def apply_body(manifest: dict[str, Any]) -> bytes:
    """A manifest as an apply-patch+yaml body: JSON (which is YAML) in UTF-8 text.

    json.dumps' default, ASCII with escapes, escapes characters beyond U+FFFF as UTF-16
    surrogate pairs, which the API server's YAML decoder refuses ('invalid Unicode
    character escape code'); raw, it refuses control characters. So: raw text, but for
    those, escaped (BMP characters, whose escapes YAML reads; a lone surrogate, which a
    string from the API server never holds, stays refused)."""
    text = json.dumps(manifest, ensure_ascii=False, separators=(",", ":"))
    return _YAML_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text).encode()


def api_message(err: ApiException) -> str:
    """The API server's own message (it names the offending field), else the reason."""
    try:
        body = json.loads(err.body or "{}")
    except (TypeError, ValueError):
        body = {}
    return str(body.get("message") or err.reason or err.status)


def _details(err: ApiException) -> dict[str, Any]:
    try:
        body = json.loads(err.body or "{}")
    except (TypeError, ValueError):
        return {}
    details = body.get("details") if isinstance(body, dict) else None
    return details if isinstance(details, dict) else {}


def request(
    api_client: client.ApiClient,
    method: str,
    path: str,
    *,
    body: Any = None,
    content_type: str = "application/json",
    query: list[tuple[str, str]] | None = None,
    timeout: Any = TIMEOUT,
) -> dict[str, Any]:
    """One request below the generated API; the answer as plain JSON. Raises ApiException
    on non-2xx, as the generated methods do."""
    method, url, headers, serialized, post_params = api_client.param_serialize(
        method=method,
        resource_path=path,
        query_params=query or [],
        header_params={"Content-Type": content_type, "Accept": "application/json"},
        body=body,
        auth_settings=["BearerToken"],
    )
    resp = api_client.call_api(
        method,
        url,
        header_params=headers,
        body=serialized,
        post_params=post_params,
        _request_timeout=timeout,
    )
    resp.read()  # type: ignore[no-untyped-call]
    if not 200 <= resp.status <= 299:
        raise ApiException.from_response(http_resp=resp, body=None, data=None)
    data: dict[str, Any] = json.loads(resp.data or b"{}")
    return data


def applied_fields(fields: Any, sent: Any, *, item: bool = False) -> dict[str, Any]:
    """The part of a managedFields set (FieldsV1) that an apply of `sent` would own.

    A create records every field of the object as stored, the ones the server defaulted
    included; owned by an applier, those would be taken out by its next apply (and put
    back as defaults: a needless write, a Deployment's generation bumped). Keys: `f:NAME`
    a field, `k:{...}` the list entry with those key values, `v:VALUE` a set member, `.`
    the node itself. An apply records `.` for list entries only, and no empty map (as
    measured on v1.20: the set equals the one of an apply of the same manifest)."""
    out: dict[str, Any] = {}
    for key, sub in (fields or {}).items():
        if key == ".":
            if item:
                out[key] = sub
        elif key.startswith("f:") and isinstance(sent, dict) and key[2:] in sent:
            value = sent[key[2:]]
            if value != {}:
                out[key] = applied_fields(sub, value)
        elif key.startswith(("k:", "v:")) and isinstance(sent, list):
            try:
                wanted = json.loads(key[2:])
            except ValueError:
                continue
            if key.startswith("v:"):
                if wanted in sent:
                    out[key] = sub
                continue
            match = next(
                (
                    i
                    for i in sent
                    if isinstance(i, dict)
                    and isinstance(wanted, dict)
                    and all(i.get(k) == v for k, v in wanted.items())
                ),
                None,
            )
            if match is not None:
                out[key] = applied_fields(sub, match, item=True)
    return out


def segment(value: str) -> str:
    """A name or namespace as one URL path segment."""
    return quote(value, safe="")


class Kube:
    """The calls the reconciler makes, counted per (verb, resource) for benchmarks.

    Requests are made below the generated API (`ApiClient.call_api`): the typed API
    classes cost ~30 MB resident once instantiated (CoreV1Api alone 21 MB of
    validate_call wrappers) for eight endpoints whose paths are fixed, and their methods
    refuse a bytes body and serialize dicts as ASCII JSON (see apply_body)."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _count(self, verb: str, resource: str) -> None:
        with self._lock:
            self.requests[f"{verb} {resource}"] += 1

    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return request(self.api_client, method, path, **kwargs)

    @staticmethod
    def _child_path(kind: str, namespace: str, name: str) -> tuple[str, str]:
        """(resource, path) of a child."""
        if kind not in CHILD_APIS:
            raise ValueError(f"unexpected child kind {kind}")
        group, resource = CHILD_APIS[kind]
        group_path = f"/apis/{group}/v1" if group else "/api/v1"
        return resource, f"{group_path}/namespaces/{segment(namespace)}/{resource}/{segment(name)}"

    @staticmethod
    def _backend_path(namespace: str, name: str) -> str:
        return f"/apis/{GROUP}/{VERSION}/namespaces/{segment(namespace)}/{PLURAL}/{segment(name)}"

    def _patch(
        self,
        verb: str,
        kind: str,
        meta: dict[str, Any],
        body: bytes | list[dict[str, Any]],
        *,
        content_type: str,
        query: list[tuple[str, str]],
    ) -> dict[str, Any]:
        """PATCH a child, counted as `verb`."""
        resource, path = self._child_path(kind, meta["namespace"], meta["name"])
        self._count(verb, resource)
        return self.call("PATCH", path, body=body, content_type=content_type, query=query)

    def backend_exists(self, namespace: str, name: str) -> bool:
        self._count("get", "llmbackends")
        path = self._backend_path(namespace, name)
        try:
            self.call("GET", path)
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        return True

    def ping(self) -> dict[str, Any]:
        """GET /version: is the API server there (and which is it)? Not counted with the
        reconcile requests (it is the health report's, on a fixed period, whatever the
        backends do)."""
        return self.call("GET", "/version", timeout=PING_TIMEOUT)

    def request_counts(self) -> dict[str, int]:
        """A copy taken under the lock: worker threads add keys while /metrics reads."""
        with self._lock:
            return dict(self.requests)

    def apply(self, manifest: dict[str, Any], *, force: bool = True) -> dict[str, Any]:
        """Server-side apply. With force, our fields are taken back from whoever edited
        them (drift); without, a field another manager owns is a 409 (not our object)."""
        body = apply_body(manifest)
        query = [("fieldManager", FIELD_MANAGER), ("force", "true" if force else "false")]
        return self._patch(
            "apply", manifest["kind"], manifest["metadata"], body, content_type=APPLY, query=query
        )

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create a child that must not exist yet (POST): 409 AlreadyExists if any object
        has its name, which is then never written to. An apply would merge into it
        (another's Service would gain our selector and owner reference).

        A create records its fields as an Update by the field manager, not an Apply: the
        next apply would share them with that Update entry instead of owning them, and a
        field the rendering later drops would stay. So the entry is turned into the one an
        apply of the manifest would have made (what client-go's csaupgrade does for
        objects created by client-side apply)."""
        kind, meta = manifest["kind"], manifest["metadata"]
        resource, path = self._child_path(kind, meta["namespace"], meta["name"])
        self._count("create", resource)
        created = self.call(
            "POST", path.rsplit("/", 1)[0], body=manifest, query=[("fieldManager", FIELD_MANAGER)]
        )
        return self._as_applied(kind, created, manifest)

    def _as_applied(
        self, kind: str, obj: dict[str, Any], manifest: dict[str, Any]
    ) -> dict[str, Any]:
        """`obj` with our managedFields entry turned from Update into Apply, restricted
        to the fields `manifest` sets. Best effort: the child exists either way, so a
        failure is logged, never raised."""
        meta = manifest["metadata"]
        try:
            return self._upgrade_fields(kind, obj, manifest)
        except Exception as err:  # urllib3's errors too: nothing here may fail the create
            detail = api_message(err) if isinstance(err, ApiException) else str(err)
            log.warning(
                "%s %s/%s: created, but its fields could not be recorded as applied (%s); "
                "a field the rendering later drops may stay",
                kind,
                meta["namespace"],
                meta["name"],
                detail,
            )
            return obj

    def _upgrade_fields(
        self, kind: str, obj: dict[str, Any], manifest: dict[str, Any]
    ) -> dict[str, Any]:
        """One JSON patch guarded by tests of that very entry (not of the
        resourceVersion, which a controller's status write changes at once); tried again
        on a fresh copy if the entry moved."""
        meta = manifest["metadata"]
        for _ in range(3):
            entries = (obj.get("metadata") or {}).get("managedFields") or []
            found = [
                i
                for i, e in enumerate(entries)
                if e.get("manager") == FIELD_MANAGER and e.get("operation") == "Update"
            ]
            if not found:
                return obj
            i = found[0]
            entry = {
                **entries[i],
                "operation": "Apply",
                "fieldsV1": applied_fields(entries[i].get("fieldsV1"), manifest),
            }
            entry.pop("subresource", None)
            where = f"/metadata/managedFields/{i}"
            ops: list[dict[str, Any]] = [
                {"op": "test", "path": f"{where}/manager", "value": FIELD_MANAGER},
                {"op": "test", "path": f"{where}/operation", "value": "Update"},
                {"op": "replace", "path": where, "value": entry},
            ]
            try:
                return self._patch(
                    "patch",
                    kind,
                    meta,
                    ops,
                    content_type=JSON_PATCH,
                    query=[("fieldManager", FIELD_MANAGER)],
                )
            except ApiException as err:
                if err.status == 404:
                    return obj  # deleted meanwhile: its watch event says so
                if err.status != 422:  # 422: a test failed, the entry moved
                    raise
            fresh = self.get(kind, meta["namespace"], meta["name"])
            if fresh is None:
                return obj
            obj = fresh
        raise ValueError("its managedFields kept changing")

    def patch_guarded(
        self, kind: str, namespace: str, name: str, resource_version: str, ops: list[dict[str, Any]]
    ) -> dict[str, Any]:
        """A JSON patch behind a test of resourceVersion, so that it only changes the very
        object its ops were computed from; an object written since (by anyone) is left
        alone and reported as a 409 Conflict, for the caller to look again."""
        guard = {"op": "test", "path": "/metadata/resourceVersion", "value": resource_version}
        meta = {"namespace": namespace, "name": name}
        query = [("fieldManager", FIELD_MANAGER)]
        try:
            return self._patch(
                "patch", kind, meta, [guard, *ops], content_type=JSON_PATCH, query=query
            )
        except ApiException as err:
            if err.status == 422 and not _details(err):
                # A test that failed (or a path gone) is a bare 422 without details, unlike
                # a refusal of the patched object, which names the fields.
                message = f"{kind} {name} changed since resourceVersion {resource_version}"
                raise ApiException(
                    status=409, reason="Conflict", body=json.dumps({"message": message})
                ) from err
            raise

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """One child as the API server has it now, or None (only to settle a conflict)."""
        resource, path = self._child_path(kind, namespace, name)
        self._count("get", resource)
        try:
            return self.call("GET", path)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def delete(
        self, kind: str, namespace: str, name: str, uid: str, resource_version: str | None = None
    ) -> None:
        """Delete a child, only if it is still the object we saw (uid precondition; and,
        given one, resourceVersion: unchanged since)."""
        resource, path = self._child_path(kind, namespace, name)
        self._count("delete", resource)
        preconditions = {"uid": uid}
        if resource_version is not None:
            preconditions["resourceVersion"] = resource_version
        body = {"preconditions": preconditions, "propagationPolicy": "Background"}
        try:
            self.call("DELETE", path, body=body)
        except ApiException as err:
            if err.status not in (404, 409):  # gone already, or replaced by another object
                raise

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self._count("patch", "llmbackends/status")
        path = self._backend_path(namespace, name) + "/status"
        return self.call("PATCH", path, body={"status": status}, content_type=MERGE)

    def secret_keys(self, namespace: str, name: str) -> set[str] | None:
        """The keys a Secret holds, or None when there is no such Secret. Values are
        dropped here and never logged."""
        self._count("get", "secrets")
        try:
            path = f"/api/v1/namespaces/{segment(namespace)}/secrets/{segment(name)}"
            body = self.call("GET", path)
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return set((body.get("data") or {}).keys()) | set((body.get("stringData") or {}).keys())

    def post_event(
        self, backend: dict[str, Any], type_: str, reason: str, message: str, timestamp: str
    ) -> None:
        """A core/v1 Event on the LLMBackend, as `kubectl describe` shows them."""
        meta = backend["metadata"]
        self._count("create", "events")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{meta['name']}.{secrets.token_hex(8)}",
                "namespace": meta["namespace"],
            },
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "firstTimestamp": timestamp,
            "lastTimestamp": timestamp,
            "count": 1,
        }
        try:
            self.call("POST", f"/api/v1/namespaces/{segment(meta['namespace'])}/events", body=event)
        except ApiException as err:  # an Event is a courtesy: never fail a reconcile on it
            log.warning(
                "could not post event %s on %s/%s: %s",
                reason,
                meta["namespace"],
                meta["name"],
                api_message(err),
            )
