"""The watch store (held as compact JSON), what handlers shed from kopf's copies, and how
index and event handlers share the work of filling the store and the queue."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import kopf

from fabric_operator.controller.handlers import shed
from fabric_operator.controller.reconciler import BACKEND, Reconciler, new_store
from fabric_operator.controller.runtime import Controller
from fabric_operator.machinery.store import LAST_APPLIED, Store
from fabric_operator.machinery.workqueue import WorkQueue

LABELS = {"app.kubernetes.io/managed-by": "fabric-operator", "llm.fabric.dev/backend": "m"}


def child(name: str = "m", rv: str = "5", labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": "n",
            "resourceVersion": rv,
            "labels": dict(LABELS if labels is None else labels),
            "annotations": {LAST_APPLIED: "{...}", "keep": "me"},
            "managedFields": [{"manager": "fabric-operator", "fieldsV1": {"f:spec": {}}}],
        },
        "spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "engine"}]}}},
        "status": {"readyReplicas": 1},
    }


def test_store_hands_out_copies_without_what_is_never_read() -> None:
    store = new_store()
    original = child()
    store.put("Deployment", original)
    held = store.get("Deployment", "n", "m")
    assert held is not None
    assert "managedFields" not in held["metadata"]
    assert held["metadata"]["annotations"] == {"keep": "me"}
    assert held["spec"] == original["spec"] and held["status"] == original["status"]
    assert "managedFields" in original["metadata"]  # the caller's object is untouched
    held["spec"]["replicas"] = 5
    original["spec"]["replicas"] = 7
    again = store.get("Deployment", "n", "m")
    assert again is not None and again["spec"]["replicas"] == 1
    assert store.has("Deployment", "n", "m") and not store.has("Service", "n", "m")


def test_store_round_trips_any_text() -> None:
    store = new_store()
    obj = child()
    obj["spec"]["args"] = ["ünïcödé ✓", "\ud83d", "😀", 'quote " and \\ backslash', "\x00"]
    store.put("Deployment", obj)
    held = store.get("Deployment", "n", "m")
    assert held is not None and held["spec"]["args"] == obj["spec"]["args"]


def test_store_follows_a_child_that_changes_owner() -> None:
    store = new_store()
    store.put("Pod", child(rv="1"))
    store.put("Pod", child(rv="2", labels={"llm.fabric.dev/backend": "other"}))
    assert store.owned("Pod", "n", "m") == []
    [pod] = store.owned("Pod", "n", "other")
    assert pod["metadata"]["resourceVersion"] == "2"
    store.delete("Pod", "n", "m")
    assert store.owned("Pod", "n", "other") == []


def test_shed_empties_kopfs_copy_in_place_but_for_its_metadata() -> None:
    raw = child()
    shed(kopf.Body(raw), content=False)
    assert raw["spec"] == {} and raw["status"] == {}
    assert "managedFields" not in raw["metadata"]
    assert raw["metadata"]["annotations"] == {"keep": "me"}
    assert raw["metadata"]["labels"] == LABELS
    kept = child()
    shed(kopf.Body(kept), content=True)
    assert kept["spec"] == child()["spec"] and "managedFields" not in kept["metadata"]


class _Kube:
    def backend_exists(self, namespace: str, name: str) -> bool:
        return True


class _Reconciler:
    kube = _Kube()


def controller() -> tuple[Controller, Store]:
    store = new_store()
    ctl = Controller(cast(Reconciler, _Reconciler()), store)
    ctl.queue = WorkQueue()
    return ctl, store


def backend(rv: str = "1") -> dict[str, Any]:
    return {"metadata": {"name": "m", "namespace": "n", "resourceVersion": rv}, "spec": {}}


def test_index_stores_children_then_the_event_only_queues_their_backend() -> None:
    async def run() -> None:
        ctl, store = controller()
        ctl.observe(BACKEND, {"type": None, "object": backend()})
        assert ctl.queue is not None and len(ctl.queue) == 1
        await ctl.queue.get()
        ctl.queue.done(("n", "m"))
        raw = child()
        assert ctl.keep("Deployment", dict(kopf.Body(raw)))
        shed(kopf.Body(raw), content=False)
        ctl.observe_child("Deployment", {"type": "MODIFIED", "object": raw})
        held = store.get("Deployment", "n", "m")
        assert held is not None and held["spec"]["replicas"] == 1  # not the shed copy
        assert len(ctl.queue) == 1
        # A child someone relabelled is still ours: the store remembers it.
        relabelled = child(rv="6", labels={})
        assert ctl.keep("Deployment", relabelled)
        held = store.get("Deployment", "n", "m")
        assert held is not None and held["metadata"]["labels"] == {}
        # Others' objects are not kept.
        assert not ctl.keep("Deployment", child(name="theirs", labels={}))
        assert not store.has("Deployment", "n", "theirs")
        # Deletions come without an index call: the event handler forgets the child.
        ctl.observe_child("Deployment", {"type": "DELETED", "object": child(rv="7", labels={})})
        assert not store.has("Deployment", "n", "m")
        await asyncio.gather(*ctl._checks)

    asyncio.run(run())


def test_a_new_leader_queues_stored_backends_only_once_the_listings_are_in() -> None:
    async def run() -> None:
        store = new_store()
        leading = asyncio.Event()
        ctl = Controller(cast(Reconciler, _Reconciler()), store, leading=leading)
        ctl.queue = WorkQueue()
        store.put(BACKEND, backend())  # by its index handler, while kopf still lists
        leading.set()
        resync = asyncio.create_task(ctl._resync_on_leading())
        await asyncio.sleep(0.01)
        assert len(ctl.queue) == 0  # children may not be known yet
        other = child(name="x", labels={**LABELS, "llm.fabric.dev/backend": "x"})
        ctl.observe_child("Deployment", {"type": None, "object": other})  # queues nothing
        await asyncio.wait_for(resync, 1)
        assert len(ctl.queue) == 1

    asyncio.run(run())


def with_uid(obj: dict[str, Any], uid: str) -> dict[str, Any]:
    obj["metadata"]["uid"] = uid
    return obj


def test_a_deletion_forgets_only_the_object_it_names() -> None:
    store = new_store()
    store.put("Deployment", with_uid(child(rv="9"), "new"))
    assert not store.delete("Deployment", "n", "m", "old")  # the old one's late DELETED
    assert store.has("Deployment", "n", "m") and store.owned("Deployment", "n", "m")
    assert store.delete("Deployment", "n", "m", "new")
    assert not store.has("Deployment", "n", "m") and store.owned("Deployment", "n", "m") == []
    assert not store.delete("Deployment", "n", "m")


def test_a_backend_recreated_under_its_name_survives_the_old_ones_late_deletion() -> None:
    """kopf's workers are per uid: the new backend's ADDED may be handled first."""

    async def run() -> None:
        ctl, store = controller()
        assert ctl.queue is not None
        ctl.queue.add_after(("n", "m"), 30)  # the new one's recheck
        ctl.observe(BACKEND, {"type": "ADDED", "object": with_uid(backend(rv="9"), "new")})
        ctl.observe(BACKEND, {"type": "DELETED", "object": with_uid(backend(rv="5"), "old")})
        held = store.get(BACKEND, "n", "m")
        assert held is not None and held["metadata"]["uid"] == "new"
        assert len(ctl.queue) == 1 and ("n", "m") in ctl.queue._timers
        assert not ctl._collections  # nothing of the name is collected
        await ctl.stop()

    asyncio.run(run())


class _Gone:
    def backend_exists(self, namespace: str, name: str) -> bool:
        return False


class _GoneKube:
    """The API says the backend is gone; meanwhile a new one is created and seen."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def backend_exists(self, namespace: str, name: str) -> bool:
        self.store.put(BACKEND, with_uid(backend(rv="20"), "new"))
        return False


def test_a_missed_deletion_forgets_only_the_backend_it_asked_about() -> None:
    async def run(recreated: bool) -> tuple[bool, int]:
        store = new_store()
        rec = _Reconciler()
        rec.kube = _GoneKube(store) if recreated else _Gone()  # type: ignore[assignment]
        ctl = Controller(cast(Reconciler, rec), store)
        ctl.queue = WorkQueue()
        store.put(BACKEND, with_uid(backend(rv="5"), "old"))
        await ctl._requeue_if_alive(("n", "m"))
        await ctl.stop()
        return store.has(BACKEND, "n", "m"), len(ctl.queue)

    assert asyncio.run(run(recreated=False)) == (False, 0)
    assert asyncio.run(run(recreated=True)) == (True, 1)  # the new one is reconciled
