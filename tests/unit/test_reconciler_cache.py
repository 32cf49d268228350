"""The reconciler and spec.cache: the backend's own claim (created, pruned, refused
changes that must not hold the Deployment back) and the namespace's shared claim."""

from __future__ import annotations

import copy
from typing import Any

from kubernetes.client.exceptions import ApiException

from fabric_operator.controller.reconciler import Reconciler, new_store
from fabric_operator.machinery.store import Store
from tests.unit.test_reconciler import BACKEND, FakeKube

OWN = {"size": "10Gi", "persistentVolumeClaim": {}}
SHARED = {"size": "10Gi", "persistentVolumeClaim": {"shared": True}}


def with_cache(cache: dict[str, Any] | None, generation: int = 1) -> dict[str, Any]:
    obj = copy.deepcopy(BACKEND)
    obj["metadata"]["generation"] = generation
    if cache is not None:
        obj["spec"]["cache"] = cache
    return obj


class CacheKube(FakeKube):
    """FakeKube whose status writes answer with the backend as the test set it."""

    backend: dict[str, Any] = BACKEND

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self.statuses.append(status)
        return {**self.backend, "status": status}


def reconciler(kube: CacheKube, obj: dict[str, Any]) -> tuple[Reconciler, Store]:
    store = new_store()
    put(kube, store, obj)
    return Reconciler(store, kube), store  # type: ignore[arg-type]


def put(kube: CacheKube, store: Store, obj: dict[str, Any]) -> None:
    """A spec as the watch delivers it."""
    kube.backend = obj
    store.put("LLMBackend", obj)


def deliver(kube: CacheKube, store: Store) -> None:
    """What the watches bring back after the writes."""
    for kind, obj in kube.objects.items():
        store.put(kind, copy.deepcopy(obj))


def test_the_own_claim_is_created_before_the_deployment_and_pruned_when_turned_off() -> None:
    kube = CacheKube()
    rec, store = reconciler(kube, with_cache(OWN))
    rec.reconcile("n", "m")
    assert kube.applied == ["PersistentVolumeClaim", "Deployment", "Service"]
    claim = kube.objects["PersistentVolumeClaim"]
    assert claim["metadata"]["ownerReferences"][0]["uid"] == "u"
    deliver(kube, store)
    put(kube, store, with_cache(None, generation=2))
    rec.reconcile("n", "m")
    assert ("PersistentVolumeClaim", claim["metadata"]["uid"]) in kube.deleted
    volumes = kube.objects["Deployment"]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "cache", "emptyDir": {}} in volumes


def test_a_refused_claim_change_does_not_hold_back_the_deployment() -> None:
    kube = CacheKube()
    rec, store = reconciler(kube, with_cache(OWN))
    rec.reconcile("n", "m")
    deliver(kube, store)
    applied = len(kube.applied)
    real_apply = kube.apply

    def refuse_claims(manifest: dict[str, Any], *, force: bool = True) -> dict[str, Any]:
        if manifest["kind"] == "PersistentVolumeClaim":
            raise ApiException(status=422, reason="spec is immutable after creation")
        return real_apply(manifest, force=force)

    kube.apply = refuse_claims  # type: ignore[method-assign]
    smaller = with_cache({**OWN, "size": "5Gi"}, generation=2)
    smaller["spec"]["image"] = "r/llama.cpp:new"  # and an image bump in the same edit
    put(kube, store, smaller)
    rec.reconcile("n", "m")
    assert kube.applied[applied:] == ["Deployment"]  # the claim refused, the rest applied
    image = kube.objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "r/llama.cpp:new"
    status = kube.statuses[-1]
    [degraded] = [c for c in status["conditions"] if c["type"] == "Degraded"]
    assert degraded["reason"] == "ApplyFailed"
    assert (
        "PersistentVolumeClaim m" in degraded["message"] and "left as it is" in degraded["message"]
    )


def test_the_shared_claim_is_created_once_and_never_owned() -> None:
    kube = CacheKube()
    rec, store = reconciler(kube, with_cache(SHARED))
    rec.reconcile("n", "m")
    claim = kube.objects["PersistentVolumeClaim"]
    assert claim["metadata"]["name"].startswith("fabric-cache-")
    assert "ownerReferences" not in claim["metadata"]
    assert kube.created[0] == "PersistentVolumeClaim"
    assert ("Normal", "CacheClaimCreated") in kube.events
    deliver(kube, store)
    calls = len(kube.calls)
    rec.reconcile("n", "m")  # settled: no write, and no look at the claim either
    assert len(kube.calls) == calls
    # Turned off: the shared claim stays (other backends may use it).
    put(kube, store, with_cache(None, generation=2))
    rec.reconcile("n", "m")
    assert not any(kind == "PersistentVolumeClaim" for kind, _ in kube.deleted)


def test_a_shared_claim_someone_holds_is_used_as_it_is() -> None:
    kube = CacheKube()
    kube.foreign["PersistentVolumeClaim"] = {"metadata": {"name": "x", "uid": "theirs"}}
    rec, _ = reconciler(kube, with_cache(SHARED))
    rec.reconcile("n", "m")
    assert "PersistentVolumeClaim" not in kube.created
    assert ("Normal", "CacheClaimCreated") not in kube.events
    assert kube.applied == ["Deployment", "Service"]


def test_a_refused_shared_claim_is_a_failure_named_after_it_not_a_crash() -> None:
    kube = CacheKube()
    real_create = kube.create

    def over_quota(manifest: dict[str, Any]) -> dict[str, Any]:
        if manifest["kind"] == "PersistentVolumeClaim":
            raise ApiException(status=403, reason="exceeded quota: requests.storage")
        return real_create(manifest)

    kube.create = over_quota  # type: ignore[method-assign]
    rec, _ = reconciler(kube, with_cache(SHARED))
    rec.reconcile("n", "m")
    [degraded] = [c for c in kube.statuses[-1]["conditions"] if c["type"] == "Degraded"]
    assert degraded["reason"] == "ApplyFailed"
    assert degraded["message"].startswith("PersistentVolumeClaim fabric-cache-")
    assert kube.applied == []  # no pods that would wait for a claim that is not there
