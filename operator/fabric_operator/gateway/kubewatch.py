"""List-and-watch over httpx's async client: the gateway's only way to learn the cluster.

The official client's watch blocks a thread per stream; this one shares the gateway's
event loop, reconnects by itself (relisting when the resourceVersion expired), and
keeps what a `keep` function makes of each object (the parts route building reads; for
key Secrets, a digest and a grant, never the Secret) in a dict.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import httpx
from kubernetes import client, config

log = logging.getLogger(__name__)

ObjectKey = tuple[str, str]
T = TypeVar("T")
WATCH_SECONDS = 290  # the server closes the stream after this; we then resume
MAX_BACKOFF = 30.0


@dataclass(frozen=True)
class Resource:
    """What to watch: a collection path per namespace (None: all namespaces)."""

    group_version: str  # "v1" or "llm.fabric.dev/v1alpha1"
    plural: str
    label_selector: str | None = None

    def path(self, namespace: str | None) -> str:
        base = "/api/v1" if self.group_version == "v1" else f"/apis/{self.group_version}"
        ns = f"/namespaces/{namespace}" if namespace else ""
        return f"{base}{ns}/{self.plural}"


class ApiClient:
    """An httpx.AsyncClient set up from a kubeconfig or the pod's service account."""

    def __init__(self, kubeconfig: str | None = None) -> None:
        cfg = client.Configuration()
        if kubeconfig or not Path("/var/run/secrets/kubernetes.io/serviceaccount").exists():
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, client_configuration=cfg
            )
        else:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        self._cfg = cfg
        verify: ssl.SSLContext | bool = False
        if cfg.verify_ssl:
            ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
            if cfg.cert_file:
                ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
            verify = ctx
        self.http = httpx.AsyncClient(
            base_url=cfg.host,
            verify=verify,
            timeout=httpx.Timeout(10.0, read=WATCH_SECONDS + 30),
            limits=httpx.Limits(max_connections=20),
        )

    def _headers(self) -> dict[str, str]:
        # In a pod the token file rotates; the client's hook re-reads it.
        if self._cfg.refresh_api_key_hook is not None:
            self._cfg.refresh_api_key_hook(self._cfg)
        # The client keeps a kubeconfig's or the pod's token under "BearerToken".
        token = self._cfg.get_api_key_with_prefix("BearerToken", alias="authorization")
        return {"authorization": token} if token else {}

    async def get(self, path: str, **params: Any) -> dict[str, Any]:
        resp = await self.http.get(path, params=params, headers=self._headers())
        resp.raise_for_status()
        data: dict[str, Any] = resp.json()
        return data

    def stream(self, path: str, **params: Any) -> Any:
        return self.http.stream("GET", path, params=params, headers=self._headers())

    async def close(self) -> None:
        await self.http.aclose()


class ExpiredError(Exception):
    """The resourceVersion we resume from is too old: list again."""


def slim(obj: dict[str, Any]) -> dict[str, Any]:
    """An object without its managedFields and annotations (often most of its size, and
    nothing the gateway reads)."""
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k not in _HEAVY}
    return {**obj, "metadata": meta}


_HEAVY = frozenset({"managedFields", "annotations"})


class Watch(Generic[T]):
    """One resource kept current in `objects`, each object as `keep` makes it (it runs
    once per object version, as the object arrives); `on_change` runs after each change."""

    def __init__(
        self,
        api: ApiClient,
        resource: Resource,
        namespace: str | None,
        on_change: Callable[[], None],
        keep: Callable[[dict[str, Any]], T],
    ) -> None:
        self.api, self.resource, self.namespace = api, resource, namespace
        self.on_change, self.keep = on_change, keep
        self.objects: dict[ObjectKey, T] = {}
        self.synced = asyncio.Event()
        self.connected = False

    def _params(self) -> dict[str, Any]:
        sel = self.resource.label_selector
        return {"labelSelector": sel} if sel else {}

    async def run(self) -> None:
        backoff = 0.5
        while True:
            try:
                version = await self._list()
                backoff = 0.5
                while True:
                    version = await self._watch(version)
            except ExpiredError:
                continue
            except asyncio.CancelledError:
                raise
            except (httpx.HTTPError, ValueError, KeyError) as err:
                self.connected = False
                log.warning(
                    "watch %s: %s; retrying in %.1fs", self.resource.plural, _brief(err), backoff
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)

    async def _list(self) -> str:
        body = await self.api.get(self.resource.path(self.namespace), **self._params())
        self.objects = {_key(o): self.keep(o) for o in body.get("items") or []}
        self.connected = True
        self.synced.set()
        self.on_change()
        return str(body["metadata"]["resourceVersion"])

    async def _watch(self, version: str) -> str:
        params = {
            **self._params(),
            "watch": "1",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        async with self.api.stream(self.resource.path(self.namespace), **params) as resp:
            if resp.status_code == 410:
                raise ExpiredError
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if not line:
                    continue
                event = json.loads(line)
                kind, obj = event["type"], event["object"]
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise ExpiredError
                    raise ValueError(f"watch error: {obj.get('message')}")
                version = obj["metadata"]["resourceVersion"]
                if kind == "BOOKMARK":
                    continue
                if kind == "DELETED":
                    self.objects.pop(_key(obj), None)
                else:
                    self.objects[_key(obj)] = self.keep(obj)
                self.on_change()
        return version


def _key(obj: dict[str, Any]) -> ObjectKey:
    meta = obj["metadata"]
    return meta.get("namespace", ""), meta["name"]


def _brief(err: Exception) -> str:
    if isinstance(err, httpx.HTTPStatusError):
        return f"HTTP {err.response.status_code}"
    return f"{type(err).__name__}: {err}"
