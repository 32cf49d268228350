"""Routing, tenancy and rate limits of the gateway: pure functions over plain objects."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from fabric_operator.gateway.ratelimit import RateLimiter
from fabric_operator.gateway.routes import (
    Backend,
    Snapshot,
    Tenant,
    backend_from_object,
    build_routes,
    build_tenants,
    key_digest,
    ready_urls,
    tenant_from_secret,
)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def llmb(name: str, spec: dict[str, Any], status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns"}, "spec": spec, "status": status or {}}


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
    assert {b.pick() for _ in range(4)} == set(ready_urls(ENDPOINTS))  # round robin
    assert b.headers() == {"authorization": "Bearer sk-engine"}


def test_local_backend_via_service_uses_the_status_endpoint() -> None:
    status = {"endpoint": "http://q.ns.svc.cluster.local:8080/v1"}
    b = backend_from_object(llmb("q", LOCAL, status), None, None, via_service=True)
    assert b is not None and b.urls == ("http://q.ns.svc.cluster.local:8080/v1",)
    assert b.headers() == {}


def test_remote_backend_routes_to_its_base_url_with_the_providers_model() -> None:
    spec = {
        "engine": "remote",
        "servedModelName": "fast",
        "remote": {"baseURL": "https://x.openai.azure.com/openai/v1/", "model": "gpt-4o-mini"},
    }
    spec["remote"]["provider"] = "azure"
    b = backend_from_object(llmb("r", spec), None, "k")
    assert b is not None
    assert b.urls == ("https://x.openai.azure.com/openai/v1",) and b.upstream_model == "gpt-4o-mini"
    assert b.remote and b.headers() == {"authorization": "Bearer k", "api-key": "k"}


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


def secret(name: str, **data: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ns"},
        "data": {k: b64(v) for k, v in data.items()},
    }


def test_tenant_from_secret_reads_key_models_rpm_and_name() -> None:
    found = tenant_from_secret(secret("team-a", key="sk-a", models="qwen, llama-*", rpm="60"))
    assert found == ("sk-a", Tenant(name="team-a", models=("qwen", "llama-*"), rpm=60))
    named = tenant_from_secret(secret("s", key="k", tenant="blue"))
    assert not isinstance(named, str) and named[1] == Tenant(name="blue", models=())


@pytest.mark.parametrize(
    ("data", "why"),
    [
        ({}, "Secret ns/s: no 'key' entry"),
        ({"key": "k", "rpm": "lots"}, "Secret ns/s: rpm is not a whole number"),
        ({"key": "k", "rpm": "0"}, "Secret ns/s: rpm must be at least 1"),
    ],
)
def test_unusable_key_secrets_say_why_without_the_key(data: dict[str, str], why: str) -> None:
    assert tenant_from_secret(secret("s", **data)) == why
    assert build_tenants([secret("s", **data)]) == {}


def test_snapshot_finds_tenants_by_key_digest_and_filters_models() -> None:
    tenants = build_tenants([secret("a", key="sk-a", models="q*"), secret("b", key="sk-b")])
    routes = build_routes([backend("ns/q", "qwen"), backend("ns/l", "llama")])
    snap = Snapshot(routes=routes, tenants=tenants)
    assert key_digest("sk-a") in tenants and "sk-a" not in repr(tenants)
    a = snap.tenant("sk-a")
    assert a is not None and [m for m, _ in snap.models_for(a)] == ["qwen"]
    b = snap.tenant("sk-b")
    assert b is not None and snap.models_for(b) == []
    assert snap.tenant("sk-c") is None and snap.tenant(None) is None
    assert Snapshot(anonymous=Tenant("anon", ("*",))).tenant(None) == Tenant("anon", ("*",))


def test_rate_limiter_allows_a_minutes_burst_then_the_steady_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    assert [limiter.take("t", 3) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take("t", 3) == pytest.approx(20.0)  # one token per 20 s at 3 rpm
    assert limiter.take("other", 3) == 0.0  # tenants do not share a bucket
    now[0] = 20.0
    assert limiter.take("t", 3) == 0.0
    assert limiter.take("t", 3) > 0
