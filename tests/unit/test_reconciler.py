"""The reconciler's decisions, with an in-memory stand-in for its API edge (`Kube`).

The real API server is exercised by tests/integration; this covers failure paths a real
server will not produce on demand (a 5xx in the middle of applying children)."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from fabric_operator.controller.reconciler import Reconciler
from fabric_operator.controller.store import Store


class FakeKube:
    def __init__(self, fail_service_with: int | None = None) -> None:
        self.fail = fail_service_with
        self.applied: list[str] = []
        self.statuses: list[dict[str, Any]] = []
        self.events: list[tuple[str, str]] = []
        self.requests: dict[str, int] = {}
        self.deleted: list[tuple[str, str]] = []
        self.secrets: set[str] = {"api-key"}
        self.foreign: dict[str, dict[str, Any]] = {}  # kind -> an object someone else owns
        self.forced: list[bool] = []

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.foreign.get(kind)

    def apply(self, manifest: dict[str, Any], *, force: bool = True) -> dict[str, Any]:
        if manifest["kind"] == "Service" and self.fail:
            raise ApiException(status=self.fail, reason="Internal Server Error")
        if not force and manifest["kind"] in self.foreign:
            raise ApiException(status=409, reason="Conflict")
        self.forced.append(force)
        self.applied.append(manifest["kind"])
        return {**manifest, "metadata": {**manifest["metadata"], "resourceVersion": "2"}}

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self.statuses.append(status)
        return {**BACKEND, "status": status}

    def secret_keys(self, namespace: str, name: str) -> set[str] | None:
        return self.secrets if name != "missing" else None

    def delete(self, kind: str, namespace: str, name: str, uid: str) -> None:
        self.deleted.append((kind, uid))

    def post_event(
        self, backend: dict[str, Any], type_: str, reason: str, message: str, timestamp: str
    ) -> None:
        self.events.append((type_, reason))


BACKEND: dict[str, Any] = {
    "apiVersion": "llm.fabric.dev/v1alpha1",
    "kind": "LLMBackend",
    "metadata": {
        "name": "m",
        "namespace": "n",
        "uid": "u",
        "generation": 1,
        "resourceVersion": "1",
    },
    "spec": {"engine": "llamacpp", "model": {"url": "https://h.invalid/m.gguf"}},
}


def reconciler(kube: FakeKube) -> tuple[Reconciler, Store]:
    store = Store()
    store.put("LLMBackend", dict(BACKEND))
    return Reconciler(store, kube), store  # type: ignore[arg-type]


def test_new_backend_costs_two_applies_one_status_one_event() -> None:
    kube = FakeKube()
    rec, _ = reconciler(kube)
    assert rec.reconcile("n", "m") is None
    assert kube.applied == ["Deployment", "Service"]
    assert len(kube.statuses) == 1 and kube.events == [("Normal", "Created")]
    # Again, with the children and status as the watches would deliver them: nothing.
    rec.reconcile("n", "m")
    assert kube.applied == ["Deployment", "Service"] and len(kube.statuses) == 1


def test_transient_error_is_shown_and_retried() -> None:
    kube = FakeKube(fail_service_with=500)
    rec, _ = reconciler(kube)
    with pytest.raises(ApiException):
        rec.reconcile("n", "m")
    [status] = kube.statuses
    degraded = status["conditions"][2]
    assert (degraded["status"], degraded["reason"]) == ("True", "ApplyFailed")
    assert degraded["message"].startswith("Service m: ") and "(retrying)" in degraded["message"]
    progressing = status["conditions"][1]
    assert (progressing["status"], progressing["reason"]) == ("True", "Retrying")
    assert ("Warning", "ApplyFailed") in kube.events
    kube.fail = None  # the server recovers: the retry completes and clears the condition
    rec.reconcile("n", "m")
    assert kube.applied == ["Deployment", "Service"]
    assert kube.statuses[-1]["conditions"][2]["reason"] == "AsExpected"


def test_refusal_is_reported_without_retry_storm() -> None:
    kube = FakeKube(fail_service_with=422)
    rec, _ = reconciler(kube)
    assert rec.reconcile("n", "m") == 300.0  # looked at again later, not hammered
    assert kube.statuses[-1]["conditions"][2]["reason"] == "ApplyFailed"
    assert "(retrying)" not in kube.statuses[-1]["conditions"][2]["message"]


REMOTE_SPEC = {
    "engine": "remote",
    "remote": {"baseURL": "https://api.openai.com/v1", "model": "gpt-4o-mini"},
    "apiKeySecretRef": {"name": "openai", "key": "api-key"},
}


def test_engine_backend_turned_remote_loses_its_children_and_reports_remote() -> None:
    kube = FakeKube()
    rec, store = reconciler(kube)
    rec.reconcile("n", "m")
    for kind in ("Deployment", "Service"):
        child = store.get(kind, "n", "m")
        assert child is not None
        store.put(kind, {**child, "metadata": {**child["metadata"], "uid": f"{kind}-uid"}})
    backend = store.get("LLMBackend", "n", "m")
    assert backend is not None
    meta = {**backend["metadata"], "generation": 2, "resourceVersion": "3"}
    store.put("LLMBackend", {**backend, "metadata": meta, "spec": REMOTE_SPEC})
    assert rec.reconcile("n", "m") is None
    assert kube.deleted == [("Deployment", "Deployment-uid"), ("Service", "Service-uid")]
    assert store.get("Deployment", "n", "m") is None
    status = kube.statuses[-1]
    assert (status["phase"], status["endpoint"]) == ("Remote", "https://api.openai.com/v1")
    assert status["replicas"] is None and status["ready"] is None  # engine fields cleared
    ready = status["conditions"][0]
    assert (ready["status"], ready["reason"]) == ("True", "RemoteEndpoint")
    assert "https://api.openai.com/v1" in ready["message"]
    assert kube.applied == ["Deployment", "Service"]  # nothing applied for the remote


def test_remote_backend_with_a_missing_key_secret_is_invalid_and_rechecked() -> None:
    kube = FakeKube()
    rec, store = reconciler(kube)
    spec = {**REMOTE_SPEC, "apiKeySecretRef": {"name": "missing", "key": "api-key"}}
    store.put("LLMBackend", {**BACKEND, "spec": spec})
    assert rec.reconcile("n", "m") == 30.0
    status = kube.statuses[-1]
    assert status["phase"] == "Invalid"
    assert "Secret 'missing' not found" in status["conditions"][2]["message"]
    assert ("Warning", "InvalidSpec") in kube.events and not kube.deleted


def test_a_child_name_taken_by_someone_elses_object_is_left_alone() -> None:
    kube = FakeKube()
    kube.foreign["Deployment"] = {"metadata": {"name": "m", "ownerReferences": []}}
    rec, _ = reconciler(kube)
    assert rec.reconcile("n", "m") == 300.0
    assert kube.applied == []  # not even the Service: nothing half-applied
    degraded = kube.statuses[-1]["conditions"][2]
    assert (degraded["reason"], kube.events[-1]) == ("NameConflict", ("Warning", "NameConflict"))
    assert "Deployment m already exists and does not belong" in degraded["message"]


def test_new_children_are_applied_without_force_seen_ones_with() -> None:
    kube = FakeKube()
    rec, store = reconciler(kube)
    rec.reconcile("n", "m")
    assert kube.forced == [False, False]
    dep = store.get("Deployment", "n", "m")
    assert dep is not None
    dep["spec"]["replicas"] = 5  # drift
    rec.reconcile("n", "m")
    assert kube.forced == [False, False, True]


def test_status_counts_container_restarts_of_live_pods() -> None:
    kube = FakeKube()
    rec, store = reconciler(kube)
    for name, restarts, deleting in (("p1", 2, False), ("p2", 1, False), ("old", 9, True)):
        meta: dict[str, Any] = {
            "name": name,
            "namespace": "n",
            "labels": {"llm.fabric.dev/backend": "m"},
        }
        if deleting:
            meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        store.put(
            "Pod", {"metadata": meta, "status": {"containerStatuses": [{"restartCount": restarts}]}}
        )
    rec.reconcile("n", "m")
    assert kube.statuses[-1]["restarts"] == 3
