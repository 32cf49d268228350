"""The reconciler holds the operator's own rollouts back (paced upgrades), never the
user's, and still scales a held backend."""

from __future__ import annotations

import copy
from typing import Any

from kubernetes.client.exceptions import ApiException

from fabric_operator.config import OperatorConfig
from fabric_operator.controller import pacing
from fabric_operator.controller.reconciler import Reconciler, Settings, new_store
from fabric_operator.machinery.store import Store
from tests.unit.test_reconciler import BACKEND
from tests.unit.test_reconciler_cache import CacheKube, put

PINNED = "ghcr.io/ggml-org/llama.cpp:server-b10290"
MIRROR = "mirror.invalid/llama.cpp:server-b10290"


def backend(generation: int = 1, **spec: Any) -> dict[str, Any]:
    obj = copy.deepcopy(BACKEND)
    obj["metadata"]["generation"] = generation
    obj["spec"].update(spec)
    return obj


def done(deployment: dict[str, Any]) -> dict[str, Any]:
    """As the Deployment controller reports a finished rollout."""
    out = copy.deepcopy(deployment)
    replicas = out["spec"]["replicas"]
    out["metadata"]["generation"] = out["metadata"].get("generation", 1)
    out["status"] = {
        "observedGeneration": out["metadata"]["generation"],
        "replicas": replicas,
        "updatedReplicas": replicas,
        "availableReplicas": replicas,
    }
    return out


def other_rolling(store: Store, name: str) -> None:
    """Another backend's Deployment, mid-rollout."""
    store.put(
        "Deployment",
        {
            "metadata": {
                "name": name,
                "namespace": "n",
                "generation": 2,
                "labels": {
                    "app.kubernetes.io/managed-by": "fabric-operator",
                    "llm.fabric.dev/backend": name,
                },
            },
            "spec": {"replicas": 1},
            "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 0},
        },
    )


def running(kube: CacheKube, limit: int = 1) -> tuple[Reconciler, Store]:
    """A backend an earlier operator version (no mirror, no hashes) created, rolled out;
    then this one, with an image mirror: the pods would change, the spec did not."""
    first = Reconciler(new_store(), kube)  # type: ignore[arg-type]
    put(kube, first.store, backend())
    first.reconcile("n", "m")
    # As an earlier version wrote it: without the hashes.
    notes = kube.objects["Deployment"]["metadata"]["annotations"]
    del notes[pacing.SPEC_HASH], notes[pacing.TEMPLATE_HASH]
    store = new_store()
    put(kube, store, {**backend(), "status": kube.statuses[-1]})
    for kind, obj in kube.objects.items():
        store.put(kind, done(obj) if kind == "Deployment" else copy.deepcopy(obj))
    config = OperatorConfig(images={PINNED: MIRROR}, maxUpgradeRollouts=limit)
    return Reconciler(store, kube, Settings(config=config)), store  # type: ignore[arg-type]


def image(kube: CacheKube) -> str:
    return str(kube.objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"])


def progressing(kube: CacheKube) -> dict[str, Any]:
    [cond] = [c for c in kube.statuses[-1]["conditions"] if c["type"] == "Progressing"]
    return cond


def test_held_while_others_roll_then_rolled_in_turn() -> None:
    kube = CacheKube()
    rec, store = running(kube)
    other_rolling(store, "other")
    applied = len(kube.applied)
    assert rec.reconcile("n", "m") == 5.0  # looked at again soon
    assert kube.applied[applied:] == [] and image(kube) == PINNED
    assert progressing(kube)["reason"] == "UpgradeQueued"
    assert ("Normal", "UpgradeQueued") in kube.events
    # Its spec hash is written beside it (metadata only: a Deployment of an earlier
    # version had none), so later spec changes are told apart without guessing.
    notes = kube.objects["Deployment"]["metadata"]["annotations"]
    assert pacing.SPEC_HASH in notes
    store.put("Deployment", done(kube.objects["Deployment"]))
    events = len(kube.events)
    rec.reconcile("n", "m")  # still held: no second event
    assert kube.events[events:] == []
    store.put("Deployment", done(store.get("Deployment", "n", "other") or {}))  # other done
    rec.reconcile("n", "m")
    assert kube.applied[-1] == "Deployment" and image(kube) == MIRROR
    assert progressing(kube)["reason"] != "UpgradeQueued"


def test_a_held_backend_still_scales() -> None:
    kube = CacheKube()
    rec, store = running(kube)
    other_rolling(store, "other")
    rec.reconcile("n", "m")  # held: the spec hash written beside the Deployment
    store.put("Deployment", done(kube.objects["Deployment"]))
    # The autoscaler writes replicas (a new generation): scaled at once, still held.
    put(kube, store, {**backend(generation=2, replicas=3), "status": kube.statuses[-1]})
    rec.reconcile("n", "m")
    dep = kube.objects["Deployment"]
    assert dep["spec"]["replicas"] == 3 and image(kube) == PINNED  # scaled, not rolled
    assert any("/spec/replicas" in paths for _, _, paths in kube.patched)


def test_the_users_own_change_is_never_held() -> None:
    kube = CacheKube()
    rec, store = running(kube)
    other_rolling(store, "other")
    rec.reconcile("n", "m")  # held first
    store.put("Deployment", done(kube.objects["Deployment"]))
    changed = backend(generation=2, engineOptions={"contextLength": 4096})
    put(kube, store, {**changed, "status": kube.statuses[-1]})
    rec.reconcile("n", "m")
    assert kube.applied[-1] == "Deployment"
    assert "4096" in kube.objects["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert image(kube) == MIRROR  # the rendering as it is now, in the same rollout


def test_an_admitted_rollout_that_was_not_written_frees_its_slot() -> None:
    kube = CacheKube()
    rec, _ = running(kube, limit=1)
    real_apply = kube.apply

    def refuse(manifest: dict[str, Any], *, force: bool = True) -> dict[str, Any]:
        if manifest["kind"] == "Deployment":
            raise ApiException(status=403, reason="denied by an image policy")
        return real_apply(manifest, force=force)

    kube.apply = refuse  # type: ignore[method-assign]
    rec.reconcile("n", "m")  # admitted, refused
    assert rec.pacer.admit(("n", "x"), "t", [], lambda k, t: False) == (True, 0)
