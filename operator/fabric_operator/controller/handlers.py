"""kopf wiring: three watches feed the controller; nothing here talks to the API itself.

Only `on.event` handlers are used, so kopf adds no finalizers, annotations or progress
writes to users' objects: deleting an LLMBackend never waits for the operator.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from fabric_operator.api.v1alpha1 import GROUP, PLURAL, VERSION
from fabric_operator.controller.kube import CHILD_APIS
from fabric_operator.controller.reconciler import BACKEND
from fabric_operator.controller.runtime import Controller
from fabric_operator.machinery import indexgate, metrics, relist
from fabric_operator.machinery.store import LAST_APPLIED
from fabric_operator.render.workload import MANAGED_BY

MANAGED = {"app.kubernetes.io/managed-by": MANAGED_BY}


# Read by neither kopf (for `on.event` and index handlers) nor the event handlers, which
# only look at the type, name, namespace, uid, labels (filters, owner) and deletion.
UNREAD_METADATA = ("ownerReferences", "creationTimestamp", "generation")


def shed(body: kopf.Body, *, content: bool) -> None:
    """Drop, from the object as kopf holds it, what no handler will read again:
    managedFields and kubectl's last-applied copy (most of a Deployment's weight), and
    without `content` the spec, the status and unread metadata too (the object is in the
    store by then, or not ours).

    At a restart kopf lists every watched object and holds each one, as parsed, until all
    indexes are filled; with 1,000 LLMBackends that was 48 MB of dicts at once, and what a
    burst touches stays resident. kopf reads none of these fields (no finalizers, progress
    annotations or field filters here), and `body` views the very dicts kopf holds."""
    meta = body.get("metadata")
    if isinstance(meta, dict):
        meta.pop("managedFields", None)
        annotations = meta.get("annotations")
        if isinstance(annotations, dict):
            annotations.pop(LAST_APPLIED, None)
    if not content:
        for part in ("spec", "status"):
            held = body.get(part)
            if isinstance(held, dict):
                held.clear()
        if isinstance(meta, dict):
            for key in UNREAD_METADATA:
                meta.pop(key, None)


def configure_settings(settings: kopf.OperatorSettings) -> None:
    settings.posting.enabled = False  # our own Events say what users need to see
    settings.posting.level = logging.WARNING
    # Serve the given namespaces (or the cluster) as they are: no need to list/watch
    # Namespaces and CRDs, so RBAC stays minimal.
    settings.scanning.disabled = True
    # A per-object kopf worker lives until idle this long; at a restart there is one
    # per watched object at once, so let them go soon (the queue does our batching).
    settings.queueing.idle_timeout = 0.5
    # List in pages: a restart then never holds a whole parsed listing at once.
    settings.watching.chunk_size = 100
    # Only our pods, selected by the API server: without it every pod of the cluster is
    # sent, and kopf holds a worker for each (children are not filtered: see below).
    settings.watching.label_selectors["", "v1", "pods"] = ",".join(
        f"{k}={v}" for k, v in MANAGED.items()
    )
    # Without these a silently dropped watch connection is never noticed.
    settings.watching.connect_timeout = 30
    settings.watching.server_timeout = 270
    settings.watching.client_timeout = 300
    settings.networking.error_backoffs = [1, 2, 5, 10]


def install_kopf_wraps() -> None:
    """Wrap the kopf internals the operator relies on (idempotent). Raises
    KopfChangedError if the installed kopf's have another shape."""
    indexgate.install()  # a restart's wait for the indexes, linear in the objects
    relist.install()  # complete listings are told to the controller (`configure`)


def _watch_child(registry: kopf.OperatorRegistry, kind: str, group: str, plural: str) -> None:
    """The index handler (fills the store) and event handler (queues the backend) of one
    child kind."""

    @kopf.index(group, "v1", plural, id=f"{plural}_cache", registry=registry)
    async def child_cache(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        memo["controller"].keep(kind, dict(body))
        shed(body, content=False)

    @kopf.on.event(group, "v1", plural, id=f"{plural}_event", registry=registry)
    async def child_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        memo["controller"].observe_child(kind, dict(event))


def build_registry() -> kopf.OperatorRegistry:
    install_kopf_wraps()
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo:
        """kopf's watches use the credentials the operator's client already loaded."""
        cfg = memo["configuration"]
        header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix(
            "authorization"
        )
        scheme, _sep, token = str(header or "").rpartition(" ")
        return kopf.ConnectionInfo(
            server=cfg.host,
            ca_path=cfg.ssl_ca_cert,
            insecure=not cfg.verify_ssl,
            scheme=scheme or ("Bearer" if token else None),
            token=token or None,
            certificate_path=cfg.cert_file,
            private_key_path=cfg.key_file,
            trust_env=settings.networking.trust_env,
        )

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        configure_settings(settings)
        controller: Controller = memo["controller"]
        await controller.start()
        relist.subscribe(controller.relisted)
        address = memo.get("metrics_address")
        if address:
            host, _sep, port = address.rpartition(":")
            memo["metrics_runner"] = await metrics.serve(controller, host or "0.0.0.0", int(port))

    @kopf.on.cleanup(registry=registry)
    async def stop(memo: kopf.Memo, **_: Any) -> None:
        relist.unsubscribe(memo["controller"].relisted)
        await memo["controller"].stop()
        runner = memo.get("metrics_runner")
        if runner is not None:
            await runner.cleanup()

    # Index handlers fill the store, and kopf holds every other handler until all indexes
    # are filled: no LLMBackend is reconciled before its children are known (else a
    # restart would re-apply all of them). An object's index handler runs before its event
    # handler, for every event but deletions: it stores the object, the event handler
    # queues its backend. Children are not filtered by label: a child whose labels someone removed
    # must still be seen (and restored); `Controller.keep` keeps only ours, labelled or
    # remembered.
    for kind, (group, plural) in CHILD_APIS.items():
        _watch_child(registry, kind, group, plural)

    @kopf.index("", "v1", "pods", labels=MANAGED, registry=registry)
    async def pod_cache(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        memo["controller"].store.put("Pod", dict(body))
        shed(body, content=False)

    @kopf.index(GROUP, VERSION, PLURAL, registry=registry)
    async def backend_cache(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        memo["controller"].store.put(BACKEND, dict(body))
        shed(body, content=False)

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def backend_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        memo["controller"].observe(BACKEND, dict(event), stored=True)

    @kopf.on.event("", "v1", "pods", labels=MANAGED, registry=registry)
    async def pod_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
        memo["controller"].observe("Pod", dict(event), stored=True)

    @kopf.on.probe(id="controller", registry=registry)
    def probe(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
        health: dict[str, Any] = memo["controller"].health()
        return health

    return registry
