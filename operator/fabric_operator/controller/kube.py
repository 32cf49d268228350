"""The LLMBackend controller's calls to the API server: apply, create and patch its
children, patch an LLMBackend's status, read Secret keys, post Events. Each is a request
of `machinery.rest`, counted; everything here is synchronous and runs in worker threads.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import threading
from collections import Counter
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from fabric_operator.api.v1alpha1 import API_VERSION, GROUP, KIND, PLURAL, VERSION
from fabric_operator.machinery.rest import (
    APPLY,
    JSON_PATCH,
    MERGE,
    api_message,
    applied_fields,
    apply_body,
    error_details,
    request,
    segment,
)

log = logging.getLogger(__name__)

FIELD_MANAGER = "fabric-operator"
AUTOSCALER_MANAGER = "fabric-autoscaler"
PING_TIMEOUT = 3.0
# Child kind -> (its API group, "" for the core group; resource); all are at version v1
CHILD_APIS = {
    "Deployment": ("apps", "deployments"),
    "Service": ("", "services"),
    "NetworkPolicy": ("networking.k8s.io", "networkpolicies"),
    "PersistentVolumeClaim": ("", "persistentvolumeclaims"),
    "PodDisruptionBudget": ("policy", "poddisruptionbudgets"),
}


def server_version(server: Any) -> tuple[int, int] | None:
    """(major, minor) of a /version answer; None if it does not say."""
    if not isinstance(server, dict):
        return None
    major = re.match(r"\d+", str(server.get("major")))
    minor = re.match(r"\d+", str(server.get("minor")))  # "20+" on some managed clusters
    return (int(major.group()), int(minor.group())) if major and minor else None


def child_versions(version: tuple[int, int] | None) -> dict[str, str]:
    """Child kind -> the API version to use on a server of this version (v1 unless
    listed): policy/v1 PodDisruptionBudgets exist from Kubernetes 1.21; 1.20 has v1beta1."""
    if version is not None and version < (1, 21):
        return {"PodDisruptionBudget": "v1beta1"}
    return {}


class Kube:
    """The calls the reconciler makes, counted per (verb, resource) for benchmarks.

    Requests are made below the generated API (`ApiClient.call_api`): the typed API
    classes cost ~30 MB resident once instantiated (CoreV1Api alone 21 MB of
    validate_call wrappers) for eight endpoints whose paths are fixed, and their methods
    refuse a bytes body and serialize dicts as ASCII JSON (see apply_body)."""

    def __init__(self, api_client: client.ApiClient, server: tuple[int, int] | None = None) -> None:
        self.api_client = api_client
        self.server = server  # the API server's (major, minor), when known
        self.versions = child_versions(server)  # child kind -> API version, when not v1
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _count(self, verb: str, resource: str) -> None:
        with self._lock:
            self.requests[f"{verb} {resource}"] += 1

    def call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return request(self.api_client, method, path, **kwargs)

    def _child_path(self, kind: str, namespace: str, name: str) -> tuple[str, str]:
        """(resource, path) of a child."""
        if kind not in CHILD_APIS:
            raise ValueError(f"unexpected child kind {kind}")
        group, resource = CHILD_APIS[kind]
        version = self.versions.get(kind, "v1")
        group_path = f"/apis/{group}/{version}" if group else f"/api/{version}"
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
            if err.status == 422 and not error_details(err):
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

    def scale(self, namespace: str, name: str, replicas: int) -> dict[str, Any]:
        """Set spec.replicas through the scale subresource (as `kubectl scale` and an HPA
        do: no other field of the spec is touched). Returns the Scale."""
        self._count("patch", "llmbackends/scale")
        path = self._backend_path(namespace, name) + "/scale"
        return self.call(
            "PATCH",
            path,
            body={"spec": {"replicas": replicas}},
            content_type=MERGE,
            query=[("fieldManager", AUTOSCALER_MANAGER)],
        )

    def patch_autoscaling(
        self, namespace: str, name: str, autoscaling: dict[str, Any]
    ) -> dict[str, Any]:
        """Merge status.autoscaling only (the reconciler's status patches leave it out)."""
        self._count("patch", "llmbackends/status")
        path = self._backend_path(namespace, name) + "/status"
        return self.call(
            "PATCH",
            path,
            body={"status": {"autoscaling": autoscaling}},
            content_type=MERGE,
            query=[("fieldManager", AUTOSCALER_MANAGER)],
        )

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
