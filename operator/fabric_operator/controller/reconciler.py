"""One reconcile per LLMBackend: read desired state, read what exists, apply the difference,
write status. Reads come from the watch store; the API is only called to change something.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException

from fabric_operator.api.backend import LLMBackend
from fabric_operator.api.v1alpha1 import GROUP, KIND, Phase
from fabric_operator.config import OperatorConfig
from fabric_operator.controller import pacing
from fabric_operator.controller import status as st
from fabric_operator.controller.diagnose import diagnose
from fabric_operator.controller.diff import (
    HASH_ANNOTATION,
    needs_apply,
    needs_write,
    with_bookkeeping,
)
from fabric_operator.controller.kube import Kube, child_versions
from fabric_operator.controller.lists import list_ops, port_ops, snapshot
from fabric_operator.controller.startup import last_start
from fabric_operator.machinery.rest import api_message
from fabric_operator.machinery.store import Store
from fabric_operator.render import render, toolcalls
from fabric_operator.render.cache import shared_cache_claim
from fabric_operator.render.workload import BACKEND_LABEL, MANAGED_BY
from fabric_operator.validation import Problem, referenced_secrets, validate

log = logging.getLogger(__name__)

BACKEND = "LLMBackend"
# Retried by the queue with backoff: the API server is busy, restarting or racing us.
RETRYABLE = {409, 429, 500, 502, 503, 504}
# A missing Secret may be created any moment: look again this often.
SECRET_RECHECK_SECONDS = 30.0
FAILED_APPLY_RECHECK_SECONDS = 300.0
# A guarded patch met a newer object: its watch event normally queues the backend again
# first; this is the net under a missed one (or a 409 a proxy made up).
STALE_RECHECK_SECONDS = 2.0
# A held upgrade looks again this often (other backends' rollouts end without an event of
# its own).
PACE_RECHECK_SECONDS = 5.0
REASON_NAME_CONFLICT = "NameConflict"
CHILD_KINDS = frozenset(
    {"Deployment", "Service", "NetworkPolicy", "PersistentVolumeClaim", "PodDisruptionBudget"}
)
# Status keys another writer owns (the autoscaler loop), which the reconciler leaves alone.
FOREIGN_STATUS = frozenset({"autoscaling"})
MANAGED_LABEL = "app.kubernetes.io/managed-by"


def new_store() -> Store:
    """The watch store as this controller reads it: children and pods found by the
    backend their BACKEND_LABEL names, pods held without their spec (only diagnose reads
    pods, and only their metadata and status)."""
    return Store(BACKEND_LABEL, specless=("Pod",))


class NameConflictError(Exception):
    """A child's name is taken by an object the backend does not own."""


@dataclass(frozen=True)
class Settings:
    cluster_domain: str = "cluster.local"
    config: OperatorConfig = field(default_factory=OperatorConfig)


class Reconciler:
    def __init__(self, store: Store, kube: Kube, settings: Settings | None = None) -> None:
        self.store, self.kube = store, kube
        self.settings = settings or Settings()
        # (kind, namespace, name) -> snapshot of list ops the API server undid as it took
        # them (a mutating webhook re-adding a sidecar): not sent again, or each patch's
        # watch event would bring the next one; sent again once the lists change.
        self._undone: dict[tuple[str, str, str], list[Any]] = {}
        self._undone_lock = threading.Lock()
        self.pacer = pacing.Pacer(self.settings.config.max_upgrade_rollouts)

    def reconcile(self, namespace: str, name: str) -> float | None:
        """Bring one LLMBackend's children and status to its spec.

        Returns seconds after which to look again (None: only on the next event).
        Raises on transient API errors, for the queue to retry with backoff.
        """
        obj = self.store.get(BACKEND, namespace, name)
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            return None  # owner references let the garbage collector remove the children
        previous = obj.get("status") or {}
        backend, problems = validate(obj, self.settings.config)
        if backend is None:
            self._drop_older(namespace, name, obj["metadata"].get("uid"))
            unparsable = st.Failure(st.REASON_INVALID, _join(problems))
            generation = obj["metadata"].get("generation")
            self._report(obj, st.invalid_status(generation, unparsable, previous), [])
            return None
        if backend.spec.remote is not None:
            return self._reconcile_remote(obj, backend, problems)

        server = getattr(self.kube, "server", None)
        desired = desired_children(backend, self.settings.config, server) if not problems else []
        stale = [
            m
            for m in desired
            if needs_write(
                m,
                self.store.get(m["kind"], namespace, name),
                undone=self._undone_snapshot(m["kind"], namespace, name),
            )
        ]
        recheck: float | None = None
        if not problems and (stale or backend.generation != previous.get("observedGeneration")):
            problems = self._secret_problems(backend)
            recheck = SECRET_RECHECK_SECONDS if problems else None

        failure: st.Failure | None = (
            st.Failure(st.REASON_INVALID, _join(problems)) if problems else None
        )
        applied: list[tuple[str, dict[str, Any]]] = []
        transient: ApiException | None = None
        queued: str | None = None
        if failure is None:
            queued = self._pace(backend, stale, previous)
            if queued is not None:
                recheck = PACE_RECHECK_SECONDS
        if failure is not None:
            self._drop_older(namespace, name, backend.uid)
        else:
            failure, transient, settled = self._apply(backend, stale, applied)
            if not any(m["kind"] == "Deployment" for _, m in applied):
                self.pacer.release((namespace, name))  # admitted, but nothing rolls
            if failure is not None:
                recheck = FAILED_APPLY_RECHECK_SECONDS
            else:
                self._prune(backend, keep={m["kind"] for m in desired})
                if not settled:
                    recheck = STALE_RECHECK_SECONDS
        deployment = self.store.get("Deployment", namespace, name)
        pods = self.store.owned("Pod", namespace, name)
        diagnosis = diagnose(pods)
        status = st.compute(
            backend,
            deployment,
            failure,
            previous,
            diagnosis=diagnosis,
            cluster_domain=self.settings.cluster_domain,
            restarts=_restarts(pods),
            # Kept once the pods are gone (scaled to zero): the last start still tells.
            last_start=last_start(pods, previous.get("lastStart")) or previous.get("lastStart"),
            queued=queued,
        )
        self._report(obj, status, applied)
        if transient is not None:
            raise transient  # shown in the status; the queue retries with backoff
        return recheck

    def _reconcile_remote(
        self, obj: dict[str, Any], backend: LLMBackend, problems: list[Problem]
    ) -> float | None:
        """A remote backend is a route for the gateway: no children, only a status.

        Children left from when it was an engine backend are deleted."""
        previous = obj.get("status") or {}
        recheck: float | None = None
        was_invalid = any(
            c.get("reason") == st.REASON_INVALID for c in previous.get("conditions") or []
        )
        if not problems and (
            backend.generation != previous.get("observedGeneration") or was_invalid
        ):
            problems = self._secret_problems(backend)
            recheck = SECRET_RECHECK_SECONDS if problems else None
        failure = st.Failure(st.REASON_INVALID, _join(problems)) if problems else None
        if failure is None:
            self._prune(backend, keep=set())
        else:
            self._drop_older(backend.namespace, backend.name, backend.uid)
        self._report(obj, st.remote_status(backend, failure, previous), [])
        return recheck

    def _prune(self, backend: LLMBackend, keep: set[str]) -> None:
        """Delete this backend's children of kinds it no longer wants (a backend turned
        remote, a NetworkPolicy switched off)."""
        for kind in sorted(CHILD_KINDS - keep):
            child = self.store.get(kind, backend.namespace, backend.name)
            if child is not None and _owned_by(child, backend.uid):
                self.kube.delete(kind, backend.namespace, backend.name, child["metadata"]["uid"])
                self.store.delete(kind, backend.namespace, backend.name)

    def _drop_older(self, namespace: str, name: str, uid: str | None) -> None:
        """Delete the children an earlier LLMBackend of this name left, when this one
        (`uid`) is invalid and so will not take them over: their owner is gone, the
        garbage collector would delete them too (and with it off, or behind, they would
        run on under a backend that does not want them). Checked on a fresh copy,
        deleted with preconditions; this backend's own children stay as they are."""

        def left(child: dict[str, Any]) -> bool:
            return _older(child, name, uid)

        for kind in sorted(CHILD_KINDS):
            if left(self.store.get(kind, namespace, name) or {}) and self._delete_if(
                kind, namespace, name, left
            ):
                log.info(
                    "%s/%s: deleted the %s an earlier LLMBackend of this name left",
                    namespace,
                    name,
                    kind,
                )

    def _delete_if(
        self, kind: str, namespace: str, name: str, still: Callable[[dict[str, Any]], bool]
    ) -> bool:
        """Delete a child if a fresh copy still passes `still`, with preconditions on its
        uid and resourceVersion (nobody's newer object is deleted unseen)."""
        current = self.kube.get(kind, namespace, name)
        if current is None or not still(current):
            return False
        meta = current["metadata"]
        self.kube.delete(kind, namespace, name, meta["uid"], meta.get("resourceVersion"))
        self.store.delete(kind, namespace, name)
        return True

    def collect_orphans(self, namespace: str, name: str, uid: str) -> list[str]:
        """Delete the children that outlived their LLMBackend (`uid`, deleted a while ago),
        as the garbage collector should have: one whose watches lost the deletion (a
        kube-controller-manager after an API server restart, seen in tests/faults) leaves
        them, with their pods, running. Only a child that still names that very backend
        as its controller, checked on a fresh copy, is deleted, with preconditions on its
        uid and resourceVersion; nothing is touched if a backend of that name exists again
        (its reconcile takes the children over). Returns the kinds deleted."""
        held = [
            kind
            for kind in sorted(CHILD_KINDS)
            if _owned_by(self.store.get(kind, namespace, name) or {}, uid)
        ]
        if not held or self.kube.backend_exists(namespace, name):
            return []
        return [
            kind
            for kind in held
            if self._delete_if(kind, namespace, name, lambda c: _owned_by(c, uid))
        ]

    def _secret_problems(self, backend: LLMBackend) -> list[Problem]:
        problems = []
        for path, name, key in referenced_secrets(backend):
            keys = self.kube.secret_keys(backend.namespace, name)
            if keys is None:
                problems.append(
                    Problem(path, f"Secret {name!r} not found in namespace {backend.namespace!r}")
                )
            elif key not in keys:
                problems.append(
                    Problem(
                        f"{path}.key",
                        # Other key names are not listed: they are not the user's to see.
                        f"Secret {name!r} has no key {key!r}",
                    )
                )
        return problems

    def _apply(
        self,
        backend: LLMBackend,
        stale: list[dict[str, Any]],
        applied: list[tuple[str, dict[str, Any]]],
    ) -> tuple[st.Failure | None, ApiException | None, bool]:
        """Write each stale child in the rendered order: the NetworkPolicy first, so that
        no pod serves before its policy exists; the Deployment before the Service, as the
        likelier to be refused by the API server (no Service is then left without its
        Deployment). The first refusal stops. Whose each child is, is settled before
        anything is written (a child the store does not hold, after the first, is read):
        a name someone else holds is a NameConflict with nothing written (a taken Service
        never gets our Deployment beside it); only a race (the name taken between that
        read and the create) stops midway.

        A refusal is a Failure; a transient error (busy, conflict, 5xx) is a Failure too,
        so the user sees it, plus the error for the caller to retry. The flag is False
        when a guarded list patch met an object newer than ours: not a failure, the
        newer copy is reconciled next."""
        settled = True
        held: dict[str, dict[str, Any] | None] = {}
        manifest: dict[str, Any] = shared_cache_claim(backend, MANAGED_BY) or {}
        try:
            if stale and manifest:  # only when pods may be created: no GET per reconcile
                self._ensure_shared_claim(backend, manifest)
            for i, manifest in enumerate(stale):
                meta = manifest["metadata"]
                kind = manifest["kind"]
                held[kind] = self.store.get(kind, meta["namespace"], meta["name"])
                if i and held[kind] is None:
                    held[kind] = self.kube.get(kind, meta["namespace"], meta["name"])
                found = held[kind]
                if found is not None and not _ours(found, backend):
                    raise _conflict(manifest)
            refused_claim: str | None = None
            for manifest in stale:
                before = held[manifest["kind"]]
                try:
                    result, done = self._write(backend, manifest, before)
                except ApiException as err:
                    # A claim's spec is immutable but for growing: a refused change (a
                    # smaller size, another class) must not hold back the Deployment.
                    if not _claim_refusal(manifest, before, err):
                        raise
                    refused_claim = f"PersistentVolumeClaim {manifest['metadata']['name']}: "
                    refused_claim += api_message(err)
                    continue
                settled = settled and done
                if result is not None:
                    self.store.put(manifest["kind"], result)
                    applied.append((_change(before, manifest), manifest))
            if refused_claim is not None:
                message = f"{refused_claim} (the claim was left as it is; the rest was applied)"
                return st.Failure(st.REASON_APPLY_FAILED, message), None, settled
        except NameConflictError as err:
            return st.Failure(REASON_NAME_CONFLICT, str(err)), None, settled
        except ApiException as err:
            message = f"{manifest['kind']} {manifest['metadata']['name']}: {api_message(err)}"
            if err.status in RETRYABLE:
                failure = st.Failure(st.REASON_APPLY_FAILED, f"{message} (retrying)", retrying=True)
                return failure, err, settled
            return st.Failure(st.REASON_APPLY_FAILED, message), None, settled
        return None, None, settled

    def _pace(
        self, backend: LLMBackend, stale: list[dict[str, Any]], previous: dict[str, Any]
    ) -> str | None:
        """Hold the Deployment back (taken out of `stale`) while `maxUpgradeRollouts`
        other backends roll for the operator's reasons and this one would too; its
        replicas still follow the spec. Returns why it waits, or None."""
        deployment = next((m for m in stale if m["kind"] == "Deployment"), None)
        if deployment is None:
            return None
        key = (backend.namespace, backend.name)
        live = self.store.get("Deployment", *key)
        if live is None or not _ours(live, backend):
            return None
        if not pacing.is_upgrade(backend, deployment, live, previous.get("observedGeneration")):
            return None
        template = deployment["metadata"]["annotations"][pacing.TEMPLATE_HASH]
        admitted, _ = self.pacer.admit(
            key,
            template,
            self._rolling(),
            lambda k, t: pacing.rolled(self.store.get("Deployment", *k), t),
        )
        if admitted:
            return None
        stale.remove(deployment)
        ops = []
        wanted, has = deployment["spec"]["replicas"], (live.get("spec") or {}).get("replicas")
        if wanted != has:  # the autoscaler's (or kubectl scale's) replicas are not held
            ops.append({"op": "replace", "path": "/spec/replicas", "value": wanted})
        notes = (live.get("metadata") or {}).get("annotations")
        if pacing.SPEC_HASH not in (notes or {}):
            # Written by an earlier version: from now on a spec change is told by the hash
            # (metadata only: no pod rolls for it).
            value = deployment["metadata"]["annotations"][pacing.SPEC_HASH]
            ops.append(
                {
                    "op": "add",
                    "path": f"/metadata/annotations/{_pointer(pacing.SPEC_HASH)}",
                    "value": value,
                }
                if notes is not None
                else {
                    "op": "add",
                    "path": "/metadata/annotations",
                    "value": {pacing.SPEC_HASH: value},
                }
            )
        if ops:
            result = self._patch_guarded(deployment, live, ops)
            if result is not None:
                self.store.put("Deployment", result)
        return (
            "this operator version renders the pods differently while the spec did not "
            f"change: the rollout waits its turn (at most {self.pacer.limit} such rollouts at "
            "a time; the spec's own changes are never held)"
        )

    def _rolling(self) -> list[tuple[str, str]]:
        """Backends whose Deployment (ours) is rolling out now."""
        out = []
        for ns, name in self.store.names("Deployment"):
            deployment = self.store.get("Deployment", ns, name)
            labels = ((deployment or {}).get("metadata") or {}).get("labels") or {}
            if (
                deployment
                and labels.get(MANAGED_LABEL) == MANAGED_BY
                and pacing.rolling(deployment)
            ):
                out.append((ns, name))
        return out

    def _ensure_shared_claim(self, backend: LLMBackend, manifest: dict[str, Any]) -> None:
        """Create the namespace's weight cache claim for this model if it does not exist
        (spec.cache.persistentVolumeClaim.shared). It has no owner and is never written
        again: other backends of the model use it too, and it outlives them all. Whatever
        holds the name in the namespace is used as it is (it is the team's own)."""
        meta = manifest["metadata"]
        if self.kube.get(manifest["kind"], meta["namespace"], meta["name"]) is not None:
            return
        try:
            self.kube.create(manifest)
        except ApiException as err:
            if err.status != 409:
                raise
            return
        obj = self.store.get(BACKEND, backend.namespace, backend.name)
        if obj is not None:
            self.kube.post_event(
                obj,
                "Normal",
                "CacheClaimCreated",
                f"PersistentVolumeClaim {meta['name']} created for the weights of "
                f"{backend.spec.source.describe()}, shared by this namespace's backends of "
                "that model; it is kept when they are deleted",
                st.now(),
            )

    def _write(
        self, backend: LLMBackend, manifest: dict[str, Any], before: dict[str, Any] | None
    ) -> tuple[dict[str, Any] | None, bool]:
        """Apply and/or patch one child: (the object as last written, None if nothing
        was; False if a guarded patch met a newer object).

        A port edited by hand goes first, or the apply would be refused beside it (two
        ports named "http"). Then the apply if fields differ, then a patch for the lists
        (entries another manager added, the order an apply left): when only lists
        differed, that patch is the only write.

        A child held but not ours (`_ours`) is never written to: NameConflict."""
        if before is not None and not _ours(before, backend):
            raise _conflict(manifest)
        live, wrote = before, None
        if before is not None and needs_apply(manifest, before):
            ops = port_ops(manifest, before)
            if ops:
                live = wrote = self._patch_guarded(manifest, before, ops)
                if live is None:
                    return None, False
        if live is None or needs_apply(manifest, live):
            live = wrote = self._apply_one(backend, manifest, before)
        realigned = self._patch_lists(manifest, live)
        if realigned is None:
            return wrote, False
        return (realigned if realigned is not live else wrote), True

    def _patch_lists(self, manifest: dict[str, Any], live: dict[str, Any]) -> dict[str, Any] | None:
        """`live` with its rendered lists in rendered shape (see `lists`): `live` itself
        when nothing was to be sent, None when the object changed since it was read.

        Ops the API server undid as it took them (a mutating webhook putting a sidecar
        back) are remembered, and not sent again until something changes."""
        meta = live["metadata"]
        key = (manifest["kind"], meta["namespace"], meta["name"])
        ops = list_ops(manifest, live)
        if not ops or snapshot(ops, live) == self._undone_snapshot(*key):
            return live
        result = self._patch_guarded(manifest, live, ops)
        if result is None:
            return None
        left = list_ops(manifest, result)
        with self._undone_lock:
            if left:
                self._undone[key] = snapshot(left, result)
            else:
                self._undone.pop(key, None)
        if left:
            log.warning(
                "%s %s/%s: the API server put entries back as it took them out (a mutating "
                "webhook?); left as they are: %s",
                *key,
                [op["path"] for op in left],
            )
        return result

    def _patch_guarded(
        self, manifest: dict[str, Any], live: dict[str, Any], ops: list[dict[str, Any]]
    ) -> dict[str, Any] | None:
        """A JSON patch valid only for this very resourceVersion, so that nobody's later
        write is undone unseen: None when the object changed since, or is gone (the
        watch brings the newer copy)."""
        meta = live["metadata"]
        key = (manifest["kind"], meta["namespace"], meta["name"])
        try:
            return self.kube.patch_guarded(*key, meta["resourceVersion"], ops)
        except ApiException as err:
            if err.status not in (404, 409):
                raise
            log.debug("%s %s/%s: %s", *key, api_message(err))
            return None

    def _undone_snapshot(self, kind: str, namespace: str, name: str) -> list[Any] | None:
        with self._undone_lock:
            return self._undone.get((kind, namespace, name))

    def _apply_one(
        self, backend: LLMBackend, manifest: dict[str, Any], before: dict[str, Any] | None
    ) -> dict[str, Any]:
        """A child we hold (and that is ours: `_write`) is applied with force: drift is
        taken back. A child we do not hold is created (POST), never applied: an apply
        would merge into an object someone else made under that name (another team's
        Service gains our selector and owner reference, and is then deleted with the
        backend). A 409 means the name is taken: the object is read, and left alone
        unless it turns out to be ours (created by an earlier reconcile whose answer was
        lost, or held by no watch yet)."""
        if before is not None:
            return self.kube.apply(manifest)
        try:
            return self.kube.create(manifest)
        except ApiException as err:
            if err.status != 409:
                raise
            taken = err
        meta = manifest["metadata"]
        current = self.kube.get(manifest["kind"], meta["namespace"], meta["name"])
        if current is None:
            raise taken  # deleted again meanwhile: retried (409 is retryable)
        if not _ours(current, backend):
            raise _conflict(manifest)
        return self.kube.apply(manifest)

    def _report(
        self, obj: dict[str, Any], status: dict[str, Any], applied: list[tuple[str, dict[str, Any]]]
    ) -> None:
        """Events for what changed, then the status if it differs from the stored one."""
        meta = obj["metadata"]
        # status.autoscaling is the autoscaler's: neither compared nor patched (a merge
        # patch naming it would null it, or put back an older copy over a newer one).
        previous = _own_status(obj.get("status") or {})
        status = _own_status(status)
        stamp = st.now()
        by_reason: dict[str, list[str]] = {}
        for reason, manifest in applied:
            by_reason.setdefault(reason, []).append(
                f"{manifest['kind']} {manifest['metadata']['name']}"
            )
        for reason, what in by_reason.items():
            self.kube.post_event(obj, "Normal", reason, f"{reason} {' and '.join(what)}", stamp)
        for cond in st.transitions(previous, status):
            if cond["type"] == st.DEGRADED and cond["status"] == "True":
                self.kube.post_event(obj, "Warning", cond["reason"], cond["message"], stamp)
            elif (
                cond["type"] == st.READY and cond["status"] == "True" and previous.get("conditions")
            ):
                self.kube.post_event(obj, "Normal", "Ready", cond["message"], stamp)
            elif cond["type"] == st.PROGRESSING and cond["reason"] == st.REASON_UPGRADE_QUEUED:
                self.kube.post_event(obj, "Normal", cond["reason"], cond["message"], stamp)
            elif cond["type"] == st.TOOL_CALLING:
                # Off for want of a parser is news (an agent's first request will fail);
                # otherwise only a change is, not the first status of a new backend.
                if cond["reason"] == toolcalls.NO_PARSER_KNOWN:
                    self.kube.post_event(obj, "Warning", "ToolCallingOff", cond["message"], stamp)
                elif st.TOOL_CALLING in st.by_type(previous):
                    on = "On" if cond["status"] == "True" else "Off"
                    self.kube.post_event(obj, "Normal", f"ToolCalling{on}", cond["message"], stamp)
        if status != previous:
            patch = {k: status.get(k) for k in set(previous) | set(status)}
            try:
                updated = self.kube.patch_status(meta["namespace"], meta["name"], patch)
            except ApiException as err:
                if err.status == 404:
                    return  # deleted meanwhile
                if err.status == 422 and status.get("phase") == Phase.INVALID:
                    # The CRD's CEL rules check the whole object on a status write too, and
                    # before 1.30 they do not spare an object stored before they existed:
                    # its InvalidSpec cannot be written. The Event above says it; retrying
                    # cannot help until the spec is fixed (which is a new reconcile).
                    log.warning(
                        "%s/%s: InvalidSpec not written to status, the API server refuses "
                        "the object: %s",
                        meta["namespace"],
                        meta["name"],
                        api_message(err),
                    )
                    return
                raise
            self.store.put(BACKEND, updated)
            changed = previous.get("phase") != status.get("phase")
            log.log(
                logging.INFO if changed else logging.DEBUG,
                "%s/%s: %s (%s ready)",
                meta["namespace"],
                meta["name"],
                status.get("phase"),
                status.get("ready"),
            )


def _pointer(key: str) -> str:
    """A map key as one JSON-pointer segment (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


def _claim_refusal(
    manifest: dict[str, Any], before: dict[str, Any] | None, err: ApiException
) -> bool:
    """An existing cache claim the API server refuses to change (not a transient error)."""
    return (
        manifest["kind"] == "PersistentVolumeClaim"
        and before is not None
        and err.status not in RETRYABLE
    )


def desired_children(
    backend: LLMBackend, config: OperatorConfig, server: tuple[int, int] | None = None
) -> list[dict[str, Any]]:
    """The children as the operator applies them on a server of this version (unknown:
    a current one): rendered, the Deployment annotated for paced upgrades, each with its
    owner reference and config hash."""
    policy = child_versions(server).get("PodDisruptionBudget", "v1")
    evict = server is not None and server >= (1, 27)
    rendered = render(backend, config, policy_version=policy, evict_unhealthy=evict).all()
    for m in rendered:
        if m["kind"] == "Deployment":
            pacing.annotate(m, backend)
    return [with_bookkeeping(m, backend) for m in rendered]


def _own_status(status: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in status.items() if k not in FOREIGN_STATUS}


def _change(before: dict[str, Any] | None, manifest: dict[str, Any]) -> str:
    """Why a child was applied: Created, Updated (spec changed) or Restored (drifted)."""
    if before is None:
        return "Created"
    old_hash = ((before.get("metadata") or {}).get("annotations") or {}).get(HASH_ANNOTATION)
    return (
        "Restored"
        if old_hash == manifest["metadata"]["annotations"][HASH_ANNOTATION]
        else "Updated"
    )


def _restarts(pods: list[dict[str, Any]]) -> int:
    return sum(
        int(cs.get("restartCount") or 0)
        for pod in pods
        if not (pod.get("metadata") or {}).get("deletionTimestamp")
        for cs in (pod.get("status") or {}).get("containerStatuses") or []
    )


def _conflict(manifest: dict[str, Any]) -> NameConflictError:
    kind, name = manifest["kind"], manifest["metadata"]["name"]
    return NameConflictError(
        f"{kind} {name} already exists and does not belong to this LLMBackend; it is left "
        "alone (not changed, not adopted): delete or rename it, or rename the LLMBackend"
    )


def _ours(child: dict[str, Any], backend: LLMBackend) -> bool:
    """Whether the operator may write to `child` for `backend`: its controller is this
    backend, or an earlier LLMBackend of this name (deleted, its children not yet
    collected: taken over, as a recreated backend always did); or it has no controller
    and still carries this backend's labels (its owner reference removed by hand, or
    orphaned on purpose with --cascade=orphan). Anything else, with another controller
    or without our labels, was made by someone else under the name."""
    controller = _controller(child)
    if controller is not None:
        return controller.get("uid") == backend.uid or _older(child, backend.name, backend.uid)
    labels = (child.get("metadata") or {}).get("labels") or {}
    return labels.get(MANAGED_LABEL) == MANAGED_BY and labels.get(BACKEND_LABEL) == backend.name


def _controller(child: dict[str, Any]) -> dict[str, Any] | None:
    refs = (child.get("metadata") or {}).get("ownerReferences") or []
    return next((r for r in refs if r.get("controller")), None)


def _older(child: dict[str, Any], name: str, uid: str | None) -> bool:
    """Controlled by an earlier LLMBackend named `name` (not by the one of `uid`, nor by
    anything else)."""
    controller = _controller(child)
    return (
        controller is not None
        and controller.get("uid") != uid
        and controller.get("kind") == KIND
        and str(controller.get("apiVersion") or "").split("/")[0] == GROUP
        and controller.get("name") == name
    )


def _owned_by(child: dict[str, Any], uid: str | None) -> bool:
    refs = (child.get("metadata") or {}).get("ownerReferences") or []
    return uid is not None and any(r.get("uid") == uid and r.get("controller") for r in refs)


def _join(problems: list[Problem]) -> str:
    return "; ".join(str(p) for p in problems)
