"""The gateway as a real process in front of real upstream processes on 127.0.0.1:
keys, routing, limits, fallback, streaming, errors. Configured by its static file here;
tests/integration/test_gateway_kube.py covers learning the same from the API server."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.support.gateway import gateway
from tests.support.upstream import Process, stream_chunks, upstream

KEYS = {"KEY_ALL": "sk-all-7f3a", "KEY_QWEN": "sk-qwen-19c2", "KEY_SLOW": "sk-slow-55d0"}
ENGINE_KEY = "sk-engine-c0ffee"
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def error_of(resp: httpx.Response) -> dict[str, Any]:
    """The body must be OpenAI's error shape."""
    assert resp.headers["content-type"] == "application/json"
    error: dict[str, Any] = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, Process]]:
    with (
        upstream("a", "--key", ENGINE_KEY) as a,
        upstream("b") as b,
        upstream("down", "--status", "503") as down,
        upstream("busy", "--status", "429") as busy,
    ):
        yield {"a": a, "b": b, "down": down, "busy": busy}


def config(up: dict[str, Process]) -> dict[str, Any]:
    return {
        "backends": [
            {"id": "ns/qwen", "model": "qwen", "baseURLs": [up["a"].url], "apiKeyEnv": "ENGINE"},
            {"id": "ns/llama", "model": "llama", "baseURLs": [up["b"].url]},
            {
                "id": "ns/gpt",
                "model": "gpt",
                "baseURLs": [up["b"].url],
                "upstreamModel": "gpt-4o-mini",
            },
            {
                "id": "ns/down",
                "model": "down",
                "baseURLs": [up["down"].url],
                "fallback": ["ns/llama"],
            },
            {
                "id": "ns/busy",
                "model": "busy",
                "baseURLs": [up["busy"].url],
                "fallback": ["ns/down"],
            },
        ],
        "tenants": [
            {"name": "all", "keyEnv": "KEY_ALL", "models": ["*"]},
            {"name": "qwen-only", "keyEnv": "KEY_QWEN", "models": ["qwen"]},
            {"name": "slow", "keyEnv": "KEY_SLOW", "models": ["*"], "rpm": 2},
        ],
    }


@pytest.fixture(scope="module")
def gw(
    upstreams: dict[str, Process], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Process]:
    env = {**KEYS, "ENGINE": ENGINE_KEY}
    with gateway(config=config(upstreams), env=env, workdir=tmp_path_factory.mktemp("gw")) as g:
        yield g


def post(
    gw: Process, key: str | None, body: dict[str, Any], path: str = "/v1/chat/completions"
) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(gw.url + path, json=body, headers=headers, timeout=10)


def test_routes_by_model_with_the_backends_key_never_the_tenants(gw: Process) -> None:
    resp = post(gw, KEYS["KEY_ALL"], {"model": "qwen", **CHAT})
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-fabric-backend"] == "ns/qwen" and resp.headers["x-upstream"] == "a"
    assert resp.headers["x-seen-authorization"] == f"Bearer {ENGINE_KEY}"
    assert resp.json()["choices"][0]["message"]["content"] == "hello from a"
    other = post(gw, KEYS["KEY_ALL"], {"model": "llama", **CHAT})
    assert other.headers["x-upstream"] == "b" and other.headers["x-seen-authorization"] == ""
    print(
        "qwen ->", resp.headers["x-fabric-backend"], "llama ->", other.headers["x-fabric-backend"]
    )


def test_remote_style_backend_gets_the_providers_model_name(gw: Process) -> None:
    resp = post(gw, KEYS["KEY_ALL"], {"model": "gpt", **CHAT})
    assert resp.status_code == 200 and resp.json()["model"] == "gpt-4o-mini"


@pytest.mark.parametrize(
    ("key", "body", "status", "type_", "code"),
    [
        (None, {"model": "qwen"}, 401, "authentication_error", "missing_api_key"),
        ("sk-wrong", {"model": "qwen"}, 401, "authentication_error", "invalid_api_key"),
        (KEYS["KEY_QWEN"], {"model": "llama"}, 403, "permission_error", "model_not_allowed"),
        (KEYS["KEY_ALL"], {"model": "nope"}, 404, "invalid_request_error", "model_not_found"),
        (KEYS["KEY_ALL"], {"messages": []}, 400, "invalid_request_error", "missing_model"),
    ],
)
def test_refusals_are_openai_shaped(
    gw: Process, key: str | None, body: dict[str, Any], status: int, type_: str, code: str
) -> None:
    resp = post(gw, key, body)
    error = error_of(resp)
    assert (resp.status_code, error["type"], error["code"]) == (status, type_, code)
    print(status, error["message"])


def test_body_that_is_not_json_is_refused(gw: Process) -> None:
    resp = httpx.post(
        gw.url + "/v1/chat/completions",
        content=b"{oops",
        headers={"authorization": f"Bearer {KEYS['KEY_ALL']}"},
    )
    assert resp.status_code == 400 and error_of(resp)["code"] == "invalid_json"


def test_models_lists_exactly_what_the_key_may_use(gw: Process) -> None:
    def models(key: str) -> list[str]:
        resp = httpx.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {key}"})
        assert resp.status_code == 200 and resp.json()["object"] == "list"
        return [m["id"] for m in resp.json()["data"]]

    assert models(KEYS["KEY_QWEN"]) == ["qwen"]
    assert models(KEYS["KEY_ALL"]) == ["busy", "down", "gpt", "llama", "qwen"]
    assert httpx.get(gw.url + "/v1/models").status_code == 401


def test_requests_over_the_tenants_limit_get_429_with_retry_after(gw: Process) -> None:
    codes = [post(gw, KEYS["KEY_SLOW"], {"model": "llama", **CHAT}) for _ in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429]
    error = error_of(codes[2])  # as OpenAI answers it
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert "Limit 2" in error["message"]
    assert 1 <= int(codes[2].headers["retry-after"]) <= 30
    assert post(gw, KEYS["KEY_ALL"], {"model": "llama", **CHAT}).status_code == 200


def test_5xx_and_429_fall_back_in_order(gw: Process) -> None:
    resp = post(gw, KEYS["KEY_ALL"], {"model": "down", **CHAT})
    assert resp.status_code == 200 and resp.headers["x-fabric-backend"] == "ns/llama"
    # busy (429) -> down (503) -> down's own fallback is not followed, but busy lists only
    # down: the last answer, down's 503, goes through as it is.
    resp = post(gw, KEYS["KEY_ALL"], {"model": "busy", **CHAT})
    assert resp.status_code == 503 and resp.headers["x-fabric-backend"] == "ns/down"
    metrics = urllib.request.urlopen(gw.metrics_url).read().decode()  # type: ignore[attr-defined]
    assert (
        'fabric_gateway_fallbacks_total{from_backend="ns/down",model="down",to_backend="ns/llama"}'
        in metrics
    )
    assert 'fabric_gateway_upstream_errors_total{backend="ns/busy",reason="429"}' in metrics


def test_streaming_passes_through_byte_for_byte(gw: Process, upstreams: dict[str, Process]) -> None:
    body = {"model": "llama", "stream": True, **CHAT}
    with httpx.stream("POST", upstreams["b"].url + "/chat/completions", json=body) as direct:
        expected = b"".join(direct.iter_raw())
    headers = {"authorization": f"Bearer {KEYS['KEY_ALL']}"}
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, headers=headers) as r:
        assert r.headers["content-type"] == "text/event-stream"
        got = b"".join(r.iter_raw())
    assert got == expected == b"".join(stream_chunks("b", "llama", 5))


def test_the_official_openai_client_works_unchanged(gw: Process) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=KEYS["KEY_ALL"])
    answer = client.chat.completions.create(
        model="qwen", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content == "hello from a"
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="llama", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    ]
    assert "".join(pieces) == "".join(f"b-{i} " for i in range(5))
    assert client.embeddings.create(model="llama", input="x").data[0].embedding == [0.1, 0.2]
    assert [m.id for m in client.models.list()] == ["busy", "down", "gpt", "llama", "qwen"]
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=gw.url + "/v1", api_key=KEYS["KEY_QWEN"]).chat.completions.create(
            model="llama", messages=[]
        )


def test_keys_never_reach_the_log(gw: Process, tmp_path_factory: pytest.TempPathFactory) -> None:
    post(gw, KEYS["KEY_ALL"], {"model": "qwen", **CHAT})
    post(gw, "sk-wrong-guess", {"model": "qwen", **CHAT})
    log = (Path(str(gw.proc.args[-1]).split("=", 1)[1]).parent / "gateway.log").read_text()
    assert '"tenant": "all"' in log
    for secret in [*KEYS.values(), ENGINE_KEY, "sk-wrong-guess"]:
        assert secret not in log


# ---- fallback when an upstream dies ------------------------------------------------------


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Process, Process, Process]]:
    """A primary with a slow stream, its fallback, and a gateway in front."""
    with (
        upstream("primary", "--pieces", "20", "--gap", "0.1") as primary,
        upstream("spare") as spare,
    ):
        cfg = {
            "requireKeys": False,
            "backends": [
                {"id": "ns/p", "model": "m", "baseURLs": [primary.url], "fallback": ["ns/s"]},
                {"id": "ns/s", "model": "spare", "baseURLs": [spare.url]},
            ],
        }
        with gateway("--timeout=1", config=cfg, workdir=tmp_path) as g:
            yield primary, spare, g


def test_killed_upstream_falls_back_but_never_mid_stream(
    pair: tuple[Process, Process, Process],
) -> None:
    primary, _, gw = pair
    body = {"model": "m", "stream": True, **CHAT}
    received = b""
    with httpx.stream("POST", gw.url + "/v1/chat/completions", json=body, timeout=10) as r:
        assert r.headers["x-fabric-backend"] == "ns/p"
        chunks = r.iter_raw()
        received += next(chunks)
        threading.Timer(0.3, primary.kill).start()
        # Cut when the upstream dies, and cut for the client too: never a clean end.
        with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
            for chunk in chunks:
                received += chunk
    assert b"primary-0" in received and b"spare" not in received
    assert b"data: [DONE]" not in received
    print(f"stream cut after {received.count(b'data:')} events, no fallback mid-stream")
    # The primary is gone: new requests go to the spare, as the header says.
    resp = httpx.post(gw.url + "/v1/chat/completions", json={"model": "m", **CHAT})
    assert resp.status_code == 200 and resp.headers["x-fabric-backend"] == "ns/s"


def test_all_upstreams_down_is_a_502_naming_the_last(tmp_path: Path) -> None:
    with upstream("x") as x:
        pass  # stopped: its port refuses connections now
    cfg = {"requireKeys": False, "backends": [{"id": "ns/x", "model": "m", "baseURLs": [x.url]}]}
    with gateway(config=cfg, workdir=tmp_path) as gw:
        resp = httpx.post(gw.url + "/v1/chat/completions", json={"model": "m", **CHAT})
    error = error_of(resp)
    assert resp.status_code == 502 and error["code"] == "upstream_unreachable"
    assert "ns/x" in error["message"]


def test_no_first_byte_in_time_falls_back(tmp_path: Path) -> None:
    with upstream("slow", "--delay", "5") as slow, upstream("quick") as quick:
        cfg = {
            "requireKeys": False,
            "backends": [
                {"id": "ns/slow", "model": "m", "baseURLs": [slow.url], "fallback": ["ns/q"]},
                {"id": "ns/q", "model": "q", "baseURLs": [quick.url]},
            ],
        }
        with gateway("--timeout=0.5", config=cfg, workdir=tmp_path) as gw:
            start = time.monotonic()
            resp = httpx.post(gw.url + "/v1/chat/completions", json={"model": "m", **CHAT})
            took = time.monotonic() - start
    assert resp.status_code == 200 and resp.headers["x-fabric-backend"] == "ns/q"
    assert took < 4, f"fell back after {took:.1f}s"


def test_a_dead_replica_is_skipped_for_the_backends_next_one(tmp_path: Path) -> None:
    with upstream("dead") as dead:
        pass  # stopped: its port refuses connections, as a pod that just died
    with upstream("alive") as alive:
        cfg = {
            "requireKeys": False,
            "backends": [{"id": "ns/m", "model": "m", "baseURLs": [dead.url, alive.url]}],
        }
        with gateway(config=cfg, workdir=tmp_path) as gw:
            answers = [
                httpx.post(gw.url + "/v1/chat/completions", json={"model": "m", **CHAT})
                for _ in range(4)
            ]
    assert [a.status_code for a in answers] == [200] * 4
    assert {a.headers["x-upstream"] for a in answers} == {"alive"}
