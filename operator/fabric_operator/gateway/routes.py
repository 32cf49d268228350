"""What the gateway knows, as one immutable snapshot: which upstreams serve each model, in
which order to try them, and which keys belong to which tenant.

Built by pure functions from plain objects (LLMBackends, Endpoints, Secrets as the API
returns them, or the static file), so every routing rule is unit-testable; the request
path only reads a snapshot and never calls the API.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import functools
import hashlib
import itertools
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from fabric_operator.api.backend import LLMBackend
from fabric_operator.api.v1alpha1 import Provider
from fabric_operator.render.engine import PORT_NAME

log = logging.getLogger(__name__)

KEY_LABEL = "llm.fabric.dev/gateway-key"
DEFAULT_KEY_SELECTOR = f"{KEY_LABEL}=true"
ObjectKey = tuple[str, str]  # (namespace, name)


@dataclass
class Backend:
    """One LLMBackend as a route target: where to send requests and with which key."""

    id: str  # namespace/name, named in errors, headers and metrics
    model: str  # what clients ask for
    urls: tuple[str, ...]  # base URLs ending in /v1: ready pods, a Service, or a remote
    api_key: str | None = None
    upstream_model: str | None = None  # rewritten into the request when it differs
    provider: str = Provider.OPENAI_COMPATIBLE.value
    fallback: tuple[str, ...] = ()  # backend ids, tried in order
    remote: bool = False
    _next: itertools.count[int] = field(default_factory=itertools.count, repr=False)

    def pick(self) -> str:
        """Round-robin over the ready upstreams (the caller checks there is one)."""
        return self.urls[next(self._next) % len(self.urls)]

    @functools.cached_property
    def header_bytes(self) -> list[tuple[bytes, bytes]]:
        return [(k.encode(), v.encode("latin-1")) for k, v in self.headers().items()]

    def headers(self) -> dict[str, str]:
        if not self.api_key:
            return {}
        out = {"authorization": f"Bearer {self.api_key}"}
        if self.provider == Provider.AZURE:
            out["api-key"] = self.api_key
        return out


@dataclass(frozen=True)
class Tenant:
    name: str
    models: tuple[str, ...]  # fnmatch patterns; "*" for every model
    rpm: int | None = None

    def may_use(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, p) for p in self.models)


@dataclass(frozen=True)
class Snapshot:
    """Everything a request needs, swapped whole when anything changes."""

    routes: Mapping[str, tuple[Backend, ...]] = field(default_factory=dict)
    tenants: Mapping[bytes, Tenant] = field(default_factory=dict)  # sha256(key) -> tenant
    anonymous: Tenant | None = None  # used when keys are not required

    def tenant(self, key: str | None) -> Tenant | None:
        if key is None:
            return self.anonymous
        return self.tenants.get(key_digest(key))

    def models_for(self, tenant: Tenant) -> list[tuple[str, Backend]]:
        return [(m, bs[0]) for m, bs in sorted(self.routes.items()) if tenant.may_use(m)]


def key_digest(key: str) -> bytes:
    """Keys are held and looked up by digest: a lookup's timing says nothing about a key,
    and no key sits in memory in the clear longer than its Secret's object does."""
    return hashlib.sha256(key.encode()).digest()


def order(primary: Iterable[Backend], by_id: Mapping[str, Backend]) -> tuple[Backend, ...]:
    """The primaries (local before remote), then each one's fallbacks in order, once each."""
    out: list[Backend] = []
    seen: set[str] = set()
    firsts = sorted(primary, key=lambda b: (b.remote, b.id))
    for b in firsts + [by_id[f] for p in firsts for f in p.fallback if f in by_id]:
        if b.id not in seen:
            seen.add(b.id)
            out.append(b)
    return tuple(out)


def build_routes(backends: Iterable[Backend]) -> dict[str, tuple[Backend, ...]]:
    by_id = {b.id: b for b in backends}
    by_model: dict[str, list[Backend]] = {}
    for b in by_id.values():
        by_model.setdefault(b.model, []).append(b)
    return {model: order(primary, by_id) for model, primary in by_model.items()}


def ready_urls(endpoints: Mapping[str, Any] | None) -> tuple[str, ...]:
    """Base URLs of the ready addresses of a backend's Endpoints (its engine port)."""
    urls: list[str] = []
    for subset in (endpoints or {}).get("subsets") or []:
        ports = subset.get("ports") or []
        port = next((p["port"] for p in ports if p.get("name") == PORT_NAME), None)
        if port is None and len(ports) == 1:
            port = ports[0].get("port")
        if port is None:
            continue
        for address in subset.get("addresses") or []:
            host = address["ip"]
            host = f"[{host}]" if ":" in host else host
            urls.append(f"http://{host}:{port}/v1")
    return tuple(sorted(urls))


def backend_from_object(
    obj: Mapping[str, Any],
    endpoints: Mapping[str, Any] | None,
    secret_value: str | None,
    *,
    via_service: bool = False,
) -> Backend | None:
    """A route target from an LLMBackend object; None if its spec does not parse (the
    operator reports why in its status)."""
    try:
        backend = LLMBackend.from_manifest(obj)
    except ValidationError:
        return None
    spec = backend.spec
    ident = f"{backend.namespace}/{backend.name}"
    fallback = tuple(f"{backend.namespace}/{f}" for f in spec.fallback or [])
    if spec.remote is not None:
        return Backend(
            id=ident,
            model=backend.served_model_name,
            urls=(spec.remote.base_url.rstrip("/"),),
            api_key=secret_value,
            upstream_model=spec.remote.model,
            provider=str(spec.remote.provider),
            fallback=fallback,
            remote=True,
        )
    if via_service:
        endpoint = ((obj.get("status") or {}).get("endpoint")) or None
        urls: tuple[str, ...] = (endpoint,) if endpoint else ()
    else:
        urls = ready_urls(endpoints)
    return Backend(
        id=ident,
        model=backend.served_model_name,
        urls=urls,
        api_key=secret_value,
        fallback=fallback,
    )


def secret_value(secret: Mapping[str, Any] | None, key: str) -> str | None:
    """One decoded value of a Secret object (data is base64, stringData is not)."""
    if secret is None:
        return None
    if key in (secret.get("stringData") or {}):
        return str(secret["stringData"][key])
    raw = (secret.get("data") or {}).get(key)
    if raw is None:
        return None
    try:
        return base64.b64decode(raw).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None


def tenant_from_secret(secret: Mapping[str, Any]) -> tuple[str, Tenant] | str:
    """(key, tenant) from a key Secret, or why it is unusable (never quoting a value).

    Keys: `key` (required), `tenant` (default: the Secret's name), `models` (comma or
    space separated names or patterns; default none), `rpm` (requests per minute)."""
    meta = secret.get("metadata") or {}
    where = f"Secret {meta.get('namespace')}/{meta.get('name')}"
    key = secret_value(secret, "key")
    if not key:
        return f"{where}: no 'key' entry"
    models = (secret_value(secret, "models") or "").replace(",", " ").split()
    rpm_text = secret_value(secret, "rpm")
    rpm: int | None = None
    if rpm_text:
        try:
            rpm = int(rpm_text)
        except ValueError:
            return f"{where}: rpm is not a whole number"
        if rpm < 1:
            return f"{where}: rpm must be at least 1"
    name = secret_value(secret, "tenant") or str(meta.get("name"))
    return key, Tenant(name=name, models=tuple(models), rpm=rpm)


def build_tenants(secrets: Iterable[Mapping[str, Any]]) -> dict[bytes, Tenant]:
    tenants: dict[bytes, Tenant] = {}
    for secret in secrets:
        found = tenant_from_secret(secret)
        if isinstance(found, str):
            log.warning("ignoring key %s", found)
            continue
        key, tenant = found
        tenants[key_digest(key)] = tenant
    return tenants
