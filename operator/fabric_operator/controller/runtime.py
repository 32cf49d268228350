"""The running controller: watch events fill the store and the queue, workers reconcile."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from kubernetes.client.exceptions import ApiException

from fabric_operator.api.v1alpha1 import GROUP, PLURAL
from fabric_operator.controller.kube import CHILD_APIS
from fabric_operator.controller.reconciler import BACKEND, MANAGED_LABEL, Reconciler
from fabric_operator.machinery.metrics import Sample
from fabric_operator.machinery.relist import Listing
from fabric_operator.machinery.rest import api_message
from fabric_operator.machinery.store import Store
from fabric_operator.machinery.workqueue import WorkQueue
from fabric_operator.render.workload import (
    BACKEND_LABEL,
    DEFAULT_GATEWAY_NAMESPACE,
    MANAGED_BY,
    NAMESPACE_NAME_LABEL,
)

# (API group, plural) of each watched resource -> the kind the store holds it as
KINDS = {
    **{api: kind for kind, api in CHILD_APIS.items()},
    ("", "pods"): "Pod",
    (GROUP, PLURAL): BACKEND,
}

log = logging.getLogger(__name__)

Key = tuple[str, str]  # namespace, name of an LLMBackend
TRIM_SECONDS = 10.0
PING_SECONDS = 5.0
ORPHAN_GRACE_SECONDS = 30.0  # how long the garbage collector gets to delete children first
# How long a stop waits for the reconciles in flight (their requests time out after 35 s):
# a Lease is released only once nothing of this replica writes any more.
DRAIN_SECONDS = 20.0
T = TypeVar("T")


def before_namespace_labels(version: Any) -> bool:
    """Whether a /version answer is of a Kubernetes that does not label namespaces with
    kubernetes.io/metadata.name (before 1.21; on by default from 1.21, always from 1.22)."""
    if not isinstance(version, dict):
        return False
    major = re.match(r"\d+", str(version.get("major")))
    minor = re.match(r"\d+", str(version.get("minor")))  # "20+" on some managed clusters
    if major is None or minor is None:
        return False
    return (int(major.group()), int(minor.group())) < (1, 21)


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None elsewhere (musl, macOS) or if FABRIC_MALLOC_TRIM=0."""
    if os.environ.get("FABRIC_MALLOC_TRIM") == "0":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    trim: Callable[[int], int] | None = getattr(libc, "malloc_trim", None)
    return trim


class Companion(Protocol):
    """A leader-only loop beside the reconcile workers (the autoscaler): it runs once the
    Lease is held and every index is filled, hears of every LLMBackend event, and adds
    its own metric samples."""

    async def run(self) -> None: ...

    def backend_changed(self, namespace: str, name: str) -> None: ...

    def samples(self) -> list[Sample]: ...


class Controller:
    def __init__(
        self,
        reconciler: Reconciler,
        store: Store,
        workers: int = 4,
        leading: asyncio.Event | None = None,
        companions: list[Companion] | None = None,
    ) -> None:
        self.reconciler, self.store = reconciler, store
        self.workers = workers
        self.companions = list(companions or [])
        # With leader election, workers wait for the Lease; watches fill the store meanwhile.
        self.leading = leading
        self.queue: WorkQueue[Key] | None = None
        # Set by the first event: kopf calls event handlers only once every index (the
        # store's initial listings) is filled, so every backend's children are known.
        self.listed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._checks: set[asyncio.Task[None]] = set()
        self._collections: set[asyncio.Task[None]] = set()
        # Calls that write, running in threads: a cancelled task leaves its thread running.
        self._writing: set[asyncio.Future[Any]] = set()
        self.drained = False  # stopped, and no write in flight any more
        self.orphan_grace = ORPHAN_GRACE_SECONDS
        self.reconciles = 0
        self.errors = 0
        self.last_error: str | None = None
        self.api_server: dict[str, Any] = {"reachable": None, "since": None, "lastError": None}

    async def start(self) -> None:
        self.queue = WorkQueue()
        self._tasks = [asyncio.create_task(self._work(i)) for i in range(self.workers)]
        if self.leading is not None:
            self._tasks.append(asyncio.create_task(self._resync_on_leading()))
        self._tasks.append(asyncio.create_task(self._give_back_memory()))
        self._tasks.append(asyncio.create_task(self._watch_api_server()))
        self._tasks += [asyncio.create_task(self._accompany(c)) for c in self.companions]

    async def _accompany(self, companion: Companion) -> None:
        """A companion runs where the workers do: on the leader, once the store is filled."""
        if self.leading is not None:
            await self.leading.wait()
        await self.listed.wait()
        await companion.run()

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a thread, waited for by `stop` before the Lease is released:
        how companions write."""
        return await self._writer(fn, *args)

    def samples(self) -> list[Sample]:
        return [s for c in self.companions for s in c.samples()]

    async def _watch_api_server(self) -> None:
        """Whether the API server answers, for /healthz (which stays 200: a liveness
        failure would only restart the operator into the same outage)."""
        told = False
        while True:
            try:
                version = await asyncio.to_thread(self.reconciler.kube.ping)
                reachable, error = True, None
                if not told:
                    told = True
                    self._tell_namespace_label(version)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # any failure to get an answer is "unreachable"
                reachable, error = False, f"{type(err).__name__}: {err}"[:300]
            if reachable != self.api_server.get("reachable"):
                self.api_server["since"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                if not reachable:
                    log.warning("API server unreachable: %s", error)
                elif self.api_server.get("reachable") is False:
                    log.info("API server reachable again")
            self.api_server["reachable"] = reachable
            self.api_server["lastError"] = error or self.api_server.get("lastError")
            await asyncio.sleep(PING_SECONDS)

    def _tell_namespace_label(self, version: Any) -> None:
        """Kubernetes before 1.21 does not label namespaces with their name: the default
        NetworkPolicy then admits the gateway only once the admin has labelled its
        namespace (it admits nothing else meanwhile). Said once, at start."""
        if not before_namespace_labels(version):
            return
        namespace = self.reconciler.settings.config.gateway_namespace or DEFAULT_GATEWAY_NAMESPACE
        log.warning(
            "Kubernetes %s.%s sets no %s label on namespaces: the default NetworkPolicy "
            "admits the gateway only once its namespace is labelled: kubectl label "
            "namespace %s %s=%s",
            version.get("major"),
            version.get("minor"),
            NAMESPACE_NAME_LABEL,
            namespace,
            NAMESPACE_NAME_LABEL,
            namespace,
        )

    async def _give_back_memory(self) -> None:
        """After a burst (the initial listing, a mass update) glibc keeps the freed heap;
        when the queue is idle, hand it back to the OS so RSS reflects what is held."""
        trim = _malloc_trim()
        if trim is None:
            return
        trimmed_at = -1  # reconciles done when last trimmed: trim once after activity
        while True:
            await asyncio.sleep(TRIM_SECONDS)
            if (self.queue is not None and len(self.queue)) or self.reconciles == trimmed_at:
                continue
            gc.collect()
            trim(0)
            trimmed_at = self.reconciles

    async def _resync_on_leading(self) -> None:
        """A new leader looks at every backend once (unchanged ones cost no request)."""
        assert self.leading is not None and self.queue is not None
        await self.leading.wait()
        await self.listed.wait()
        for key in self.store.names(BACKEND):
            self.queue.add(key)

    async def stop(self, drain_seconds: float = DRAIN_SECONDS) -> bool:
        """Stop the workers, then wait for the writes they left in threads (cancelling a
        task does not stop its thread). True, and `drained`, once none is left."""
        tasks = [*self._tasks, *self._collections]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        writing = set(self._writing)
        if writing:
            _done, pending = await asyncio.wait(writing, timeout=drain_seconds)
            if pending:
                log.warning("stopping with %d reconcile(s) still running", len(pending))
                return False
        self.drained = True
        return True

    async def _writer(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a thread, tracked until it returns even if the caller is
        cancelled (see `stop`)."""
        future = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._writing.add(future)
        future.add_done_callback(self._writing.discard)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved
        return await asyncio.shield(future)

    def ours(self, kind: str, obj: dict[str, Any]) -> bool:
        """A child labelled as the operator's, or one it held before its labels changed."""
        meta = obj.get("metadata") or {}
        if (meta.get("labels") or {}).get(MANAGED_LABEL) == MANAGED_BY:
            return True
        return self.store.has(kind, meta.get("namespace") or "", meta.get("name") or "")

    def keep(self, kind: str, obj: dict[str, Any]) -> bool:
        """The initial listing of a child kind: store only ours (and say if it is)."""
        if not self.ours(kind, obj):
            return False
        self.store.put(kind, obj)
        return True

    def relisted(self, listing: Listing) -> None:
        """A complete listing (kopf lists again after a watch could not go on): what the
        store holds that it lacks was deleted while no watch was looking. Each is handled
        as the DELETED event that never came."""
        kind = KINDS.get((listing.group, listing.plural))
        if kind is None:
            return
        for obj in self.store.absent_from(kind, listing.namespace, listing.names, listing.version):
            meta = obj.get("metadata") or {}
            log.info(
                "%s %s/%s was deleted while the watch was down: forgetting it",
                kind,
                meta.get("namespace"),
                meta.get("name"),
            )
            # Not `observe`: a listing is no sign that every index is filled.
            self._handle(kind, {"type": "DELETED", "object": obj}, stored=False)

    def observe_child(self, kind: str, event: dict[str, Any]) -> None:
        """A child's event, after its index handler stored it (`keep`): queue its backend."""
        if self.ours(kind, event.get("object") or {}):
            self.observe(kind, event, stored=True)

    def observe(self, kind: str, event: dict[str, Any], *, stored: bool = False) -> None:
        """A watch event: update the store (unless `stored` already, by an index handler;
        deletions never are) and queue the LLMBackend it concerns."""
        self.listed.set()
        self._handle(kind, event, stored=stored)

    def _handle(self, kind: str, event: dict[str, Any], *, stored: bool) -> None:
        obj = event.get("object") or {}
        meta = obj.get("metadata") or {}
        namespace, name = meta.get("namespace") or "", meta.get("name") or ""
        deleted = event.get("type") == "DELETED"
        if deleted:
            self.store.delete(kind, namespace, name, meta.get("uid"))
        elif not stored:
            self.store.put(kind, obj)
        if kind == BACKEND:
            key = (namespace, name)
            if deleted and not self.store.has(BACKEND, namespace, name):
                self._forgotten(key, meta.get("uid"))  # (not if a new one took the name)
            for companion in self.companions:
                companion.backend_changed(namespace, name)
        else:
            # Children carry their backend's name (and label; the name survives relabelling).
            owner = (meta.get("labels") or {}).get(BACKEND_LABEL) or name
            if not self.store.has(BACKEND, namespace, owner):
                return
            key = (namespace, owner)
            if event.get("type") == "DELETED" and kind != "Pod":
                # Deleted by hand (drift), or by the garbage collector because the backend
                # is gone and a watch restart hid its deletion: only the API can tell.
                check = asyncio.create_task(self._requeue_if_alive(key))
                self._checks.add(check)  # held until done: the loop keeps only weak refs
                check.add_done_callback(self._checks.discard)
                return
        if self.queue is not None:
            self.queue.add(key)

    async def _requeue_if_alive(self, key: Key) -> None:
        asked = ((self.store.get(BACKEND, *key) or {}).get("metadata") or {}).get("uid")
        try:
            alive = await asyncio.to_thread(self.reconciler.kube.backend_exists, *key)
        except Exception:  # unsure: reconcile as usual, the children are recreated
            alive = True
        # Only the backend held when we asked is gone: one created since keeps the name.
        if not alive and asked and self.store.delete(BACKEND, *key, asked):
            log.info("%s/%s is gone (its deletion was missed): forgetting it", *key)
            self._forgotten(key, asked)
        elif self.queue is not None:
            self.queue.add(key)

    def _forgotten(self, key: Key, uid: str | None) -> None:
        """A backend is gone: no more retries; its children are the garbage collector's,
        and ours if they outlive the grace period (`Reconciler.collect_orphans`)."""
        if self.queue is not None:
            self.queue.drop(key)
        if uid:
            task = asyncio.create_task(self._collect_orphans(key, uid))
            self._collections.add(task)
            task.add_done_callback(self._collections.discard)

    async def _collect_orphans(self, key: Key, uid: str) -> None:
        await asyncio.sleep(self.orphan_grace)
        if self.leading is not None and not self.leading.is_set():
            return  # a follower writes nothing
        try:
            kinds = await self._writer(self.reconciler.collect_orphans, *key, uid)
        except Exception as err:  # next time, maybe: the garbage collector may yet do it
            detail = api_message(err) if isinstance(err, ApiException) else str(err)
            log.warning("%s/%s: could not collect its children: %s", *key, detail)
            return
        if kinds:
            log.warning(
                "%s/%s was deleted %.0fs ago but its %s still ran (the garbage collector "
                "missed them): deleted",
                *key,
                self.orphan_grace,
                " and ".join(kinds),
            )

    async def _work(self, worker: int) -> None:
        assert self.queue is not None
        queue = self.queue
        if self.leading is not None:
            await self.leading.wait()
        while True:
            key = await queue.get()
            started = time.monotonic()
            try:
                recheck = await self._writer(self.reconciler.reconcile, *key)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # any failure is retried with backoff, never fatal
                self.errors += 1
                detail = api_message(err) if isinstance(err, ApiException) else str(err)
                self.last_error = f"{key[0]}/{key[1]}: {type(err).__name__}: {detail}"[:500]
                delay = queue.retry(key)
                log.warning(
                    "reconcile %s/%s failed (retry in %.1fs): %s", *key, delay, self.last_error
                )
            else:
                queue.forget(key)
                if recheck is not None:
                    queue.add_after(key, recheck)
            finally:
                self.reconciles += 1
                queue.done(key)
                log.debug(
                    "worker %d reconciled %s/%s in %.3fs", worker, *key, time.monotonic() - started
                )

    def health(self) -> dict[str, Any]:
        return {
            "backends": self.store.count(BACKEND),
            "leading": self.leading is None or self.leading.is_set(),
            "apiServer": dict(self.api_server),
            "queued": len(self.queue) if self.queue is not None else 0,
            "reconciles": self.reconciles,
            "errors": self.errors,
            "lastError": self.last_error,
            "apiRequests": self.reconciler.kube.request_counts(),
        }
