"""Where the gateway's snapshot comes from: the cluster (watched) or a static file.

Both produce the same `Snapshot`; the proxy holds a `Source` and reads `.snapshot` once
per request. What each keeps in memory: the LLMBackends and their Endpoints (without
managedFields), of each key Secret only its key's digest and grant (`KeyEntry`), and of
each backend's own key Secret only the one value the backend names, dropped when no
backend names it any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import httpx
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fabric_operator.api.v1alpha1 import (
    GROUP,
    PLURAL,
    VERSION,
    Provider,
    Routing,
)
from fabric_operator.gateway.enginequeue import QUEUE_GAUGES
from fabric_operator.gateway.kubewatch import ApiClient, ObjectKey, Resource, Watch, slim
from fabric_operator.gateway.providerauth import CredentialError, Credentials
from fabric_operator.gateway.routes import (
    ALL,
    DEFAULT_KEY_SELECTOR,
    Backend,
    KeyEntry,
    Snapshot,
    Tenant,
    affinity,
    backend_from_object,
    build_snapshot,
    build_tenants,
    grant,
    key_digest,
    key_entry,
    namespace_of,
    remote_refusal,
    secret_value,
)
from fabric_operator.remotehosts import RemoteHosts
from fabric_operator.render.workload import MANAGED_BY

log = logging.getLogger(__name__)

EVERYONE = Tenant(name="anonymous", models=(ALL,), namespaces=(ALL,))
SECRET_REFRESH_SECONDS = 30.0
SecretRef = tuple[str, str, str]  # (namespace, Secret name, key in it)


class Source:
    """Holds the current snapshot; `run` keeps it current until cancelled."""

    def __init__(self) -> None:
        self._snapshot = Snapshot()
        self._next: asyncio.Event | None = None
        # Called with each new snapshot (the gateway's metrics: `Gateway._zero_tokens`).
        self.watchers: list[Callable[[Snapshot], None]] = []

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    @snapshot.setter
    def snapshot(self, value: Snapshot) -> None:
        self._snapshot = value
        for watcher in self.watchers:
            watcher(value)
        if self._next is not None:
            self._next.set()  # wakes what `changed` handed out: held requests
            self._next = None

    def changed(self) -> asyncio.Event:
        """Set when the next snapshot replaces this one (an Endpoints change: a pod
        became ready), so a held request waits without polling."""
        if self._next is None:
            self._next = asyncio.Event()
        return self._next

    @property
    def ready(self) -> bool:
        return True

    def status(self) -> dict[str, Any]:
        return {"models": len(self.snapshot.routes), "keys": len(self.snapshot.tenants)}

    async def run(self) -> None:
        await asyncio.Event().wait()


# ---- static file -------------------------------------------------------------------------


class _FileModel(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class FileBackend(_FileModel):
    id: str = Field(min_length=1, description="Name in errors, headers and metrics.")
    model: str = Field(min_length=1)
    urls: list[str] = Field(min_length=1, alias="baseURLs")
    api_key_env: str | None = Field(default=None, alias="apiKeyEnv")
    upstream_model: str | None = Field(default=None, alias="upstreamModel")
    provider: Provider = Provider.OPENAI_COMPATIBLE
    fallback: list[str] = Field(default_factory=list)
    namespace: str | None = Field(
        default=None,
        min_length=1,
        description="Whose backend it is (default: the id's part before '/', else "
        "'default'): tenants reach the backends of the namespaces they are granted.",
    )
    routing: Routing | None = Field(
        default=None, description="As an LLMBackend's spec.routing: how a URL is picked."
    )
    engine: Literal["vllm", "tgi", "llamacpp"] | None = Field(
        default=None,
        description="The engine behind the URLs (one pod each): its queue gauges are read "
        "from URL/../metrics and reported on /load as `engine`.",
    )

    @property
    def space(self) -> str:
        return self.namespace or namespace_of(self.id)


class FileTenant(_FileModel):
    name: str = Field(min_length=1)
    key_env: str = Field(alias="keyEnv", min_length=1)
    models: list[str] = Field(default_factory=list, description="None unless listed.")
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1, description="Tokens per minute.")
    namespaces: list[str] = Field(
        default_factory=lambda: [ALL],
        description="The namespaces whose backends the tenant reaches (names, or '*'; "
        "default '*': the file's author wrote every backend and every tenant).",
    )


class FileConfig(_FileModel):
    """The gateway without a cluster: upstreams and keys from a file; keys themselves come
    from environment variables, so the file can be committed. Everything in it is the
    platform admin's: a tenant's grant is its `namespaces` and `models`."""

    require_keys: bool = Field(default=True, alias="requireKeys")
    backends: list[FileBackend] = Field(default_factory=list)
    tenants: list[FileTenant] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> FileConfig:
        by_id = {b.id: b for b in self.backends}
        for b in self.backends:
            missing = [f for f in b.fallback if f not in by_id]
            if missing:
                raise ValueError(f"backend {b.id}: unknown fallback {', '.join(missing)}")
            foreign = [f for f in b.fallback if by_id[f].space != b.space]
            if foreign:
                raise ValueError(
                    f"backend {b.id}: fallback {', '.join(foreign)} is in another namespace "
                    f"than {b.space} (a tenant reaches a namespace's backends only)"
                )
        names = [t.name for t in self.tenants]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"tenant {', '.join(twice)} is listed twice")
        return self


class FileSource(Source):
    def __init__(self, path: Path, remote_hosts: RemoteHosts | None = None) -> None:
        super().__init__()
        # Where a Vertex key's token_uri may point besides Google (providerauth).
        self.credentials = Credentials(remote_hosts)
        try:
            cfg = FileConfig.model_validate(yaml.safe_load(path.read_text()) or {})
        except (OSError, yaml.YAMLError, ValidationError) as err:
            raise SystemExit(f"gateway config {path}: {err}") from err
        backends = [
            Backend(
                id=b.id,
                model=b.model,
                urls=tuple(u.rstrip("/") for u in b.urls),
                api_key=_env(b.api_key_env),
                upstream_model=b.upstream_model,
                provider=str(b.provider),
                fallback=tuple(b.fallback),
                namespace=b.space,
                affinity=affinity(b.routing),
                queue_gauges=QUEUE_GAUGES[b.engine] if b.engine else None,
            )
            for b in cfg.backends
        ]
        for backend in backends:
            problem = authorized(backend, backend.api_key, self.credentials, "apiKeyEnv")
            if problem:
                log.warning("backend %s is not routed: %s", backend.id, problem)
        tenants: dict[bytes, Tenant] = {}
        holder: dict[bytes, str] = {}
        for t in cfg.tenants:
            key = _env(t.key_env)
            if not key:
                raise SystemExit(f"gateway config {path}: tenant {t.name}: ${t.key_env} is empty")
            digest = key_digest(key)
            if digest in holder:
                raise SystemExit(
                    f"gateway config {path}: tenants {holder[digest]} and {t.name} have the "
                    "same key"
                )
            holder[digest] = t.name
            tenants[digest] = Tenant(
                name=t.name,
                models=tuple(t.models),
                rpm=t.rpm,
                namespaces=grant(t.namespaces),
                id=f"file:{t.name}",
                tpm=t.tpm,
            )
        self.snapshot = build_snapshot(
            backends, tenants, anonymous=None if cfg.require_keys else EVERYONE
        )


def _env(name: str | None) -> str | None:
    if name is None:
        return None
    return (os.environ.get(name) or "").strip() or None


# ---- the cluster -------------------------------------------------------------------------


class KubeSource(Source):
    """Watches LLMBackends, their Endpoints and the key Secrets; reads each backend's own
    key Secret by name (re-read every 30 s, so a rotated key is picked up).

    With `namespaces`, everything is watched in those namespaces only, and key Secrets in
    `gateway_namespace` too (the admin's keys). A remote backend whose baseURL
    `remote_hosts` refuses is not routed, and its key Secret is not read."""

    def __init__(
        self,
        api: ApiClient,
        namespaces: Iterable[str] = (),
        key_selector: str = DEFAULT_KEY_SELECTOR,
        *,
        via_service: bool = False,
        require_keys: bool = True,
        gateway_namespace: str | None = None,
        remote_hosts: RemoteHosts | None = None,
    ) -> None:
        super().__init__()
        self.api = api
        self.via_service, self.require_keys = via_service, require_keys
        self.gateway_namespace = gateway_namespace
        self.remote_hosts = remote_hosts if remote_hosts is not None else RemoteHosts()
        self.credentials = Credentials(self.remote_hosts)  # Vertex backends' tokens
        listed = list(dict.fromkeys(namespaces))
        spaces: list[str | None] = list(listed) or [None]
        key_spaces = list(spaces)
        if listed and gateway_namespace and gateway_namespace not in listed:
            key_spaces.append(gateway_namespace)
        self.backends = [
            Watch(api, Resource(f"{GROUP}/{VERSION}", PLURAL), ns, self._changed, slim)
            for ns in spaces
        ]
        managed = f"app.kubernetes.io/managed-by={MANAGED_BY}"
        self.endpoints = [
            Watch(api, Resource("v1", "endpoints", managed), ns, self._changed, slim)
            for ns in spaces
        ]
        self.keys = [
            Watch(api, Resource("v1", "secrets", key_selector), ns, self._changed, self._entry)
            for ns in key_spaces
        ]
        # Each backend's own key: only the value it names, only while a backend names it.
        self.backend_keys: dict[SecretRef, str | None] = {}
        self._wanted: set[SecretRef] = set()
        self._pending = False
        self._fetching: set[ObjectKey] = set()
        self._said: set[str] = set()

    @property
    def watches(self) -> list[Watch[Any]]:
        return [*self.backends, *self.endpoints, *self.keys]

    @property
    def ready(self) -> bool:
        return all(w.synced.is_set() for w in self.watches)

    def status(self) -> dict[str, Any]:
        return {
            **super().status(),
            "synced": self.ready,
            "connected": all(w.connected for w in self.watches),
        }

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            for w in self.watches:
                group.create_task(w.run())
            group.create_task(self._refresh_secrets())

    def _entry(self, secret: dict[str, Any]) -> KeyEntry:
        return key_entry(secret, self.gateway_namespace)

    def _changed(self) -> None:
        """Coalesce a burst of watch events into one rebuild."""
        if not self._pending:
            self._pending = True
            asyncio.get_running_loop().call_soon(self._rebuild)

    def _rebuild(self) -> None:
        self._pending = False
        endpoints: dict[ObjectKey, dict[str, Any]] = {}
        for ew in self.endpoints:
            endpoints.update(ew.objects)
        objects: dict[ObjectKey, dict[str, Any]] = {}
        for bw in self.backends:
            objects.update(bw.objects)
        backends: list[Backend] = []
        wanted: set[SecretRef] = set()
        warnings: list[str] = []
        for (ns, name), obj in sorted(objects.items()):
            if (obj.get("metadata") or {}).get("deletionTimestamp"):
                continue
            refusal = remote_refusal(obj, self.remote_hosts)
            if refusal is not None:  # never routed, and its key Secret never read
                warnings.append(f"LLMBackend {ns}/{name} is not routed: {refusal}")
                continue
            ref = _key_ref(ns, obj)
            pending, key = False, None
            if ref is not None:
                wanted.add(ref)
                if ref in self.backend_keys:
                    key = self.backend_keys[ref]
                else:
                    pending = True
                    self._fetch_later(ref[:2])
            b = backend_from_object(
                obj,
                endpoints.get((ns, name)),
                key,
                via_service=self.via_service,
                hosts=self.remote_hosts,
            )
            if b is not None:
                if pending:  # not routable before its key is known: it would answer 401
                    b.urls = ()
                else:
                    problem = authorized(b, key, self.credentials)
                    if problem:
                        warnings.append(f"LLMBackend {ns}/{name} is not routed: {problem}")
                backends.append(b)
        self.credentials.sweep()
        self._wanted = wanted
        for ref in [r for r in self.backend_keys if r not in wanted]:
            del self.backend_keys[ref]  # no backend names it (deleted, or changed its ref)
        entries: list[KeyEntry] = []
        for kw in self.keys:
            entries.extend(kw.objects.values())
        tenants, problems = build_tenants(entries)
        notes = [f"key Secret {e.where}: {n}" for e in entries for n in e.notes]
        self._say(warnings + problems + notes)
        self.snapshot = build_snapshot(
            backends, tenants, anonymous=None if self.require_keys else EVERYONE
        )

    def _say(self, messages: list[str]) -> None:
        """Log each message once while it holds (a rebuild follows every watch event)."""
        for message in messages:
            if message not in self._said:
                log.warning("%s", message)
        self._said = set(messages)

    def _fetch_later(self, where: ObjectKey) -> None:
        if where not in self._fetching:
            self._fetching.add(where)
            asyncio.get_running_loop().create_task(self._fetch(where))

    async def _fetch(self, where: ObjectKey) -> None:
        """Read one Secret and keep, of it, the values the current backends name."""
        ns, name = where
        try:
            secret: dict[str, Any] | None = await self.api.get(
                f"/api/v1/namespaces/{ns}/secrets/{name}"
            )
        except httpx.HTTPStatusError as err:
            if err.response.status_code != 404:
                log.warning("reading Secret %s/%s: HTTP %s", ns, name, err.response.status_code)
                self._fetching.discard(where)
                return
            secret = None
        except httpx.HTTPError as err:
            log.warning("reading Secret %s/%s: %s", ns, name, type(err).__name__)
            self._fetching.discard(where)
            return
        self._fetching.discard(where)
        changed = False
        for ref in [r for r in self._wanted if r[:2] == where]:
            value = secret_value(secret, ref[2])
            if ref not in self.backend_keys or self.backend_keys[ref] != value:
                self.backend_keys[ref] = value
                changed = True
        del secret
        if changed:
            self._changed()

    async def _refresh_secrets(self) -> None:
        while True:
            await asyncio.sleep(SECRET_REFRESH_SECONDS)
            for where in sorted({ref[:2] for ref in self.backend_keys}):
                with contextlib.suppress(Exception):
                    await self._fetch(where)


def authorize(
    backend: Backend, key: str | None, credentials: Credentials, where: str = "spec.apiKeySecretRef"
) -> str | None:
    """Give a Vertex backend its access tokens, minted from its service-account key (the
    key itself is never sent); a backend whose key is missing or unusable gets no
    upstream, and this returns why, without quoting the key. Others keep their key."""
    if backend.provider != Provider.VERTEX:
        return None
    backend.api_key = None
    if key is None:
        backend.problem = f"it has no service-account key ({where})"
    else:
        try:
            backend.auth = credentials.tokens(backend.id, key)
        except CredentialError as err:
            backend.problem = f"its service-account key ({where}) {err}"
    if backend.problem is not None:
        backend.urls = ()
    return backend.problem


def authorized(
    backend: Backend, key: str | None, credentials: Credentials, where: str = "spec.apiKeySecretRef"
) -> str | None:
    """`authorize`, for a rebuild: whatever goes wrong with one backend's key leaves that
    backend unrouted, with its problem said (never the key), and never stops the rebuild
    of the others."""
    try:
        return authorize(backend, key, credentials, where)
    except Exception as err:  # its type is named, never its message
        kind = type(err).__name__
    backend.api_key, backend.auth, backend.urls = None, None, ()
    backend.problem = f"its key ({where}) could not be used ({kind})"
    return backend.problem


def _key_ref(namespace: str, obj: dict[str, Any]) -> SecretRef | None:
    """The (namespace, Secret, key) a backend names in apiKeySecretRef, if any."""
    ref = (obj.get("spec") or {}).get("apiKeySecretRef") or {}
    if not isinstance(ref, dict) or not ref.get("name") or not ref.get("key"):
        return None
    return namespace, str(ref["name"]), str(ref["key"])
