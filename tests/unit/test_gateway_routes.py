"""Routing, tenancy and rate limits of the gateway: pure functions over plain objects.

The tenancy rules (README "Tenancy and security"): a key reaches the backends of the
namespaces it was granted and no other; a team's key Secret grants its own namespace only;
only the admin's key Secrets (the gateway's namespace) grant others; keys are named and
limited by identities no team can write; remote backends call only allowed hosts."""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from fabric_operator.gateway import server
from fabric_operator.gateway.kubewatch import slim
from fabric_operator.gateway.ratelimit import RateLimiter
from fabric_operator.gateway.routes import (
    ALL,
    Backend,
    Hold,
    KeyEntry,
    Snapshot,
    Tenant,
    backend_from_object,
    build_routes,
    build_snapshot,
    build_tenants,
    key_digest,
    key_entry,
    ready_urls,
    remote_refusal,
    secret_value,
)
from fabric_operator.gateway.sources import FileSource, KubeSource
from fabric_operator.remotehosts import RemoteHosts


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def llmb(
    name: str, spec: dict[str, Any], status: dict[str, Any] | None = None, ns: str = "ns"
) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns}, "spec": spec, "status": status or {}}


LOCAL = {"engine": "llamacpp", "model": {"url": "https://h.invalid/m.gguf"}}
ENDPOINTS = {
    "subsets": [
        {
            "addresses": [{"ip": "10.0.0.2"}, {"ip": "10.0.0.1"}],
            "notReadyAddresses": [{"ip": "10.0.0.3"}],
            "ports": [{"name": "http", "port": 8080}],
        }
    ]
}


def test_ready_urls_are_the_ready_addresses_on_the_engine_port() -> None:
    assert ready_urls(ENDPOINTS) == ("http://10.0.0.1:8080/v1", "http://10.0.0.2:8080/v1")
    assert ready_urls(None) == ()
    v6 = {"subsets": [{"addresses": [{"ip": "fd00::1"}], "ports": [{"port": 80}]}]}
    assert ready_urls(v6) == ("http://[fd00::1]:80/v1",)
    other = {"subsets": [{"addresses": [{"ip": "1.2.3.4"}], "ports": [{"name": "a", "port": 1}]}]}
    assert ready_urls({"subsets": other["subsets"] * 2}) == ("http://1.2.3.4:1/v1",) * 2


def test_local_backend_routes_to_its_pods_with_its_key() -> None:
    spec = {**LOCAL, "servedModelName": "qwen", "fallback": ["gpt"]}
    b = backend_from_object(llmb("q", spec), ENDPOINTS, "sk-engine")
    assert b is not None
    assert (b.id, b.model, b.remote, b.fallback) == ("ns/q", "qwen", False, ("ns/gpt",))
    assert b.namespace == "ns"
    assert b.urls == ready_urls(ENDPOINTS)
    assert (b.hold, b.affinity) == (None, None)  # not autoscaled: nothing held; least in flight
    assert b.headers() == {"authorization": "Bearer sk-engine"}


@pytest.mark.parametrize("via_service", [False, True])
def test_a_backend_whose_name_someone_else_holds_gets_no_upstream(via_service: bool) -> None:
    """The operator left a foreign Service of this name alone (NameConflict): its pods,
    which the Endpoints of that name list, are not this backend's."""
    status = {
        "endpoint": "http://q.ns.svc.cluster.local:8080/v1",
        "conditions": [{"type": "Degraded", "status": "True", "reason": "NameConflict"}],
    }
    b = backend_from_object(llmb("q", LOCAL, status), ENDPOINTS, "sk", via_service=via_service)
    assert b is not None and b.urls == ()  # known, so a 503, but nothing is sent anywhere
    ok = {**status, "conditions": [{"type": "Degraded", "status": "False", "reason": "AsExpected"}]}
    assert backend_from_object(llmb("q", LOCAL, ok), ENDPOINTS, "sk").urls  # type: ignore[union-attr]


def test_local_backend_via_service_uses_its_own_services_name_and_port() -> None:
    status = {"endpoint": "http://q.ns.svc.cluster.local:8080/v1"}
    b = backend_from_object(llmb("q", LOCAL, status), None, None, via_service=True)
    assert b is not None and b.urls == ("http://q.ns.svc:8080/v1",)
    assert b.headers() == {}


@pytest.mark.parametrize(
    ("endpoint", "urls"),
    [
        ("http://qwen.team-b.svc.cluster.local:8000/v1", ()),  # another team's Service
        ("https://collector.evil.example/v1", ()),
        ("http://q.ns.svc.cluster.local:bad/v1", ()),
        ("", ()),
        # Its own name, then a domain of someone else's: the host is never followed.
        ("http://q.ns.svc.evil.example:81/v1", ("http://q.ns.svc:81/v1",)),
    ],
)
def test_via_service_never_follows_a_status_endpoint_elsewhere(
    endpoint: str, urls: tuple[str, ...]
) -> None:
    """status.endpoint is data on the object, not a place: only the backend's own Service."""
    b = backend_from_object(llmb("q", LOCAL, {"endpoint": endpoint}), None, None, via_service=True)
    assert b is not None and b.urls == urls


def test_remote_backend_routes_to_its_base_url_with_the_providers_model() -> None:
    spec = {
        "engine": "remote",
        "servedModelName": "fast",
        "remote": {"baseURL": "https://x.openai.azure.com/openai/v1/", "model": "gpt-4o-mini"},
    }
    spec["remote"]["provider"] = "azure"
    b = backend_from_object(llmb("r", spec), None, "k", hosts=RemoteHosts())
    assert b is not None
    assert b.urls == ("https://x.openai.azure.com/openai/v1",) and b.upstream_model == "gpt-4o-mini"
    assert b.remote and b.headers() == {"authorization": "Bearer k", "api-key": "k"}


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://collector.evil.example/v1", "host collector.evil.example is not an allowed"),
        ("http://qwen.team-b.svc.cluster.local:8000/v1", "host qwen.team-b.svc.cluster.local"),
        ("http://api.openai.com/v1", "host api.openai.com is allowed over https only"),
        ("http://10.96.0.10/v1", "host 10.96.0.10 is not an allowed remote host"),
    ],
)
def test_a_remote_backend_to_a_host_not_allowed_is_no_route(url: str, why: str) -> None:
    """Hole 3: a team points a remote backend (with any Secret of its namespace as the key)
    at its own server, or at another team's Service: the gateway never routes there."""
    obj = llmb("exfil", {"engine": "remote", "remote": {"baseURL": url}})
    refusal = remote_refusal(obj, RemoteHosts())
    assert refusal is not None and refusal.startswith(f"spec.remote.baseURL {why}")
    assert backend_from_object(obj, None, "sk-stolen", hosts=RemoteHosts()) is None
    allowed = RemoteHosts.of(["api.openai.com"], ["qwen.team-b.svc.cluster.local", "10.96.0.10"])
    if "evil" not in url and url != "http://api.openai.com/v1":
        assert backend_from_object(obj, None, None, hosts=allowed) is not None
    assert remote_refusal(llmb("q", LOCAL), RemoteHosts()) is None  # not remote: not asked


def test_unparsable_backend_is_no_route() -> None:
    assert backend_from_object(llmb("x", {"engine": "nope"}), None, None) is None


def backend(ident: str, model: str, *fallback: str, remote: bool = False) -> Backend:
    return Backend(id=ident, model=model, urls=("u",), fallback=fallback, remote=remote)


def test_routes_try_local_then_remote_then_fallbacks_once_each() -> None:
    routes = build_routes(
        [
            backend("ns/cloud", "m", remote=True),
            backend("ns/b", "m", "ns/other", "ns/a", "ns/missing"),
            backend("ns/a", "m", "ns/other"),
            backend("ns/other", "o"),
        ]
    )
    assert [b.id for b in routes["m"]] == ["ns/a", "ns/b", "ns/cloud", "ns/other"]
    assert [b.id for b in routes["o"]] == ["ns/other"]


# ---- hole 1: routing scoped by namespace ---------------------------------------------------

TEAMS = build_snapshot(
    [
        # Team aaa's qwen sorts first and is local: before scoping, it came first for
        # every team's qwen (ordered by namespace/name, locals before remotes).
        backend("aaa/qwen", "qwen"),
        backend("aaa/only-a", "only-a"),
        backend("bbb/qwen", "qwen", "bbb/gpt"),
        backend("bbb/gpt", "gpt", remote=True),
        backend("ccc/qwen", "qwen", remote=True),
    ]
)


def team(ns: str, *models: str) -> Tenant:
    return Tenant(name=f"{ns}/key", models=models or (ALL,), namespaces=(ns,))


def ids(backends: tuple[Backend, ...]) -> list[str]:
    return [b.id for b in backends]


def test_a_key_reaches_only_the_backends_of_its_namespace() -> None:
    assert ids(TEAMS.candidates(team("bbb"), "qwen")) == ["bbb/qwen", "bbb/gpt"]
    assert ids(TEAMS.candidates(team("aaa"), "qwen")) == ["aaa/qwen"]
    assert ids(TEAMS.candidates(team("ccc"), "qwen")) == ["ccc/qwen"]
    # Another namespace's model does not exist for it: the same () as an unknown model, so
    # the proxy's 404 says nothing about other namespaces.
    assert TEAMS.candidates(team("bbb"), "only-a") == TEAMS.candidates(team("bbb"), "nope") == ()
    assert TEAMS.candidates(team("ddd"), "qwen") == ()  # a namespace with no backends


def test_a_backend_never_receives_a_request_of_a_key_not_granted_its_namespace() -> None:
    """Every (grant, model): no candidate outside the grant, fallbacks included."""
    grants = [("aaa",), ("bbb",), ("ccc",), ("aaa", "bbb"), ("bbb", "ccc"), ("zzz",), ()]
    for spaces in grants:
        tenant = Tenant(name="t", models=(ALL,), namespaces=spaces)
        for model in [*TEAMS.routes, "nope"]:
            for b in TEAMS.candidates(tenant, model):
                assert b.namespace in spaces, (spaces, model, b.id)


def test_models_lists_exactly_what_the_key_may_reach_and_use() -> None:
    def listed(tenant: Tenant) -> list[tuple[str, str]]:
        return [(m, b.id) for m, b in TEAMS.models_for(tenant)]

    assert listed(team("bbb")) == [("gpt", "bbb/gpt"), ("qwen", "bbb/qwen")]
    assert listed(team("aaa")) == [("only-a", "aaa/only-a"), ("qwen", "aaa/qwen")]
    assert listed(team("bbb", "q*")) == [("qwen", "bbb/qwen")]
    assert listed(team("bbb", "only-a")) == []  # a pattern cannot reach across either
    everything = Tenant(name="admin", models=(ALL,), namespaces=(ALL,))
    assert [m for m, _ in TEAMS.models_for(everything)] == ["gpt", "only-a", "qwen"]


def test_admin_grants_of_several_namespaces_join_them_in_a_fixed_order() -> None:
    both = Tenant(name="gw/admin", models=(ALL,), namespaces=("bbb", "ccc"))
    # Locals, then remotes, then fallbacks; by id within each.
    assert ids(TEAMS.candidates(both, "qwen")) == ["bbb/qwen", "ccc/qwen", "bbb/gpt"]
    assert TEAMS.candidates(both, "qwen") is TEAMS.candidates(both, "qwen")  # computed once
    assert TEAMS.candidates(both, "only-a") == ()
    everything = Tenant(name="gw/all", models=(ALL,), namespaces=(ALL,))
    assert ids(TEAMS.candidates(everything, "qwen")) == [
        "aaa/qwen",
        "bbb/qwen",
        "ccc/qwen",
        "bbb/gpt",
    ]
    # Unknown models are never cached: the cache is bounded by the models that exist.
    for i in range(50):
        assert TEAMS.candidates(both, f"made-up-{i}") == ()
    assert all(model in TEAMS.routes for _, model in TEAMS._joined)


def test_a_fallback_into_another_namespace_is_not_followed_for_a_scoped_key() -> None:
    snap = build_snapshot([backend("aaa/m", "m", "bbb/spare"), backend("bbb/spare", "spare")])
    assert ids(snap.candidates(team("aaa"), "m")) == ["aaa/m"]
    assert ids(snap.candidates(Tenant("t", (ALL,), namespaces=(ALL,)), "m")) == [
        "aaa/m",
        "bbb/spare",
    ]


# ---- hole 2: the key model -----------------------------------------------------------------


def secret(name: str, ns: str = "ns", uid: str | None = None, **data: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if uid:
        meta["uid"] = uid
    return {"metadata": meta, "data": {k: b64(v) for k, v in data.items()}}


def test_a_team_key_reaches_all_its_namespaces_models_by_default() -> None:
    entry = key_entry(secret("team-a", uid="u-1", key="sk-a", rpm="60"), "fabric-system")
    assert entry.problem is None and entry.digest == key_digest("sk-a")
    assert entry.tenant == Tenant(
        name="ns/team-a", models=(ALL,), rpm=60, namespaces=("ns",), id="u-1"
    )
    narrowed = key_entry(secret("s", key="k", models="qwen, llama-*"), "fabric-system")
    assert narrowed.tenant is not None and narrowed.tenant.models == ("qwen", "llama-*")
    empty = key_entry(secret("s", key="k", models=" "), "fabric-system")
    assert empty.tenant is not None and empty.tenant.models == ()
    assert empty.notes == ("'models' is empty: the key may use no model",)


def test_a_team_key_cannot_grant_itself_other_namespaces_or_anothers_name() -> None:
    """Hole 2: the hostile key a team would write in its own namespace."""
    hostile = secret(
        "grab",
        ns="team-a",
        uid="uid-a",
        key="sk-a",
        models="*",
        namespaces="*",
        rpm="1000000",
        tenant="team-b",
    )
    entry = key_entry(hostile, "fabric-system")
    assert entry.tenant is not None
    assert entry.tenant.namespaces == ("team-a",)  # namespaces: * ignored
    assert entry.tenant.name == "team-a/grab" and entry.tenant.id == "uid-a"  # not team-b
    assert entry.notes == (
        "'namespaces' ignored: only keys in the gateway's namespace (fabric-system) reach "
        "other namespaces; this one reaches team-a only",
        "'tenant' ignored: the key is named team-a/grab",
    )
    victim = key_entry(secret("key", ns="team-b", uid="uid-b", key="sk-b", tenant="team-b"), None)
    assert victim.tenant is not None and victim.tenant.id != entry.tenant.id
    assert victim.tenant.name != entry.tenant.name
    # Its own rpm limits its own bucket only: a different one from the victim's.
    limiter = RateLimiter(clock=lambda: 0.0)
    victim_rpm = 2
    for _ in range(100):
        assert limiter.take(entry.tenant.id, 1_000_000) == 0.0
    assert [limiter.take(victim.tenant.id, victim_rpm) for _ in range(2)] == [0.0, 0.0]
    # With no gateway namespace known, no key is an admin key.
    assert key_entry(secret("k", ns="fabric-system", key="k", namespaces="*"), None).tenant == (
        Tenant(name="fabric-system/k", models=(ALL,), namespaces=("fabric-system",))
    )


def test_admin_keys_in_the_gateways_namespace_grant_what_they_list() -> None:
    def spaces(listed: str | None) -> tuple[str, ...]:
        data = {"key": "k"} if listed is None else {"key": "k", "namespaces": listed}
        entry = key_entry(secret("admin", ns="fabric-system", **data), "fabric-system")
        assert entry.tenant is not None, entry.problem
        return entry.tenant.namespaces

    assert spaces("team-b, team-a team-b") == ("team-a", "team-b")
    assert spaces("*") == spaces("team-a,*") == (ALL,)
    assert spaces(None) == ("fabric-system",)
    assert spaces("") == ()
    bad = key_entry(
        secret("admin", ns="fabric-system", key="k", namespaces="team-*"), "fabric-system"
    )
    assert bad.problem == "'namespaces' lists 'team-*': not a namespace name or '*'"


def test_key_values_with_whitespace_around_work_and_bad_ones_are_named_not_quoted() -> None:
    """A Secret made with --from-file ends with a newline: the key is what is inside."""
    entry = key_entry(secret("s", key="  sk-from-file-1\n"), None)
    assert entry.digest == key_digest("sk-from-file-1")
    assert secret_value({"stringData": {"k": "v\n"}}, "k") == "v"
    for value in ["two words", "sk-\u00e9", "sk-\x00", "\n \n"]:
        bad = key_entry(secret("s", key=value), None)
        assert bad.tenant is None and bad.problem is not None
        assert value.strip() not in bad.problem or not value.strip()
    assert key_entry({"metadata": {"name": "s", "namespace": "ns"}, "data": {"key": "%%"}}, None)
    tenants, problems = build_tenants([key_entry(secret("s", key="two words"), None)])
    assert tenants == {}
    assert problems == [
        "key Secret ns/s: 'key' must be printable ASCII without spaces (a bearer token)"
    ]


@pytest.mark.parametrize(
    ("data", "why"),
    [
        ({}, "no 'key' entry (or it is empty or not UTF-8)"),
        ({"key": "k", "rpm": "lots"}, "rpm is not a whole number"),
        ({"key": "k", "rpm": "0"}, "rpm must be at least 1"),
    ],
)
def test_unusable_key_secrets_say_why_without_the_key(data: dict[str, str], why: str) -> None:
    entry = key_entry(secret("s", **data), None)
    assert entry == KeyEntry("ns/s", problem=why)
    assert build_tenants([entry]) == ({}, [f"key Secret ns/s: {why}"])


def test_a_key_held_by_two_secrets_is_refused_for_both() -> None:
    """Else a team that learnt another's key could make the gateway serve that team's
    clients as its own key (and route their prompts to its backends)."""
    entries = [
        key_entry(secret("mine", ns="team-b", key="sk-shared"), None),
        key_entry(secret("copy", ns="team-a", key="sk-shared"), None),
        key_entry(secret("other", ns="team-b", key="sk-other"), None),
    ]
    tenants, problems = build_tenants(entries)
    assert list(tenants) == [key_digest("sk-other")]
    assert problems == [
        "key Secrets team-a/copy, team-b/mine hold the same key: refused for all of them"
    ]


def test_snapshot_finds_tenants_by_key_digest_and_filters_models() -> None:
    tenants, _ = build_tenants(
        [
            key_entry(secret("a", key="sk-a", models="q*"), None),
            key_entry(secret("b", key="sk-b", models=""), None),
        ]
    )
    snap = build_snapshot([backend("ns/q", "qwen"), backend("ns/l", "llama")], tenants)
    assert key_digest("sk-a") in tenants and "sk-a" not in repr(tenants)
    a = snap.tenant("sk-a")
    assert a is not None and [m for m, _ in snap.models_for(a)] == ["qwen"]
    b = snap.tenant("sk-b")
    assert b is not None and snap.models_for(b) == []
    assert snap.tenant("sk-c") is None and snap.tenant(None) is None
    assert Snapshot(anonymous=Tenant("anon", ("*",))).tenant(None) == Tenant("anon", ("*",))


def test_tenant_identity_defaults_to_its_name() -> None:
    assert Tenant("file-tenant", ()).id == "file-tenant"
    assert Tenant("ns/s", (), id="uid").id == "uid"


def test_rate_limiter_allows_a_minutes_burst_then_the_steady_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    assert [limiter.take("t", 3) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("t", 3) == pytest.approx(20.0)  # one token per 20 s at 3 rpm
    assert limiter.take("other", 3) == 0.0  # tenants do not share a bucket
    now[0] = 20.0
    assert limiter.take("t", 3) == 0.0
    assert limiter.take("t", 3) > 0


# ---- the static file -----------------------------------------------------------------------


def file_source(tmp_path: Path, config: dict[str, Any]) -> FileSource:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return FileSource(path)


def test_file_tenants_reach_the_namespaces_they_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("K_ALL", "sk-all")
    monkeypatch.setenv("K_B", " sk-b\n")  # whitespace around a key is dropped here too
    src = file_source(
        tmp_path,
        {
            "backends": [
                {"id": "a/qwen", "model": "qwen", "baseURLs": ["http://127.0.0.1:1/v1"]},
                {"id": "b/qwen", "model": "qwen", "baseURLs": ["http://127.0.0.1:2/v1"]},
                {"id": "solo", "model": "m", "baseURLs": ["http://127.0.0.1:3/v1"]},
                {
                    "id": "x",
                    "namespace": "b",
                    "model": "x",
                    "baseURLs": ["http://127.0.0.1:4/v1"],
                },
            ],
            "tenants": [
                {"name": "all", "keyEnv": "K_ALL", "models": ["*"]},
                {"name": "b", "keyEnv": "K_B", "models": ["*"], "namespaces": ["b"]},
            ],
        },
    )
    snap = src.snapshot
    everyone, b = snap.tenant("sk-all"), snap.tenant("sk-b")
    assert everyone is not None and everyone.namespaces == (ALL,) and everyone.id == "file:all"
    assert b is not None and b.namespaces == ("b",)
    assert ids(snap.candidates(everyone, "qwen")) == ["a/qwen", "b/qwen"]
    assert ids(snap.candidates(b, "qwen")) == ["b/qwen"]
    assert [m for m, _ in snap.models_for(b)] == ["qwen", "x"]
    assert snap.by_id["solo"].namespace == "default"


@pytest.mark.parametrize(
    ("config", "why"),
    [
        (
            {
                "backends": [
                    {"id": "a/m", "model": "m", "baseURLs": ["u"], "fallback": ["b/s"]},
                    {"id": "b/s", "model": "s", "baseURLs": ["u"]},
                ]
            },
            "fallback b/s is in another namespace than a",
        ),
        (
            {
                "tenants": [
                    {"name": "t", "keyEnv": "K1"},
                    {"name": "t", "keyEnv": "K2"},
                ]
            },
            "tenant t is listed twice",
        ),
        (
            {
                "tenants": [
                    {"name": "t1", "keyEnv": "K1"},
                    {"name": "t2", "keyEnv": "K1"},
                ]
            },
            "tenants t1 and t2 have the same key",
        ),
    ],
)
def test_file_mistakes_are_refused_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: dict[str, Any], why: str
) -> None:
    monkeypatch.setenv("K1", "sk-1")
    monkeypatch.setenv("K2", "sk-2")
    with pytest.raises(SystemExit, match=why):
        file_source(tmp_path, config)


# ---- what the cluster source keeps -------------------------------------------------------


class FakeApi:
    """Answers the gateway's GETs of backend key Secrets, and counts them."""

    def __init__(self, secrets: dict[str, dict[str, Any]]) -> None:
        self.secrets = secrets
        self.gets: list[str] = []

    async def get(self, path: str, **params: Any) -> dict[str, Any]:
        self.gets.append(path)
        return self.secrets[path]


def remote(name: str, ns: str, url: str, secret_name: str) -> dict[str, Any]:
    spec = {
        "engine": "remote",
        "remote": {"baseURL": url},
        "apiKeySecretRef": {"name": secret_name, "key": "api-key"},
    }
    return {**llmb(name, spec, ns=ns), "metadata": {"name": name, "namespace": ns, "uid": "u"}}


def test_the_cluster_source_keeps_digests_and_live_backend_keys_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Key Secrets are kept as digest + grant; a backend's key value only while a backend
    names it; a refused remote backend's Secret is never read; problems are logged once,
    by namespace/name, never by value."""
    provider_secret = {
        "metadata": {"name": "provider", "namespace": "team-a", "managedFields": [{}]},
        "data": {"api-key": b64("sk-provider\n"), "unrelated": b64("sk-not-needed")},
    }
    api = FakeApi(
        {
            "/api/v1/namespaces/team-a/secrets/provider": provider_secret,
            "/api/v1/namespaces/team-a/secrets/loot": {"data": {"api-key": b64("sk-loot")}},
        }
    )

    async def scenario() -> None:
        src = KubeSource(
            api,  # type: ignore[arg-type]
            ["team-a", "team-b"],
            gateway_namespace="fabric-system",
            remote_hosts=RemoteHosts.of(["api.openai.com"]),
        )
        # Key Secrets are watched in the served namespaces and the admin's one.
        assert [w.namespace for w in src.keys] == ["team-a", "team-b", "fabric-system"]
        assert [w.namespace for w in src.backends] == ["team-a", "team-b"]
        key_watch = src.keys[0]
        kept = key_watch.keep(
            secret("k", ns="team-a", key="sk-team-a", namespaces="*", extra="sk-extra")
        )
        assert isinstance(kept, KeyEntry) and "sk-team-a" not in repr(kept)
        assert "sk-extra" not in repr(kept)
        key_watch.objects[("team-a", "k")] = kept
        key_watch.objects[("team-a", "bad")] = key_watch.keep(
            secret("bad", ns="team-a", key="sk-bad value")
        )
        src.backends[0].objects = {
            ("team-a", "gpt"): remote("gpt", "team-a", "https://api.openai.com/v1", "provider"),
            ("team-a", "exfil"): remote("exfil", "team-a", "https://evil.example/v1", "loot"),
        }
        src._rebuild()
        await asyncio.sleep(0.01)  # the key Secret is fetched, then the snapshot rebuilt
        assert api.gets == ["/api/v1/namespaces/team-a/secrets/provider"]  # never "loot"
        assert src.backend_keys == {("team-a", "provider", "api-key"): "sk-provider"}
        tenant = src.snapshot.tenant("sk-team-a")
        assert tenant is not None and tenant.namespaces == ("team-a",)
        [gpt] = src.snapshot.candidates(tenant, "gpt")
        assert gpt.api_key == "sk-provider" and gpt.urls == ("https://api.openai.com/v1",)
        assert src.snapshot.candidates(tenant, "exfil") == ()
        # The backend deleted: its key value goes with it.
        src.backends[0].objects.pop(("team-a", "gpt"))
        src._rebuild()
        assert src.backend_keys == {}
        src._rebuild()  # nothing new: nothing logged again

    with caplog.at_level(logging.WARNING, logger="fabric_operator.gateway.sources"):
        asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records]
    assert sorted(messages) == sorted(
        [
            "LLMBackend team-a/exfil is not routed: spec.remote.baseURL host evil.example is "
            "not an allowed remote host (the platform admin's list: api.openai.com)",
            "key Secret team-a/bad: 'key' must be printable ASCII without spaces (a bearer token)",
            "key Secret team-a/k: 'namespaces' ignored: only keys in the gateway's namespace "
            "(fabric-system) reach other namespaces; this one reaches team-a only",
        ]
    )
    for value in ["sk-team-a", "sk-bad", "sk-provider", "sk-loot", "sk-extra"]:
        assert all(value not in m for m in messages)


def test_watched_objects_are_kept_without_managed_fields() -> None:
    obj = {"metadata": {"name": "n", "managedFields": [{"x": 1}], "annotations": {"a": "b"}}}
    assert slim(obj) == {"metadata": {"name": "n"}}
    assert obj["metadata"]["managedFields"]  # the original is left alone


# ---- the gateway's flags ---------------------------------------------------------------------


def parse(*argv: str) -> Any:
    parser = argparse.ArgumentParser()
    server.add_flags(parser)
    return parser.parse_args(argv)


def test_remote_host_flags_default_to_the_providers_and_refuse_urls(
    capsys: pytest.CaptureFixture[str],
) -> None:
    default = parse()
    assert RemoteHosts.of(default.remote_hosts, default.remote_http_hosts) == RemoteHosts()
    given = parse("--remote-hosts=", "--remote-http-hosts=vllm.ml.svc.cluster.local, 10.0.0.9")
    assert given.remote_hosts == () and given.remote_http_hosts == (
        "vllm.ml.svc.cluster.local",
        "10.0.0.9",
    )
    with pytest.raises(SystemExit):
        parse("--remote-hosts=https://api.openai.com/v1")
    assert "is not a host name" in capsys.readouterr().err


def test_the_admins_namespace_is_never_guessed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "SERVICE_ACCOUNT_NAMESPACE", tmp_path / "absent")
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    assert server.gateway_namespace(None) is None  # not "default"
    monkeypatch.setenv("POD_NAMESPACE", "from-env")
    assert server.gateway_namespace(None) == "from-env"
    (tmp_path / "namespace").write_text("fabric-system\n")
    monkeypatch.setattr(server, "SERVICE_ACCOUNT_NAMESPACE", tmp_path / "namespace")
    assert server.gateway_namespace(None) == "fabric-system"
    assert server.gateway_namespace("flag") == "flag"


def test_an_autoscaled_backend_holds_and_a_prefix_affinity_one_says_how_much_prefix() -> None:
    spec = {
        **LOCAL,
        "fallback": ["gpt"],
        "autoscaling": {"minReplicas": 0, "maxReplicas": 2, "fallbackAfterSeconds": 5},
        "routing": {"strategy": "PrefixAffinity", "prefixCharacters": 512},
    }
    b = backend_from_object(llmb("q", spec), None, None)
    assert b is not None
    assert b.urls == ()
    assert b.hold == Hold(timeout=600.0, most=100, fallback_after=5.0)
    assert b.affinity == 512
    least = backend_from_object(
        llmb("q", {**LOCAL, "routing": {"strategy": "LeastInFlight"}}), None, None
    )
    assert least is not None and least.affinity is None
