"""The operator's only door to the API server: apply children, patch status, read Secret
keys, post Events. Everything here is synchronous and runs in worker threads.

Responses are read as plain JSON (no model deserialization): the watch cache holds plain
dicts too, and the comparison in `diff` works on those.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
from collections import Counter
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from fabric_operator.api.v1alpha1 import API_VERSION, GROUP, KIND, PLURAL, VERSION

log = logging.getLogger(__name__)

FIELD_MANAGER = "fabric-operator"
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
TIMEOUT = (5, 30)
PING_TIMEOUT = 3.0
# Child kind -> (attribute holding its API, the client's method suffix, resource for counts)
CHILD_APIS = {
    "Deployment": ("apps", "deployment", "deployments"),
    "Service": ("core", "service", "services"),
    "NetworkPolicy": ("networking", "network_policy", "networkpolicies"),
}
COUNTED_AS = {"patch": "apply", "read": "get", "delete": "delete"}  # client method -> verb


def api_message(err: ApiException) -> str:
    """The API server's own message (it names the offending field), else the reason."""
    try:
        body = json.loads(err.body or "{}")
    except (TypeError, ValueError):
        body = {}
    return str(body.get("message") or err.reason or err.status)


class Kube:
    """Typed calls the reconciler makes, counted per (verb, resource) for benchmarks."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.apps = client.AppsV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.networking = client.NetworkingV1Api(api_client)
        self.version = client.VersionApi(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _count(self, verb: str, resource: str) -> None:
        with self._lock:
            self.requests[f"{verb} {resource}"] += 1

    def _child(self, method: str, kind: str, *args: Any, **kwargs: Any) -> Any:
        """patch/read/delete_namespaced_<kind> on the API group of a child kind, counted."""
        if kind not in CHILD_APIS:
            raise ValueError(f"unexpected child kind {kind}")
        group, suffix, resource = CHILD_APIS[kind]
        self._count(COUNTED_AS[method], resource)
        return getattr(getattr(self, group), f"{method}_namespaced_{suffix}")(*args, **kwargs)

    def backend_exists(self, namespace: str, name: str) -> bool:
        self._count("get", "llmbackends")
        try:
            self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _request_timeout=TIMEOUT
            )
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        return True

    def ping(self) -> None:
        """GET /version: is the API server there? Not counted with the reconcile requests
        (it is the health report's, on a fixed period, whatever the backends do)."""
        self.version.get_code(_request_timeout=PING_TIMEOUT)

    def request_counts(self) -> dict[str, int]:
        """A copy taken under the lock: worker threads add keys while /metrics reads."""
        with self._lock:
            return dict(self.requests)

    @staticmethod
    def _json(response: Any) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(response.data)
        return data

    def apply(self, manifest: dict[str, Any], *, force: bool = True) -> dict[str, Any]:
        """Server-side apply. With force, our fields are taken back from whoever edited
        them (drift); without, a field another manager owns is a 409 (not our object)."""
        meta = manifest["metadata"]
        kind = manifest["kind"]
        kwargs: dict[str, Any] = {
            "field_manager": FIELD_MANAGER,
            "force": force,
            "_content_type": APPLY,
            "_preload_content": False,
            "_request_timeout": TIMEOUT,
        }
        resp = self._child("patch", kind, meta["name"], meta["namespace"], manifest, **kwargs)
        return self._json(resp)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """One child as the API server has it now, or None (only to settle a conflict)."""
        kwargs: dict[str, Any] = {"_preload_content": False, "_request_timeout": TIMEOUT}
        try:
            resp = self._child("read", kind, name, namespace, **kwargs)
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return self._json(resp)

    def delete(self, kind: str, namespace: str, name: str, uid: str) -> None:
        """Delete a child, only if it is still the object we saw (uid precondition)."""
        body = {"preconditions": {"uid": uid}, "propagationPolicy": "Background"}
        kwargs: dict[str, Any] = {"body": body, "_request_timeout": TIMEOUT}
        try:
            self._child("delete", kind, name, namespace, **kwargs)
        except ApiException as err:
            if err.status not in (404, 409):  # gone already, or replaced by another object
                raise

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self._count("patch", "llmbackends/status")
        resp = self.custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": status},
            _content_type=MERGE,
            _preload_content=False,
            _request_timeout=TIMEOUT,
        )
        return self._json(resp)

    def secret_keys(self, namespace: str, name: str) -> set[str] | None:
        """The keys a Secret holds, or None when there is no such Secret. Values are
        dropped here and never logged."""
        self._count("get", "secrets")
        try:
            resp = self.core.read_namespaced_secret(
                name, namespace, _preload_content=False, _request_timeout=TIMEOUT
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        body = self._json(resp)
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
        body = client.CoreV1Event.from_dict(event)
        assert body is not None
        try:
            self.core.create_namespaced_event(
                meta["namespace"],
                body,
                _preload_content=False,
                _request_timeout=TIMEOUT,
            )
        except ApiException as err:  # an Event is a courtesy: never fail a reconcile on it
            log.warning(
                "could not post event %s on %s/%s: %s",
                reason,
                meta["namespace"],
                meta["name"],
                api_message(err),
            )
