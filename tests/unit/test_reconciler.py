"""The reconciler's decisions, with an in-memory stand-in for its API edge (`Kube`).

The real API server is exercised by tests/integration; this covers failure paths a real
server will not produce on demand (a 5xx in the middle of applying children)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import jsonpatch
import pytest
from kubernetes.client.exceptions import ApiException

from fabric_operator.api.backend import LLMBackend
from fabric_operator.controller.reconciler import (
    STALE_RECHECK_SECONDS,
    Reconciler,
    _ours,
    new_store,
)
from fabric_operator.machinery.store import Store

# What a restricted engine container gets first (a user id with no passwd entry).
HOME_ENV = ["HOME", "USER", "LOGNAME"]


class FakeKube:
    def __init__(self, fail_service_with: int | None = None) -> None:
        self.fail = fail_service_with
        self.applied: list[str] = []  # every child write that is not a list patch
        self.created: list[str] = []
        self.calls: list[tuple[str, str]] = []  # (verb, kind) of every child write, in order
        self.statuses: list[dict[str, Any]] = []
        self.events: list[tuple[str, str]] = []
        self.requests: dict[str, int] = {}
        self.deleted: list[tuple[str, str]] = []
        self.delete_versions: list[str | None] = []
        self.secrets: set[str] = {"api-key"}
        self.foreign: dict[str, dict[str, Any]] = {}  # kind -> an object someone else owns
        self.forced: list[bool] = []
        self.objects: dict[str, dict[str, Any]] = {}  # kind -> the child as last written
        self.patched: list[tuple[str, str, list[str]]] = []  # kind, resourceVersion, paths
        self.patch_fails_with: int | None = None
        # What the server makes of an apply (server-side apply keeps list positions...)
        self.merge: Callable[[dict[str, Any]], dict[str, Any]] = lambda m: m
        # What a mutating admission webhook makes of every write
        self.admit: Callable[[dict[str, Any]], dict[str, Any]] = lambda o: o
        self.version = 1
        self.backend_alive = True
        self.existence_checks = 0

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        if kind in self.foreign:
            return self.foreign[kind]
        obj = self.objects.get(kind)
        return copy.deepcopy(obj) if obj is not None else None

    def backend_exists(self, namespace: str, name: str) -> bool:
        self.existence_checks += 1
        return self.backend_alive

    def apply(self, manifest: dict[str, Any], *, force: bool = True) -> dict[str, Any]:
        if manifest["kind"] == "Service" and self.fail:
            raise ApiException(status=self.fail, reason="Internal Server Error")
        if manifest["kind"] in self.foreign:
            raise AssertionError(f"{manifest['kind']}: applied to someone else's object")
        self.forced.append(force)
        self.applied.append(manifest["kind"])
        self.calls.append(("apply", manifest["kind"]))
        return self._written(self.merge(copy.deepcopy(manifest)))

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        kind = manifest["kind"]
        if kind == "Service" and self.fail:
            raise ApiException(status=self.fail, reason="Internal Server Error")
        self.calls.append(("create", kind))
        if kind in self.foreign or kind in self.objects:
            raise ApiException(status=409, reason="AlreadyExists")
        self.applied.append(kind)
        self.created.append(kind)
        return self._written(copy.deepcopy(manifest))

    def _written(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj = self.admit(obj)
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        obj["metadata"].setdefault("uid", f"{obj['kind'].lower()}-uid")
        self.objects[obj["kind"]] = obj
        return copy.deepcopy(obj)

    def patch_guarded(
        self, kind: str, namespace: str, name: str, resource_version: str, ops: list[Any]
    ) -> dict[str, Any]:
        self.patched.append((kind, resource_version, [op["path"] for op in ops]))
        self.calls.append(("patch", kind))
        if self.patch_fails_with:
            raise ApiException(status=self.patch_fails_with, reason="Conflict")
        current = self.objects[kind]
        if current["metadata"]["resourceVersion"] != resource_version:
            raise ApiException(status=409, reason="Conflict")
        return self._written(jsonpatch.apply_patch(current, ops))

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self.statuses.append(status)
        return {**BACKEND, "status": status}

    def secret_keys(self, namespace: str, name: str) -> set[str] | None:
        return self.secrets if name != "missing" else None

    def delete(
        self, kind: str, namespace: str, name: str, uid: str, resource_version: str | None = None
    ) -> None:
        self.deleted.append((kind, uid))
        self.delete_versions.append(resource_version)
        self.objects.pop(kind, None)

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
    store = new_store()
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


THEIRS: dict[str, Any] = {
    "metadata": {
        "name": "m",
        "namespace": "n",
        "uid": "theirs-uid",
        "labels": {"app": "theirs"},
        "ownerReferences": [],
    }
}


@pytest.mark.parametrize("kind", ["Service", "Deployment"])
def test_a_child_name_taken_by_someone_elses_object_is_left_alone(kind: str) -> None:
    """Their object is not held (no watch keeps it). The Deployment, written first, meets
    it with its create (POST): 409; the Service, written after it, is read before anything
    is written. Either way: found not ours, never written to (FakeKube.apply would raise),
    and nothing else written either."""
    kube = FakeKube()
    kube.foreign[kind] = copy.deepcopy(THEIRS)
    rec, _ = reconciler(kube)
    assert rec.reconcile("n", "m") == 300.0
    assert kube.applied == [] and kube.forced == []
    assert kube.calls == ([("create", "Deployment")] if kind == "Deployment" else [])
    degraded = kube.statuses[-1]["conditions"][2]
    assert (degraded["reason"], kube.events[-1]) == ("NameConflict", ("Warning", "NameConflict"))
    assert f"{kind} m already exists and does not belong" in degraded["message"]
    assert "left alone" in degraded["message"]
    assert kube.statuses[-1]["phase"] == "Degraded"
    # Looked at again later: the same refusal, no new event.
    events = len(kube.events)
    assert rec.reconcile("n", "m") == 300.0
    assert kube.applied == [] and len(kube.events) == events
    assert kube.foreign[kind] == THEIRS  # never touched


@pytest.mark.parametrize("kind", ["Deployment", "Service"])
def test_a_name_taken_between_the_read_and_the_create_is_a_conflict(kind: str) -> None:
    """The child does not exist when the reconcile reads; someone creates it before the
    operator's create lands: 409, NameConflict, nothing written to it."""
    kube = FakeKube()
    rec, _ = reconciler(kube)
    real_create = kube.create

    def create_after_them(manifest: dict[str, Any]) -> dict[str, Any]:
        if manifest["kind"] == kind:
            kube.foreign[kind] = copy.deepcopy(THEIRS)  # theirs lands first
        return real_create(manifest)

    kube.create = create_after_them  # type: ignore[method-assign]
    assert rec.reconcile("n", "m") == 300.0
    assert kube.calls[-1] == ("create", kind) and kind not in kube.applied
    assert kube.statuses[-1]["conditions"][2]["reason"] == "NameConflict"
    assert kube.foreign[kind] == THEIRS


def test_a_held_child_of_another_controller_is_not_written_at_all() -> None:
    """Labelled as ours (so the watch keeps it), but controlled by something else: no
    request at all, NameConflict."""
    kube = FakeKube()
    rec, store = reconciler(kube)
    other = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "x", "uid": "rs"}
    store.put("Service", {**_held(OUR_LABELS, [{**other, "controller": True}]), "spec": {}})
    assert rec.reconcile("n", "m") == 300.0
    assert kube.calls == []  # nothing written, not even the Deployment
    degraded = kube.statuses[-1]["conditions"][2]
    assert degraded["reason"] == "NameConflict" and "Service m" in degraded["message"]


def test_a_409_on_a_child_that_is_ours_after_all_is_applied() -> None:
    """Created by an earlier reconcile whose answer was lost (or not delivered by the watch
    yet): the create's 409 reads it, finds this backend as its controller, applies."""
    kube = FakeKube()
    rec, _ = reconciler(kube)
    kube.objects["Deployment"] = {
        "kind": "Deployment",
        **_held(None, [{"kind": "LLMBackend", "uid": "u", "controller": True}]),
    }
    assert rec.reconcile("n", "m") is None
    assert kube.calls[:2] == [("create", "Deployment"), ("apply", "Deployment")]
    assert kube.forced[0] is True
    assert kube.statuses[-1]["conditions"][2]["reason"] == "AsExpected"


def test_a_later_child_found_ours_by_the_read_is_applied_not_created() -> None:
    kube = FakeKube()
    rec, _ = reconciler(kube)
    kube.objects["Service"] = {
        "kind": "Service",
        **_held(None, [{"kind": "LLMBackend", "uid": "u", "controller": True}]),
    }
    assert rec.reconcile("n", "m") is None
    assert kube.calls == [("create", "Deployment"), ("apply", "Service")]


def test_a_409_for_an_object_gone_again_is_retried() -> None:
    kube = FakeKube()
    rec, _ = reconciler(kube)
    kube.foreign["Deployment"] = copy.deepcopy(THEIRS)
    real_get = kube.get

    def gone(kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        kube.foreign.pop(kind, None)  # deleted after the 409, before the read
        return real_get(kind, namespace, name)

    kube.get = gone  # type: ignore[method-assign]
    with pytest.raises(ApiException) as err:
        rec.reconcile("n", "m")
    assert err.value.status == 409  # retryable: the queue tries again with backoff
    degraded = kube.statuses[-1]["conditions"][2]
    assert degraded["reason"] == "ApplyFailed" and "(retrying)" in degraded["message"]


def _held(labels: dict[str, str] | None, owners: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "m",
            "namespace": "n",
            "uid": "held",
            "resourceVersion": "5",
            "labels": labels or {},
            "ownerReferences": owners,
        }
    }


OUR_LABELS = {"app.kubernetes.io/managed-by": "fabric-operator", "llm.fabric.dev/backend": "m"}
BACKEND_REF = {"apiVersion": "llm.fabric.dev/v1alpha1", "kind": "LLMBackend", "name": "m"}


@pytest.mark.parametrize(
    ("child", "ours"),
    [
        (_held(None, [{"kind": "LLMBackend", "uid": "u", "controller": True}]), True),
        # An earlier backend of this name, deleted; its children not collected yet.
        (_held(OUR_LABELS, [{**BACKEND_REF, "uid": "old", "controller": True}]), True),
        (_held(OUR_LABELS, []), True),  # owner reference removed by hand, or orphaned
        (_held(None, []), False),  # someone else's, unlabelled
        (_held({"app.kubernetes.io/managed-by": "fabric-operator"}, []), False),  # not m's
        (
            _held(OUR_LABELS, [{"kind": "ConfigMap", "name": "m", "uid": "c", "controller": True}]),
            False,
        ),
        (
            _held(
                OUR_LABELS,
                [{**BACKEND_REF, "apiVersion": "other.dev/v1", "uid": "o", "controller": True}],
            ),
            False,
        ),
        (_held(OUR_LABELS, [{**BACKEND_REF, "name": "x", "uid": "x", "controller": True}]), False),
        # Only a controller reference counts.
        (_held(None, [{"kind": "LLMBackend", "uid": "u", "controller": False}]), False),
    ],
)
def test_which_children_are_ours_to_write(child: dict[str, Any], ours: bool) -> None:
    backend = LLMBackend.from_manifest(BACKEND)
    assert _ours(child, backend) is ours


def test_new_children_are_created_seen_ones_applied_with_force() -> None:
    kube = FakeKube()
    rec, store = reconciler(kube)
    rec.reconcile("n", "m")
    assert kube.calls == [("create", "Deployment"), ("create", "Service")]
    assert kube.forced == []
    dep = store.get("Deployment", "n", "m")
    assert dep is not None
    dep["spec"]["replicas"] = 5  # drift
    store.put("Deployment", dep)  # as the watch delivers it (the store hands out copies)
    rec.reconcile("n", "m")
    assert kube.calls[-1] == ("apply", "Deployment") and kube.forced == [True]


def test_the_network_policy_is_written_before_the_deployment() -> None:
    """At creation and at every change: no pod serves before its policy exists."""
    kube = FakeKube()
    rec, store = reconciler(kube)
    store.put("LLMBackend", {**BACKEND, "spec": {**BACKEND["spec"], "networkPolicy": {}}})
    rec.reconcile("n", "m")
    assert kube.calls == [
        ("create", "NetworkPolicy"),
        ("create", "Deployment"),
        ("create", "Service"),
    ]
    for kind, obj in kube.objects.items():
        store.put(kind, copy.deepcopy(obj))
    # Another engine: all three change (labels, ports).
    meta = {**BACKEND["metadata"], "generation": 2, "resourceVersion": "9"}
    spec = {"engine": "ollama", "model": {"ollama": "llama3.2:1b"}, "networkPolicy": {}}
    store.put("LLMBackend", {**BACKEND, "metadata": meta, "spec": spec})
    rec.reconcile("n", "m")
    assert [k for verb, k in kube.calls[3:] if verb == "apply"] == [
        "NetworkPolicy",
        "Deployment",
        "Service",
    ]


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


# --- lists another manager added to, or an apply left in another order ------------------

POD = "/spec/template/spec"


def settled(kube: FakeKube) -> tuple[Reconciler, Store]:
    """A backend whose children were created, and delivered back by the watches."""
    rec, store = reconciler(kube)
    rec.reconcile("n", "m")
    for kind, obj in kube.objects.items():
        store.put(kind, copy.deepcopy(obj))
    return rec, store


def drift(kube: FakeKube, store: Store, kind: str, edit: Callable[[dict[str, Any]], None]) -> None:
    """An edit by another client, seen by the watch."""
    obj = copy.deepcopy(kube.objects[kind])
    edit(obj)
    kube._written(obj)
    store.put(kind, copy.deepcopy(obj))


def add_sidecar(kube: FakeKube, store: Store) -> None:
    drift(
        kube,
        store,
        "Deployment",
        lambda d: d["spec"]["template"]["spec"]["containers"].append({"name": "sidecar"}),
    )


def test_a_sidecar_added_by_hand_is_removed_by_one_guarded_patch_without_an_apply() -> None:
    kube = FakeKube()
    rec, store = settled(kube)
    add_sidecar(kube, store)
    seen = store.get("Deployment", "n", "m")
    assert seen is not None
    assert rec.reconcile("n", "m") is None
    rv = seen["metadata"]["resourceVersion"]
    assert kube.patched == [("Deployment", rv, [f"{POD}/containers"])]
    assert kube.applied == ["Deployment", "Service"]  # no apply since creation
    assert kube.events[-1] == ("Normal", "Restored")
    restored = store.get("Deployment", "n", "m")
    assert restored is not None
    assert [c["name"] for c in restored["spec"]["template"]["spec"]["containers"]] == ["engine"]
    rec.reconcile("n", "m")  # the patch's echo: nothing more
    assert len(kube.patched) == 1 and kube.applied == ["Deployment", "Service"]


def test_a_hand_edited_service_port_is_replaced_by_the_patch_alone() -> None:
    """An apply would be refused (a second port named "http"); the patch restores it."""
    kube = FakeKube()
    rec, store = settled(kube)
    drift(kube, store, "Service", lambda s: s["spec"]["ports"][0].update(port=9999))
    rec.reconcile("n", "m")
    assert [(k, paths) for k, _, paths in kube.patched] == [("Service", ["/spec/ports"])]
    assert kube.applied == ["Deployment", "Service"]
    svc = store.get("Service", "n", "m")
    assert svc is not None and [p["port"] for p in svc["spec"]["ports"]] == [8080]


def change_env(store: Store, env: list[dict[str, Any]]) -> None:
    """A spec change to these user env vars, seen by the watch."""
    backend = store.get("LLMBackend", "n", "m")
    assert backend is not None
    meta = {**backend["metadata"], "generation": 2, "resourceVersion": "99"}
    store.put("LLMBackend", {**backend, "metadata": meta, "spec": {**BACKEND["spec"], "env": env}})


def env_names(store: Store) -> list[str]:
    dep = store.get("Deployment", "n", "m")
    assert dep is not None
    return [e["name"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]]


ENV = f"{POD}/containers/0/env"


def test_entries_an_apply_keeps_are_removed_after_it() -> None:
    """A spec change with an env var injected by hand: server-side apply keeps the
    injected entry; a patch guarded by the apply's resourceVersion removes it. Nothing is
    patched before the apply: a patch that removed it first would be a second write."""
    kube = FakeKube()
    rec, store = settled(kube)
    drift(
        kube,
        store,
        "Deployment",
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "INJ"}),
    )
    change_env(store, [{"name": "FIRST", "value": "1"}])

    def keep_foreign(manifest: dict[str, Any]) -> dict[str, Any]:
        live = kube.objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]
        env = manifest["spec"]["template"]["spec"]["containers"][0]["env"]
        env += [e for e in live if e["name"] == "INJ"]
        return manifest

    kube.merge = keep_foreign
    rec.reconcile("n", "m")
    assert kube.applied[-1] == "Deployment"
    assert kube.patched == [("Deployment", str(kube.version - 1), [ENV])]
    assert env_names(store) == [*HOME_ENV, "LLAMA_CACHE", "FIRST"]
    assert kube.events[-1] == ("Normal", "Updated")


def test_the_order_an_apply_leaves_is_put_right_after_it() -> None:
    """Server-side apply keeps an entry that exists where it is and appends new ones: the
    user's LLAMA_CACHE (which replaces the engine's, the user's order winning) stays first,
    FIRST comes after it. A patch guarded by the apply's resourceVersion puts it right."""
    kube = FakeKube()
    rec, store = settled(kube)
    change_env(store, [{"name": "FIRST", "value": "1"}, {"name": "LLAMA_CACHE", "value": "/c"}])

    def keep_positions(manifest: dict[str, Any]) -> dict[str, Any]:
        live = kube.objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]["env"]
        old = [e["name"] for e in live]
        manifest["spec"]["template"]["spec"]["containers"][0]["env"].sort(
            key=lambda e: old.index(e["name"]) if e["name"] in old else len(old)
        )
        return manifest

    kube.merge = keep_positions
    rec.reconcile("n", "m")
    assert kube.applied[-1] == "Deployment"
    applied_version = str(kube.version - 1)
    assert kube.patched == [("Deployment", applied_version, [ENV])]
    assert env_names(store) == [*HOME_ENV, "FIRST", "LLAMA_CACHE"]
    assert kube.events[-1] == ("Normal", "Updated")
    assert kube.events.count(("Normal", "Updated")) == 1  # one change, one event


def test_a_patch_that_meets_a_newer_object_is_not_a_failure_and_is_looked_at_again() -> None:
    kube = FakeKube()
    rec, store = settled(kube)
    add_sidecar(kube, store)
    seen = store.get("Deployment", "n", "m")
    statuses = len(kube.statuses)
    kube.objects["Deployment"]["metadata"]["resourceVersion"] = "99"  # written meanwhile
    assert rec.reconcile("n", "m") == STALE_RECHECK_SECONDS
    assert len(kube.patched) == 1 and store.get("Deployment", "n", "m") == seen
    assert len(kube.statuses) == statuses  # nothing to tell the user: no ApplyFailed
    assert ("Normal", "Restored") not in kube.events
    store.put("Deployment", copy.deepcopy(kube.objects["Deployment"]))  # the watch's echo
    assert rec.reconcile("n", "m") is None
    assert [rv for _, rv, _ in kube.patched] == [seen["metadata"]["resourceVersion"], "99"]


@pytest.mark.parametrize(("status", "retried"), [(422, False), (500, True)])
def test_a_refused_or_failed_patch_is_shown_like_a_failed_apply(status: int, retried: bool) -> None:
    kube = FakeKube()
    rec, store = settled(kube)
    add_sidecar(kube, store)
    kube.patch_fails_with = status
    if retried:
        with pytest.raises(ApiException):
            rec.reconcile("n", "m")
    else:
        assert rec.reconcile("n", "m") == 300.0
    degraded = kube.statuses[-1]["conditions"][2]
    assert degraded["reason"] == "ApplyFailed"
    assert ("(retrying)" in degraded["message"]) is retried


def test_entries_a_webhook_puts_back_are_left_after_one_try_not_fought_forever() -> None:
    kube = FakeKube()
    rec, store = settled(kube)

    def inject(obj: dict[str, Any]) -> dict[str, Any]:
        containers = obj["spec"]["template"]["spec"]["containers"]
        if obj["kind"] == "Deployment" and "mesh" not in [c["name"] for c in containers]:
            containers.append({"name": "mesh"})
        return obj

    kube.admit = inject
    drift(kube, store, "Deployment", lambda d: None)  # any write: the webhook injects
    rec.reconcile("n", "m")
    assert len(kube.patched) == 1  # tried once...
    store.put("Deployment", copy.deepcopy(kube.objects["Deployment"]))  # its echo
    events = len(kube.events)
    for _ in range(3):
        rec.reconcile("n", "m")
    assert len(kube.patched) == 1 and len(kube.events) == events  # ...then left alone
    # A spec change: the ops differ (they carry the containers), so one more try, then
    # the apply; and left alone again.
    change_env(store, [{"name": "FIRST", "value": "1"}])
    rec.reconcile("n", "m")
    assert kube.applied[-1] == "Deployment" and len(kube.patched) == 2
    assert env_names(store) == [*HOME_ENV, "LLAMA_CACHE", "FIRST"]
    store.put("Deployment", copy.deepcopy(kube.objects["Deployment"]))
    rec.reconcile("n", "m")
    assert len(kube.patched) == 2
    kube.admit = lambda o: o  # the webhook is gone; the next drift is restored
    drift(
        kube,
        store,
        "Deployment",
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "I"}),
    )
    rec.reconcile("n", "m")
    dep = store.get("Deployment", "n", "m")
    assert dep is not None and len(kube.patched) == 3
    assert [c["name"] for c in dep["spec"]["template"]["spec"]["containers"]] == ["engine"]


def test_children_that_outlive_their_backend_are_collected_with_preconditions() -> None:
    kube = FakeKube()
    rec, store = reconciler(kube)
    rec.reconcile("n", "m")
    versions = {k: kube.objects[k]["metadata"]["resourceVersion"] for k in kube.objects}
    store.delete("LLMBackend", "n", "m")
    kube.backend_alive = False
    assert rec.collect_orphans("n", "m", "u") == ["Deployment", "Service"]
    assert kube.deleted == [("Deployment", "deployment-uid"), ("Service", "service-uid")]
    assert kube.delete_versions == [versions["Deployment"], versions["Service"]]
    assert not store.has("Deployment", "n", "m") and not store.has("Service", "n", "m")
    # Nothing held any more: not even a request.
    checks = kube.existence_checks
    assert rec.collect_orphans("n", "m", "u") == [] and kube.existence_checks == checks


def test_children_are_left_to_a_backend_of_the_same_name_or_another_owner() -> None:
    kube = FakeKube()
    rec, _ = reconciler(kube)
    rec.reconcile("n", "m")
    assert rec.collect_orphans("n", "m", "u") == []  # the backend exists (again)
    kube.backend_alive = False
    assert rec.collect_orphans("n", "m", "other-uid") == []  # not that backend's children
    # Taken over since the store's copy was made: the fresh copy decides.
    kube.objects["Deployment"]["metadata"]["ownerReferences"][0]["uid"] = "new-uid"
    assert rec.collect_orphans("n", "m", "u") == ["Service"]
    assert kube.deleted == [("Service", "service-uid")]


def test_an_invalid_backend_drops_what_an_earlier_one_of_its_name_left_not_its_own() -> None:
    """Deleted and created again, invalid: the earlier backend's children are orphans
    (the garbage collector would delete them), not this one's to keep running."""
    kube = FakeKube()
    rec, store = reconciler(kube)
    rec.reconcile("n", "m")
    assert set(kube.objects) == {"Deployment", "Service"}
    store.put(
        "LLMBackend",
        {
            **BACKEND,
            "metadata": {**BACKEND["metadata"], "uid": "u2"},
            "spec": {**BACKEND["spec"], "resources": {"gpu": {"count": -1}}},
        },
    )
    rec.reconcile("n", "m")
    assert sorted(kube.deleted) == [("Deployment", "deployment-uid"), ("Service", "service-uid")]
    assert None not in kube.delete_versions  # with preconditions
    assert not store.has("Deployment", "n", "m") and not kube.objects
    # Its own children, when it becomes invalid later, stay: an edit is no deletion.
    kube2 = FakeKube()
    rec2, store2 = reconciler(kube2)
    rec2.reconcile("n", "m")
    store2.put(
        "LLMBackend",
        {**BACKEND, "spec": {**BACKEND["spec"], "resources": {"gpu": {"count": -1}}}},
    )
    rec2.reconcile("n", "m")
    assert kube2.deleted == [] and set(kube2.objects) == {"Deployment", "Service"}


AUTOSCALING_STATUS = {
    "desiredReplicas": 2,
    "reason": "Stable",
    "message": "3 requests in flight, target 2/replica",
    "lastScaleTime": "2026-12-01T10:00:00Z",
}


@pytest.mark.parametrize(
    "spec",
    [
        {},  # an engine backend
        {"resources": {"gpu": {"count": -1}}},  # an invalid one (the whole status is kept)
        REMOTE_SPEC,
    ],
)
def test_the_status_patch_leaves_the_autoscalers_status_alone(spec: dict[str, Any]) -> None:
    """status.autoscaling is the autoscaler's: a merge patch naming it would null it (or
    put an older copy back over a newer one)."""
    kube = FakeKube()
    store = new_store()
    obj = copy.deepcopy(BACKEND)
    obj["spec"].update(spec)
    obj["status"] = {"phase": "Pending", "autoscaling": dict(AUTOSCALING_STATUS)}
    store.put("LLMBackend", obj)
    Reconciler(store, kube).reconcile("n", "m")  # type: ignore[arg-type]
    assert kube.statuses, "a status was written"
    assert all("autoscaling" not in patch for patch in kube.statuses), kube.statuses


def test_a_status_differing_only_in_autoscaling_is_not_written() -> None:
    kube = FakeKube()
    rec, store = reconciler(kube)
    rec.reconcile("n", "m")
    written = kube.statuses[-1]
    obj = store.get("LLMBackend", "n", "m")
    assert obj is not None
    obj["status"] = {**written, "autoscaling": dict(AUTOSCALING_STATUS)}
    obj["metadata"]["resourceVersion"] = "99"
    store.put("LLMBackend", obj)
    rec.reconcile("n", "m")
    assert len(kube.statuses) == 1


class CelRefusingKube(FakeKube):
    """An API server whose CRD rules (CEL) refuse every write of this stored object, status
    included (before 1.30 nothing spares an object stored before the rules existed)."""

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self.statuses.append(status)
        raise ApiException(status=422, reason="Invalid")


def test_an_invalid_spec_the_api_server_refuses_to_store_status_for_is_not_retried() -> None:
    kube = CelRefusingKube()
    rec, store = reconciler(kube)
    bad = {"engine": "vllm", "model": {"huggingface": {"repo": "Qwen/Qwen3-8B"}}}  # no GPU
    store.put("LLMBackend", {**BACKEND, "spec": bad})
    assert rec.reconcile("n", "m") is None  # no retry storm: a spec change reconciles anew
    assert kube.statuses[-1]["phase"] == "Invalid"
    assert ("Warning", "InvalidSpec") in kube.events  # the user still hears of it
    # A valid backend's status refused is an error, retried as before.
    store.put("LLMBackend", dict(BACKEND))
    with pytest.raises(ApiException):
        rec.reconcile("n", "m")
