"""Relistings: kopf's listing seen whole, and the store forgetting what one lacks (the
deletions no watch event will ever report)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest
from kopf._cogs.clients import fetching
from kopf._cogs.structs import references

from fabric_operator.controller.reconciler import BACKEND, Reconciler, new_store
from fabric_operator.controller.runtime import Controller
from fabric_operator.machinery import relist
from fabric_operator.machinery.kopfcheck import KopfChangedError
from fabric_operator.machinery.relist import Listing
from fabric_operator.machinery.workqueue import WorkQueue

DEPLOYMENTS = references.Resource("apps", "v1", "deployments", namespaced=True)


def obj(name: str, rv: str, ns: str = "n", owner: str | None = None) -> dict[str, Any]:
    labels = {"llm.fabric.dev/backend": owner or name}
    meta = {"name": name, "namespace": ns, "resourceVersion": rv, "labels": labels}
    return {"metadata": meta, "spec": {}}


def test_what_a_listing_lacks_is_gone_unless_newer_or_out_of_its_scope() -> None:
    store = new_store()
    store.put("Deployment", obj("listed", "10"))
    store.put("Deployment", obj("gone", "11"))
    store.put("Deployment", obj("written-since", "31"))  # write-through after the listing
    store.put("Deployment", obj("elsewhere", "12", ns="other"))
    store.put("Service", obj("gone", "11"))  # another kind
    listed = {("n", "listed")}
    names = [o["metadata"]["name"] for o in store.absent_from("Deployment", "n", listed, 30)]
    assert names == ["gone"]
    everywhere = store.absent_from("Deployment", None, listed, 30)
    assert sorted(o["metadata"]["name"] for o in everywhere) == ["elsewhere", "gone"]
    # A listing without a version cannot tell newer from gone: all it lacks is gone.
    assert len(store.absent_from("Deployment", "n", listed, None)) == 2


def pages(*chunks: list[dict[str, Any]], fail: bool = False) -> Any:
    async def fetch_objs(**_: Any) -> AsyncIterator[tuple[list[dict[str, Any]], str]]:
        for chunk in chunks:
            yield chunk, "42"
        if fail:
            raise ConnectionError("cut")

    return fetch_objs


def read(monkeypatch: pytest.MonkeyPatch, original: Any, namespace: str | None) -> list[Listing]:
    """Run kopf's listing through the wrapper as kopf's watch does; what subscribers saw."""
    monkeypatch.setattr(relist, "_ORIGINAL", original)
    told: list[Listing] = []
    relist.subscribe(told.append)

    async def consume() -> int:
        seen = 0
        gen = relist.fetch_objs(
            settings=cast(Any, None),
            resource=DEPLOYMENTS,
            namespace=namespace,
            logger=cast(Any, None),
        )
        async for chunk, _ in gen:
            seen += len(chunk)
            assert not told  # nobody is told before the last chunk
        return seen

    try:
        assert asyncio.run(consume()) == 3
    except ConnectionError:
        pass
    finally:
        relist.unsubscribe(told.append)
    return told


def test_subscribers_hear_of_a_listing_once_it_is_read_to_its_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    told = read(monkeypatch, pages([obj("a", "1"), obj("b", "2")], [obj("c", "3")]), "n")
    assert told == [
        Listing("apps", "deployments", "n", frozenset({("n", "a"), ("n", "b"), ("n", "c")}), 42)
    ]


def test_a_listing_cut_short_tells_nobody(monkeypatch: pytest.MonkeyPatch) -> None:
    told = read(monkeypatch, pages([obj("a", "1"), obj("b", "2"), obj("c", "3")], fail=True), None)
    assert told == []


def test_a_failing_subscriber_does_not_stop_the_listing(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(_: Listing) -> None:
        raise RuntimeError("bug")

    relist.subscribe(broken)
    try:
        told = read(monkeypatch, pages([obj("a", "1"), obj("b", "2"), obj("c", "3")]), None)
    finally:
        relist.unsubscribe(broken)
    assert len(told) == 1


def test_install_wraps_the_kopf_it_knows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetching, "fetch_objs", relist._ORIGINAL)
    relist.install()
    assert fetching.fetch_objs is relist.fetch_objs


def test_install_refuses_a_kopf_whose_listing_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a warning and a silent fallback: the operator does not start."""

    async def changed(*, resource: Any, namespace: Any, settings: Any) -> AsyncIterator[Any]:
        yield None

    monkeypatch.setattr(fetching, "fetch_objs", relist._ORIGINAL)
    monkeypatch.setattr(relist, "_ORIGINAL", changed)
    with pytest.raises(KopfChangedError, match=r"fetch_objs .* has changed.*kopf>=1\.45,<1\.46"):
        relist.install()
    assert fetching.fetch_objs is not relist.fetch_objs  # kopf untouched


class _Kube:
    def __init__(self) -> None:
        self.exists = {("n", "m")}

    def backend_exists(self, namespace: str, name: str) -> bool:
        return (namespace, name) in self.exists


class _Reconciler:
    kube = _Kube()

    def __init__(self) -> None:
        self.collected: list[tuple[str, str, str]] = []

    def collect_orphans(self, namespace: str, name: str, uid: str) -> list[str]:
        self.collected.append((namespace, name, uid))
        return ["Deployment"]


def test_a_relisting_forgets_children_and_backends_deleted_unseen() -> None:
    async def run() -> None:
        store = new_store()
        ctl = Controller(cast(Reconciler, _Reconciler()), store)
        ctl.queue = WorkQueue()
        store.put(BACKEND, obj("m", "5"))
        store.put(BACKEND, obj("old", "6"))
        store.put("Deployment", obj("m", "7"))
        store.put("Pod", obj("m-abc", "8", owner="m"))
        # The Deployments' watch could not go on; kopf listed them again, without "m".
        ctl.relisted(Listing("apps", "deployments", None, frozenset(), 20))
        assert not store.has("Deployment", "n", "m")
        assert not ctl.listed.is_set()  # a listing says nothing of the other indexes
        await asyncio.gather(*ctl._checks)  # its backend is asked for: still there
        assert len(ctl.queue) == 1 and await ctl.queue.get() == ("n", "m")
        ctl.queue.done(("n", "m"))
        # Pods too (diagnose would report a pod that is gone).
        ctl.relisted(Listing("", "pods", "n", frozenset(), 20))
        assert store.owned("Pod", "n", "m") == [] and len(ctl.queue) == 1
        # A backend deleted unseen is forgotten, with its retries.
        ctl.queue.add_after(("n", "old"), 60)
        ctl.relisted(Listing("llm.fabric.dev", "llmbackends", None, frozenset({("n", "m")}), 20))
        assert store.names(BACKEND) == [("n", "m")]
        assert ("n", "old") not in ctl.queue._timers
        # Other resources' listings (kopf's own, say) change nothing.
        ctl.relisted(Listing("", "namespaces", None, frozenset(), 20))
        assert store.names(BACKEND) == [("n", "m")]

    asyncio.run(run())


def test_a_forgotten_backend_has_its_children_collected_after_the_grace_period() -> None:
    async def run(leading: asyncio.Event | None) -> list[tuple[str, str, str]]:
        rec = _Reconciler()
        ctl = Controller(cast(Reconciler, rec), new_store(), leading=leading)
        ctl.queue = WorkQueue()
        ctl.orphan_grace = 0.05
        gone = obj("m", "9")
        gone["metadata"]["uid"] = "u-1"
        ctl.observe(BACKEND, {"type": "DELETED", "object": gone})
        assert rec.collected == []  # the garbage collector goes first
        await asyncio.sleep(0.2)
        await ctl.stop()
        return rec.collected

    assert asyncio.run(run(None)) == [("n", "m", "u-1")]
    assert asyncio.run(run(asyncio.Event())) == []  # a follower writes nothing
