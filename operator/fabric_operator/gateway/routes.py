"""What the gateway knows, as one immutable snapshot: which upstreams serve each model in
each namespace, in which order to try them, and what each key grants.

Built by pure functions from plain objects (LLMBackends, Endpoints, Secrets as the API
returns them, or the static file), so every routing and tenancy rule is unit-testable; the
request path only reads a snapshot and never calls the API.

Tenancy (README "Tenancy and security"). Teams do not trust each other, and each may
create LLMBackends and Secrets in its own namespace, so:

- A key reaches only the backends of the namespaces it was granted: a request's
  candidates are the granted namespaces' backends serving the model (locals, then
  remotes, then each one's fallbacks, which are in the same namespace). A backend in a
  namespace a key was not granted never receives its requests, whatever it is named or
  serves; for that key such a model does not exist (the same 404 as an unknown model).
- A key Secret in a team namespace grants that namespace only. Its `models` narrows the
  grant within the namespace and defaults to all of them: the team owns the namespace
  and could create a key for any of its backends anyway. A `namespaces` entry there is
  ignored, and said so in the log.
- Only key Secrets in the gateway's own namespace (the platform admin's) may list other
  namespaces (`namespaces`: names, or `*`); without it they grant their own namespace too.
- A key is named by `namespace/secret-name` in metrics, logs and errors (bounded, and
  nobody can write another namespace's name) and rate-limited by its Secret's uid; the
  free-text `tenant` entry of earlier versions is ignored.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import functools
import hashlib
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from fabric_operator.api.backend import LLMBackend
from fabric_operator.api.v1alpha1 import Provider, Routing, RoutingStrategy
from fabric_operator.gateway.enginequeue import QUEUE_GAUGES
from fabric_operator.gateway.providerauth import AccessTokens
from fabric_operator.remotehosts import RemoteHosts
from fabric_operator.render.engine import PORT_NAME

log = logging.getLogger(__name__)

KEY_LABEL = "llm.fabric.dev/gateway-key"
DEFAULT_KEY_SELECTOR = f"{KEY_LABEL}=true"
ALL = "*"  # every namespace, or every model
ObjectKey = tuple[str, str]  # (namespace, name)
NamespaceGrant = tuple[str, ...]  # sorted names, or (ALL,)

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# What a client can send after "Bearer ": printable ASCII without spaces.
_TOKEN = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True)
class Hold:
    """What the gateway does with a request for an autoscaled backend that has no ready
    pod (at zero, or its pods still starting): holds it, as demand the autoscaler sees,
    until a pod is ready, for `timeout` seconds at most (`fallback_after` when the
    backend has a fallback to send it to instead), and at most `most` at once."""

    timeout: float
    most: int
    fallback_after: float | None = None


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
    namespace: str = ""  # whose backend it is (default: the id's part before "/")
    hold: Hold | None = None  # autoscaled: requests wait while no pod is ready
    affinity: int | None = None  # PrefixAffinity: characters of the key; else least in flight
    # The engine's queue gauges (enginequeue): read from each pod URL when autoscaled.
    queue_gauges: tuple[str, ...] | None = None
    # provider vertex: access tokens minted from its service-account key (providerauth),
    # sent instead of the key; `problem` says why it has no upstream (its key is unusable).
    auth: AccessTokens | None = None
    problem: str | None = None

    def __post_init__(self) -> None:
        if not self.namespace:
            self.namespace = namespace_of(self.id)

    @functools.cached_property
    def header_bytes(self) -> list[tuple[bytes, bytes]]:
        return [(k.encode(), v.encode("latin-1")) for k, v in self.headers().items()]

    def headers(self) -> dict[str, str]:
        """The key as the provider takes it. Vertex AI's key is a service-account key,
        never sent: its tokens are (`auth`)."""
        if not self.api_key or self.provider == Provider.VERTEX:
            return {}
        out = {"authorization": f"Bearer {self.api_key}"}
        if self.provider == Provider.AZURE:
            out["api-key"] = self.api_key
        return out


def namespace_of(ident: str) -> str:
    """The namespace part of a backend id ("ns/name"); "default" for an id without one."""
    ns, slash, _ = ident.partition("/")
    return ns if slash else "default"


@dataclass(frozen=True)
class Tenant:
    """What one key grants, and how it is named and limited."""

    name: str  # in metrics, logs and errors: namespace/secret-name (file: its name)
    models: tuple[str, ...]  # fnmatch patterns; "*" for every model
    rpm: int | None = None
    namespaces: NamespaceGrant = ()  # the namespaces it may reach; (ALL,) for every one
    id: str = ""  # the rate-limit bucket: the Secret's uid (default: the name)
    tpm: int | None = None  # tokens (prompt + completion) per minute

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", self.name)

    def may_use(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, p) for p in self.models)

    def may_reach(self, namespace: str) -> bool:
        return ALL in self.namespaces or namespace in self.namespaces


def grant(namespaces: Iterable[str]) -> NamespaceGrant:
    """A namespace grant in its one canonical form (sorted, once each; ALL alone)."""
    names = set(namespaces)
    return (ALL,) if ALL in names else tuple(sorted(names))


@dataclass(frozen=True)
class Snapshot:
    """Everything a request needs, swapped whole when anything changes."""

    # model -> candidates over every namespace (the grant ALL) ...
    routes: Mapping[str, tuple[Backend, ...]] = field(default_factory=dict)
    tenants: Mapping[bytes, Tenant] = field(default_factory=dict)  # sha256(key) -> tenant
    anonymous: Tenant | None = None  # used when keys are not required
    # ... and (namespace, model) -> candidates within one namespace (a team key's grant).
    scoped: Mapping[tuple[str, str], tuple[Backend, ...]] = field(default_factory=dict)
    by_id: Mapping[str, Backend] = field(default_factory=dict)
    # Candidates of grants of several namespaces, computed once per (grant, model); only
    # for models that exist, so its size is bounded by admin-made grants x models.
    _joined: dict[tuple[NamespaceGrant, str], tuple[Backend, ...]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def tenant(self, key: str | None) -> Tenant | None:
        if key is None:
            return self.anonymous
        return self.tenants.get(key_digest(key))

    def candidates(self, tenant: Tenant, model: str) -> tuple[Backend, ...]:
        """The backends to try for `model` in the order to try them, among the namespaces
        `tenant` may reach; () if none serves it there (then, for this tenant, the model
        does not exist). Whether the tenant's `models` allows it is `may_use`'s part."""
        everywhere = self.routes.get(model)
        if not everywhere:
            return ()
        spaces = tenant.namespaces
        if ALL in spaces:
            return everywhere
        if len(spaces) == 1:
            return self.scoped.get((spaces[0], model), ())
        joined = self._joined.get((spaces, model))
        if joined is None:
            primaries = [b for b in everywhere if b.model == model and b.namespace in spaces]
            reachable = {i: b for i, b in self.by_id.items() if b.namespace in spaces}
            joined = self._joined[(spaces, model)] = order(primaries, reachable)
        return joined

    def models_for(self, tenant: Tenant) -> list[tuple[str, Backend]]:
        """Each model the tenant may use, with the backend tried first: what /v1/models
        lists (nothing of a namespace it was not granted)."""
        out: list[tuple[str, Backend]] = []
        for model in sorted(self.routes):
            if tenant.may_use(model):
                found = self.candidates(tenant, model)
                if found:
                    out.append((model, found[0]))
        return out


def key_digest(key: str) -> bytes:
    """Keys are held and looked up by digest: a lookup's timing says nothing about a key,
    and no key is kept in the clear."""
    return hashlib.sha256(key.encode()).digest()


def order(primary: Iterable[Backend], by_id: Mapping[str, Backend]) -> tuple[Backend, ...]:
    """The primaries (local before remote, then by id), then each one's fallbacks in order
    (those in `by_id`), once each."""
    out: list[Backend] = []
    seen: set[str] = set()
    firsts = sorted(primary, key=lambda b: (b.remote, b.id))
    for b in firsts + [by_id[f] for p in firsts for f in p.fallback if f in by_id]:
        if b.id not in seen:
            seen.add(b.id)
            out.append(b)
    return tuple(out)


def build_routes(backends: Iterable[Backend]) -> dict[str, tuple[Backend, ...]]:
    """model -> candidates over every namespace (what a grant of ALL reaches)."""
    by_id = {b.id: b for b in backends}
    by_model: dict[str, list[Backend]] = {}
    for b in by_id.values():
        by_model.setdefault(b.model, []).append(b)
    return {model: order(primary, by_id) for model, primary in by_model.items()}


def build_snapshot(
    backends: Iterable[Backend],
    tenants: Mapping[bytes, Tenant] | None = None,
    anonymous: Tenant | None = None,
) -> Snapshot:
    """Routes over every namespace (for grants of ALL) and within each one (a team key's
    grant). Fallbacks name backends of their own namespace (an LLMBackend's by
    construction; the static file is checked at load)."""
    by_id = {b.id: b for b in backends}
    per_namespace: dict[str, list[Backend]] = {}
    for b in by_id.values():
        per_namespace.setdefault(b.namespace, []).append(b)
    scoped: dict[tuple[str, str], tuple[Backend, ...]] = {}
    for ns, members in per_namespace.items():
        for model, candidates in build_routes(members).items():
            scoped[(ns, model)] = candidates
    return Snapshot(
        routes=build_routes(by_id.values()),
        tenants=dict(tenants or {}),
        anonymous=anonymous,
        scoped=scoped,
        by_id=by_id,
    )


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


def remote_refusal(obj: Mapping[str, Any], hosts: RemoteHosts) -> str | None:
    """Why the gateway will not call this `engine: remote` backend's baseURL (None: it
    may, or the backend is not remote). Checked before its key Secret is read."""
    remote = (obj.get("spec") or {}).get("remote")
    if not isinstance(remote, Mapping):
        return None
    why = hosts.refusal(str(remote.get("baseURL") or ""))
    return f"spec.remote.baseURL {why}" if why else None


def own_service_url(endpoint: str, name: str, namespace: str) -> str | None:
    """The backend's own Service, http://NAME.NAMESPACE.svc:PORT/v1, if status.endpoint
    names it (its port is taken from there); else None. --via-service reads
    status.endpoint, which is data on the object: its host is never followed, so it cannot
    lead to another namespace's Service or out of the cluster."""
    try:
        parts = urlsplit(endpoint)
        port = parts.port
    except ValueError:
        return None
    host = (parts.hostname or "").lower()
    own = f"{name}.{namespace}.svc"
    if parts.scheme != "http" or not (host == own or host.startswith(own + ".")):
        return None
    return f"http://{own}:{port or 80}/v1"


def backend_from_object(
    obj: Mapping[str, Any],
    endpoints: Mapping[str, Any] | None,
    secret_value: str | None,
    *,
    via_service: bool = False,
    hosts: RemoteHosts | None = None,
) -> Backend | None:
    """A route target from an LLMBackend object; None if its spec does not parse (the
    operator reports why in its status) or, for a remote one, if `hosts` refuses its
    baseURL (the caller logs why: `remote_refusal`)."""
    try:
        backend = LLMBackend.from_manifest(obj)
    except ValidationError:
        return None
    spec = backend.spec
    ident = f"{backend.namespace}/{backend.name}"
    fallback = tuple(f"{backend.namespace}/{f}" for f in spec.fallback or [])
    if spec.remote is not None:
        if hosts is not None and hosts.refusal(spec.remote.base_url) is not None:
            return None
        return Backend(
            id=ident,
            model=backend.served_model_name,
            urls=(spec.remote.base_url.rstrip("/"),),
            api_key=secret_value,
            upstream_model=spec.remote.model,
            provider=str(spec.remote.provider),
            fallback=fallback,
            remote=True,
            namespace=backend.namespace,
        )
    if name_taken(obj):
        # The Service (and so the Endpoints) of this name belong to someone else: its
        # pods are not this backend's, and must not receive its prompts or its key.
        urls: tuple[str, ...] = ()
    elif via_service:
        endpoint = str(((obj.get("status") or {}).get("endpoint")) or "")
        own = own_service_url(endpoint, backend.name, backend.namespace)
        urls = (own,) if own else ()
    else:
        urls = ready_urls(endpoints)
    scaling = spec.autoscaling
    hold = None
    if scaling is not None:
        hold = Hold(
            timeout=float(scaling.hold_timeout_seconds),
            most=scaling.max_held_requests,
            fallback_after=(
                float(scaling.fallback_after_seconds)
                if scaling.fallback_after_seconds is not None and fallback
                else None
            ),
        )
    return Backend(
        id=ident,
        model=backend.served_model_name,
        urls=urls,
        api_key=secret_value,
        fallback=fallback,
        namespace=backend.namespace,
        hold=hold,
        affinity=affinity(spec.routing),
        # Autoscaled backends' pod URLs only (through a Service, one page would stand for
        # all the pods): the gauges count only where the autoscaler reads them.
        queue_gauges=(
            None if via_service or scaling is None else QUEUE_GAUGES.get(str(spec.engine))
        ),
    )


def affinity(routing: Routing | None) -> int | None:
    """Characters of the prefix key under PrefixAffinity; None: least in flight."""
    if routing is None or routing.strategy != RoutingStrategy.PREFIX_AFFINITY:
        return None
    return routing.prefix_characters


def name_taken(obj: Mapping[str, Any]) -> bool:
    """The operator found a child of this name owned by someone else (NameConflict)."""
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(
        c.get("type") == "Degraded" and c.get("reason") == "NameConflict" for c in conditions
    )


def secret_value(secret: Mapping[str, Any] | None, key: str) -> str | None:
    """One decoded value of a Secret object (data is base64, stringData is not), without
    the whitespace around it: a Secret made with `--from-file` ends with a newline."""
    if secret is None:
        return None
    if key in (secret.get("stringData") or {}):
        return str(secret["stringData"][key]).strip()
    raw = (secret.get("data") or {}).get(key)
    if raw is None:
        return None
    try:
        return base64.b64decode(raw).decode().strip()
    except (binascii.Error, UnicodeDecodeError):
        return None


# ---- key Secrets ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyEntry:
    """What the gateway keeps of one key Secret: its key's digest and what it grants, or
    why it is unusable; never the key, nor the rest of the Secret."""

    where: str  # namespace/name, the only way logs name it
    digest: bytes | None = None
    tenant: Tenant | None = None
    problem: str | None = None  # why it grants nothing
    notes: tuple[str, ...] = ()  # what of it was ignored, and why


def key_entry(secret: Mapping[str, Any], gateway_namespace: str | None) -> KeyEntry:
    """Read a key Secret (label `llm.fabric.dev/gateway-key=true`). Entries:

    - `key` (required): the bearer key; whitespace around it is dropped.
    - `models`: names or fnmatch patterns, comma or space separated. Default `*`: every
      model of the namespaces the key reaches (a team owns its namespace, so narrowing
      is for the team to ask, not the default); present but empty: no model.
    - `rpm`: requests per minute for this key alone (shared by the gateway replicas
      when they share a Redis, else per replica).
    - `tpm`: tokens per minute (prompt and completion, as the upstreams count them),
      the same way; charged after each answer, checked before each request.
    - `namespaces` (only in the gateway's own namespace, where the platform admin makes
      keys): namespace names, or `*`, the key reaches instead of its own namespace.
      Elsewhere it is ignored: a team key reaches its own namespace and no other.
    - `tenant`: ignored (earlier versions named the rate-limit bucket after it, which let
      one team share and exhaust another's); keys are named `namespace/secret-name`.
    """
    meta = secret.get("metadata") or {}
    namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
    where = f"{namespace}/{name}"

    def unusable(why: str) -> KeyEntry:
        return KeyEntry(where, problem=why)

    key = secret_value(secret, "key")
    if not key:
        return unusable("no 'key' entry (or it is empty or not UTF-8)")
    if not _TOKEN.fullmatch(key):
        return unusable("'key' must be printable ASCII without spaces (a bearer token)")
    models_text = secret_value(secret, "models")
    models = (ALL,) if models_text is None else tuple(models_text.replace(",", " ").split())
    notes: list[str] = []
    if not models:
        notes.append("'models' is empty: the key may use no model")
    rpm, tpm = _limit(secret, "rpm"), _limit(secret, "tpm")
    for field_, value in (("rpm", rpm), ("tpm", tpm)):
        if isinstance(value, str):
            return unusable(f"{field_} {value}")
    spaces: NamespaceGrant = (namespace,)
    listed = secret_value(secret, "namespaces")
    if listed is not None:
        if gateway_namespace is not None and namespace == gateway_namespace:
            names = listed.replace(",", " ").split()
            bad = [n for n in names if n != ALL and not _namespace_name(n)]
            if bad:
                return unusable(f"'namespaces' lists {bad[0][:80]!r}: not a namespace name or '*'")
            spaces = grant(names)
            if not spaces:
                notes.append("'namespaces' is empty: the key reaches no namespace")
        else:
            admin = gateway_namespace or "unknown: no admin keys"
            notes.append(
                "'namespaces' ignored: only keys in the gateway's namespace "
                f"({admin}) reach other namespaces; this one reaches {namespace} only"
            )
    if secret_value(secret, "tenant") is not None:
        notes.append(f"'tenant' ignored: the key is named {where}")
    tenant = Tenant(
        name=where,
        models=models,
        rpm=rpm if isinstance(rpm, int) else None,
        namespaces=spaces,
        id=str(meta.get("uid") or where),
        tpm=tpm if isinstance(tpm, int) else None,
    )
    return KeyEntry(where, digest=key_digest(key), tenant=tenant, notes=tuple(notes))


def _limit(secret: Mapping[str, Any], field_: str) -> int | str | None:
    """A limit entry: its number, None if absent or empty, or what is wrong with it."""
    text = secret_value(secret, field_)
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        return "is not a whole number"
    return value if value >= 1 else "must be at least 1"


def _namespace_name(name: str) -> bool:
    return len(name) <= 63 and _DNS_LABEL.fullmatch(name) is not None


def build_tenants(entries: Iterable[KeyEntry]) -> tuple[dict[bytes, Tenant], list[str]]:
    """(digest -> tenant, what is wrong, by Secret namespace/name). A key held by two
    Secrets is refused for both: whichever won, a client of one could be served as the
    other (and routed to its namespace's backends)."""
    holders: dict[bytes, list[KeyEntry]] = {}
    problems: list[str] = []
    for entry in entries:
        if entry.problem is not None:
            problems.append(f"key Secret {entry.where}: {entry.problem}")
        elif entry.digest is not None:
            holders.setdefault(entry.digest, []).append(entry)
    tenants: dict[bytes, Tenant] = {}
    for digest, found in holders.items():
        if len(found) > 1:
            names = ", ".join(sorted(e.where for e in found))
            problems.append(f"key Secrets {names} hold the same key: refused for all of them")
            continue
        assert found[0].tenant is not None
        tenants[digest] = found[0].tenant
    return tenants, sorted(problems)
