"""Where the gateway's snapshot comes from: the cluster (watched) or a static file.

Both produce the same `Snapshot`; the proxy holds a `Source` and reads `.snapshot` once
per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fabric_operator.api.v1alpha1 import GROUP, PLURAL, VERSION, Provider
from fabric_operator.gateway.kubewatch import ApiClient, ObjectKey, Resource, Watch
from fabric_operator.gateway.routes import (
    DEFAULT_KEY_SELECTOR,
    Backend,
    Snapshot,
    Tenant,
    backend_from_object,
    build_routes,
    build_tenants,
    key_digest,
    secret_value,
)
from fabric_operator.render.workload import MANAGED_BY

log = logging.getLogger(__name__)

EVERYONE = Tenant(name="anonymous", models=("*",))
SECRET_REFRESH_SECONDS = 30.0


class Source:
    """Holds the current snapshot; `run` keeps it current until cancelled."""

    def __init__(self) -> None:
        self.snapshot = Snapshot()

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


class FileTenant(_FileModel):
    name: str = Field(min_length=1)
    key_env: str = Field(alias="keyEnv", min_length=1)
    models: list[str] = Field(default_factory=list, description="None unless listed.")
    rpm: int | None = Field(default=None, ge=1)


class FileConfig(_FileModel):
    """The gateway without a cluster: upstreams and keys from a file; keys themselves come
    from environment variables, so the file can be committed."""

    require_keys: bool = Field(default=True, alias="requireKeys")
    backends: list[FileBackend] = Field(default_factory=list)
    tenants: list[FileTenant] = Field(default_factory=list)

    @model_validator(mode="after")
    def _fallbacks_exist(self) -> FileConfig:
        ids = {b.id for b in self.backends}
        for b in self.backends:
            missing = [f for f in b.fallback if f not in ids]
            if missing:
                raise ValueError(f"backend {b.id}: unknown fallback {', '.join(missing)}")
        return self


class FileSource(Source):
    def __init__(self, path: Path) -> None:
        super().__init__()
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
            )
            for b in cfg.backends
        ]
        tenants: dict[bytes, Tenant] = {}
        for t in cfg.tenants:
            key = _env(t.key_env)
            if not key:
                raise SystemExit(f"gateway config {path}: tenant {t.name}: ${t.key_env} is empty")
            tenants[key_digest(key)] = Tenant(name=t.name, models=tuple(t.models), rpm=t.rpm)
        self.snapshot = Snapshot(
            routes=build_routes(backends),
            tenants=tenants,
            anonymous=None if cfg.require_keys else EVERYONE,
        )


def _env(name: str | None) -> str | None:
    if name is None:
        return None
    return os.environ.get(name) or None


# ---- the cluster -------------------------------------------------------------------------


class KubeSource(Source):
    """Watches LLMBackends, their Endpoints and the key Secrets; reads each backend's own
    key Secret by name (re-read every 30 s, so a rotated key is picked up)."""

    def __init__(
        self,
        api: ApiClient,
        namespaces: Iterable[str] = (),
        key_selector: str = DEFAULT_KEY_SELECTOR,
        *,
        via_service: bool = False,
        require_keys: bool = True,
    ) -> None:
        super().__init__()
        self.api = api
        self.via_service, self.require_keys = via_service, require_keys
        spaces: list[str | None] = list(namespaces) or [None]
        self.backends = [
            Watch(api, Resource(f"{GROUP}/{VERSION}", PLURAL), ns, self._changed) for ns in spaces
        ]
        managed = f"app.kubernetes.io/managed-by={MANAGED_BY}"
        self.endpoints = [
            Watch(api, Resource("v1", "endpoints", managed), ns, self._changed) for ns in spaces
        ]
        self.keys = [
            Watch(api, Resource("v1", "secrets", key_selector), ns, self._changed) for ns in spaces
        ]
        self.backend_secrets: dict[ObjectKey, dict[str, Any] | None] = {}
        self._pending = False
        self._fetching: set[ObjectKey] = set()

    @property
    def watches(self) -> list[Watch]:
        return self.backends + self.endpoints + self.keys

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

    def _changed(self) -> None:
        """Coalesce a burst of watch events into one rebuild."""
        if not self._pending:
            self._pending = True
            asyncio.get_running_loop().call_soon(self._rebuild)

    def _objects(self, watches: list[Watch]) -> dict[ObjectKey, dict[str, Any]]:
        out: dict[ObjectKey, dict[str, Any]] = {}
        for w in watches:
            out.update(w.objects)
        return out

    def _rebuild(self) -> None:
        self._pending = False
        endpoints = self._objects(self.endpoints)
        backends: list[Backend] = []
        for (ns, name), obj in self._objects(self.backends).items():
            if (obj.get("metadata") or {}).get("deletionTimestamp"):
                continue
            pending, key = self._backend_key(ns, obj)
            b = backend_from_object(
                obj, endpoints.get((ns, name)), key, via_service=self.via_service
            )
            if b is not None:
                if pending:  # not routable before its key is known: it would answer 401
                    b.urls = ()
                backends.append(b)
        self.snapshot = Snapshot(
            routes=build_routes(backends),
            tenants=build_tenants(self._objects(self.keys).values()),
            anonymous=None if self.require_keys else EVERYONE,
        )

    def _backend_key(self, namespace: str, obj: dict[str, Any]) -> tuple[bool, str | None]:
        """(still being read, the key) of the Secret a backend names in apiKeySecretRef."""
        ref = (obj.get("spec") or {}).get("apiKeySecretRef") or {}
        if not ref.get("name") or not ref.get("key"):
            return False, None
        where = (namespace, str(ref["name"]))
        if where not in self.backend_secrets:
            self._fetch_later(where)
            return True, None
        return False, secret_value(self.backend_secrets[where], str(ref["key"]))

    def _fetch_later(self, where: ObjectKey) -> None:
        if where not in self._fetching:
            self._fetching.add(where)
            asyncio.get_running_loop().create_task(self._fetch(where))

    async def _fetch(self, where: ObjectKey) -> None:
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
        if self.backend_secrets.get(where, {}) != secret:
            self.backend_secrets[where] = secret
            self._changed()

    async def _refresh_secrets(self) -> None:
        while True:
            await asyncio.sleep(SECRET_REFRESH_SECONDS)
            for where in list(self.backend_secrets):
                with contextlib.suppress(Exception):
                    await self._fetch(where)
