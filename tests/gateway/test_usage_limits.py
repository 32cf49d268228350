"""Usage and limits with the gateway as real processes: tokens per tenant counted from
the upstreams' own usage (fake upstreams that record what they got, and a real engine),
streams byte for byte as the client would have had them, and limits shared by two
gateway processes through a real redis-server, which is taken away and given back."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.engine import (  # noqa: F401 - fixtures
    LlamaServer,
    tiny_engine_fixture,
    tiny_gguf_fixture,
)
from tests.support.gateway import gateway
from tests.support.kube import wait_for
from tests.support.redisserver import RedisServer, redis_server
from tests.support.upstream import Process, read_events, stream_chunks, upstream

pytestmark = pytest.mark.timeout(900)  # a cold cache builds the engine first (~3 min)
KEYS = {
    "KEY_A": "sk-usage-team-a-1",
    "KEY_B": "sk-usage-team-b-2",
    "KEY_RPM": "sk-usage-rpm-3",
    "KEY_TPM": "sk-usage-tpm-4",
    "KEY_DOWN": "sk-usage-down-5",
    "KEY_BACK": "sk-usage-back-6",
    "KEY_HUNG": "sk-usage-hung-7",
}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
PIECES = 5  # tokens of each fake stream


def metrics(gw: Process) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(gw.metrics_url).text  # type: ignore[attr-defined]
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def tokens(gw: Process, tenant: str, model: str, backend: str, kind: str) -> float:
    labels = {"tenant": tenant, "model": model, "backend": backend, "kind": kind}
    return metrics(gw).get(("fabric_gateway_tokens_total", tuple(sorted(labels.items()))), 0.0)


def one(gw: Process, name: str, **labels: str) -> float:
    return metrics(gw).get((name, tuple(sorted(labels.items()))), 0.0)


def last_request(fake: Process) -> dict[str, Any]:
    assert fake.events is not None
    bodies = [e["body"] for e in read_events(fake.events) if e["event"] == "request"]
    request: dict[str, Any] = json.loads(bodies[-1])
    return request


def post(gw: Process, key: str, body: dict[str, Any]) -> httpx.Response:
    headers = {"authorization": f"Bearer {KEYS[key]}"}
    return httpx.post(gw.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)


def stream_bytes(url: str, body: dict[str, Any], key: str | None = None) -> bytes:
    headers = {"authorization": f"Bearer {KEYS[key]}"} if key else {}
    with httpx.stream("POST", url + "/chat/completions", json=body, headers=headers) as resp:
        assert resp.status_code == 200
        return b"".join(resp.iter_raw())


# ---- usage, fake upstreams -------------------------------------------------------------------


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Process]]:
    d = tmp_path_factory.mktemp("fakes")
    with (
        upstream("local", events=d / "local.jsonl") as local,
        upstream("oai", "--null-usage", events=d / "oai.jsonl") as oai,
        upstream("gemini", events=d / "gemini.jsonl") as gemini,
    ):
        yield {"local": local, "oai": oai, "gemini": gemini}


@pytest.fixture(scope="module")
def gw(fakes: dict[str, Process], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    config = {
        "backends": [
            {"id": "ns/local", "model": "local", "baseURLs": [fakes["local"].url]},
            {
                "id": "ns/oai",
                "model": "oai",
                "baseURLs": [fakes["oai"].url],
                "provider": "openai",
            },
            {
                "id": "ns/gemini",
                "model": "gemini",
                "baseURLs": [fakes["gemini"].url],
                "provider": "google",
            },
        ],
        "tenants": [
            {"name": "team-a", "keyEnv": "KEY_A", "models": ["*"]},
            {"name": "team-b", "keyEnv": "KEY_B", "models": ["*"]},
        ],
    }
    with gateway(config=config, env=KEYS, workdir=tmp_path_factory.mktemp("gw")) as g:
        yield g


def test_a_stream_reaches_the_client_byte_for_byte_and_its_tokens_are_counted(
    gw: Process, fakes: dict[str, Process]
) -> None:
    body = {"model": "local", "stream": True, **CHAT}
    direct = stream_bytes(fakes["local"].url, body)
    assert direct == b"".join(stream_chunks("local", "local", PIECES))  # no usage asked
    before = [tokens(gw, "team-a", "local", "ns/local", k) for k in ("prompt", "completion")]
    assert stream_bytes(gw.url + "/v1", body, "KEY_A") == direct
    # The gateway asked for the usage chunk: the engine got the option, the client not.
    sent = last_request(fakes["local"])
    assert sent["stream_options"] == {"include_usage": True}
    after = [tokens(gw, "team-a", "local", "ns/local", k) for k in ("prompt", "completion")]
    assert [a - b for a, b in zip(after, before, strict=True)] == [3, PIECES]
    ttft = one(gw, "fabric_gateway_time_to_first_token_seconds_count", backend="ns/local")
    assert ttft >= 1


def test_openais_usage_nulls_are_taken_out_too(gw: Process, fakes: dict[str, Process]) -> None:
    body = {"model": "oai", "stream": True, **CHAT}
    direct = stream_bytes(fakes["oai"].url, body)  # not asked: no usage member at all
    assert b'"usage"' not in direct
    before = tokens(gw, "team-b", "oai", "ns/oai", "completion")
    assert stream_bytes(gw.url + "/v1", body, "KEY_B") == direct
    assert tokens(gw, "team-b", "oai", "ns/oai", "completion") - before == PIECES


def test_a_client_that_asked_for_usage_gets_it_and_is_counted(
    gw: Process, fakes: dict[str, Process]
) -> None:
    body = {"model": "oai", "stream": True, "stream_options": {"include_usage": True}, **CHAT}
    direct = stream_bytes(fakes["oai"].url, body)
    assert b'"choices": [], "usage": {"prompt_tokens": 3' in direct
    before = tokens(gw, "team-b", "oai", "ns/oai", "prompt")
    assert stream_bytes(gw.url + "/v1", body, "KEY_B") == direct
    assert tokens(gw, "team-b", "oai", "ns/oai", "prompt") - before == 3


def test_a_provider_not_known_to_take_the_option_is_not_sent_it(
    gw: Process, fakes: dict[str, Process]
) -> None:
    body = {"model": "gemini", "stream": True, **CHAT}
    before = one(gw, "fabric_gateway_usage_missing_total", backend="ns/gemini")
    through = stream_bytes(gw.url + "/v1", body, "KEY_A")
    assert "stream_options" not in last_request(fakes["gemini"])
    assert through == stream_bytes(fakes["gemini"].url, body)
    # This fake sends no usage unasked: counted as missing, not guessed.
    assert one(gw, "fabric_gateway_usage_missing_total", backend="ns/gemini") - before == 1


def test_non_streaming_tokens_add_up_per_tenant(gw: Process) -> None:
    before = {t: tokens(gw, t, "local", "ns/local", "completion") for t in ("team-a", "team-b")}
    for key in ("KEY_A", "KEY_A", "KEY_B"):
        resp = post(gw, key, {"model": "local", **CHAT})
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3
    after = {t: tokens(gw, t, "local", "ns/local", "completion") for t in ("team-a", "team-b")}
    assert {t: after[t] - before[t] for t in after} == {"team-a": 6, "team-b": 3}


# ---- usage, a real engine --------------------------------------------------------------------


def test_a_real_engines_usage_is_what_is_counted(
    tiny_engine: LlamaServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    assert tiny_engine.alias is not None and tiny_engine.api_key is not None
    model = tiny_engine.alias
    config = {
        "backends": [
            {
                "id": "ns/tiny",
                "model": model,
                "baseURLs": [tiny_engine.base_url],
                "apiKeyEnv": "ENGINE_KEY",
            }
        ],
        "tenants": [{"name": "team-a", "keyEnv": "KEY_A", "models": ["*"]}],
    }
    env = {**KEYS, "ENGINE_KEY": tiny_engine.api_key}
    with gateway(config=config, env=env, workdir=tmp_path_factory.mktemp("gw-real")) as g:
        answers = [post(g, "KEY_A", {"model": model, "max_tokens": n, **CHAT}) for n in (3, 7)]
        assert all(a.status_code == 200 for a in answers)
        used = [a.json()["usage"] for a in answers]
        assert tokens(g, "team-a", model, "ns/tiny", "prompt") == sum(
            u["prompt_tokens"] for u in used
        )
        assert tokens(g, "team-a", model, "ns/tiny", "completion") == sum(
            u["completion_tokens"] for u in used
        )
        # A stream: llama-cpp-python (0.3.x) ignores stream_options and sends no usage in
        # streams; the client's stream is whole and unchanged in shape, and the answer is
        # counted as missing rather than guessed.
        body = {"model": model, "max_tokens": 4, "stream": True, "seed": 1, **CHAT}
        got = stream_bytes(g.url + "/v1", body, "KEY_A")
        events = [e for e in got.split(b"\r\n\r\n" if b"\r\n\r\n" in got else b"\n\n") if e]
        assert events[-1].strip() == b"data: [DONE]"
        assert all(b'"choices":[]' not in e and b'"choices": []' not in e for e in events)
        assert one(g, "fabric_gateway_usage_missing_total", backend="ns/tiny") == 1


# ---- limits shared through Redis -----------------------------------------------------------


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis")) as r:
        yield r


@pytest.fixture(scope="module")
def pair(
    redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Process, Process]]:
    with upstream("up") as up:
        config = {
            "backends": [{"id": "ns/m", "model": "m", "baseURLs": [up.url]}],
            "tenants": [
                {"name": "rpm", "keyEnv": "KEY_RPM", "models": ["*"], "rpm": 5},
                {"name": "tpm", "keyEnv": "KEY_TPM", "models": ["*"], "tpm": 10},
                {"name": "down", "keyEnv": "KEY_DOWN", "models": ["*"], "rpm": 3},
                {"name": "back", "keyEnv": "KEY_BACK", "models": ["*"], "rpm": 3},
                {"name": "hung", "keyEnv": "KEY_HUNG", "models": ["*"], "rpm": 3},
            ],
        }
        env = {**KEYS, "FABRIC_REDIS_PASSWORD": redis.password}
        # A timeout no loaded CI machine trips by chance (the timeout's own test is the
        # hung Redis one).
        flags = (f"--redis-url={redis.url}", "--redis-timeout=1")
        with (
            gateway(*flags, config=config, env=env, workdir=tmp_path_factory.mktemp("g1")) as g1,
            gateway(*flags, config=config, env=env, workdir=tmp_path_factory.mktemp("g2")) as g2,
        ):
            for g in (g1, g2):
                wait_for("the limits to be shared", lambda g=g: shared(g), 10, interval=0.05)  # type: ignore[misc]
            yield g1, g2


def shared(g: Process) -> bool:
    return one(g, "fabric_gateway_limiter_shared") == 1.0


def codes(pair: tuple[Process, Process], key: str, n: int) -> list[int]:
    return [post(pair[i % 2], key, {"model": "m", **CHAT}).status_code for i in range(n)]


def test_two_gateways_hold_one_request_limit(pair: tuple[Process, Process]) -> None:
    got = codes(pair, "KEY_RPM", 10)
    assert 5 <= got.count(200) <= 6  # one limit of 5, within a request (a minute's turn)
    assert got[:5] == [200] * 5
    refused = post(pair[1], "KEY_RPM", {"model": "m", **CHAT})
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert 1 <= int(refused.headers["retry-after"]) <= 120


def test_two_gateways_hold_one_token_limit(
    pair: tuple[Process, Process], redis: RedisServer
) -> None:
    """tpm 10, 6 tokens an answer: the first answer leaves 4, and the next request (on
    the other gateway) is refused: its prompt alone is estimated at more than that (its
    ~60 bytes / 4, capped at the tpm)."""
    assert post(pair[0], "KEY_TPM", {"model": "m", **CHAT}).status_code == 200
    # The total over the minute keys: a minute may turn between answer and charge.
    wait_for(
        "the first answer's tokens in redis", lambda: redis_tokens(redis) == 6, 10, interval=0.05
    )
    refused = post(pair[1], "KEY_TPM", {"model": "m", **CHAT})
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "tokens"
    assert int(refused.headers["retry-after"]) >= 1


def redis_tokens(redis: RedisServer) -> int:
    """Every token counter's value together (a tenant's keys hold a hash, never its
    key; only the tpm tenant is charged)."""
    keys = [
        k
        for k in redis.command("KEYS", "fabric:limits:*").split(b"\r\n")
        if k.startswith(b"fabric:limits:") and b":t:" in k
    ]
    for k in keys:
        assert b"sk-" not in k
    return sum(_integer(redis.command("GET", k.decode())) for k in keys)


def _integer(reply: bytes) -> int:
    """A GET's value after the AUTH's +OK: `$<n>` then the digits, or `$-1` (none)."""
    lines = reply.split(b"\r\n")
    return 0 if lines[1] == b"$-1" else int(lines[2])


def test_redis_gone_limits_per_replica_then_shared_again(
    pair: tuple[Process, Process], redis: RedisServer
) -> None:
    redis.stop()
    try:
        # Traffic goes on, each replica holding the limit on its own: 3 + 3.
        got = codes(pair, "KEY_DOWN", 8)
        assert got.count(200) == 6, got
        for g in pair:
            assert not shared(g)
            assert one(g, "fabric_gateway_limiter_redis_errors_total") >= 1
            ready = httpx.get(g.url + "/readyz")
            assert ready.status_code == 200
            limits = ready.json()["limits"]
            assert limits["shared"] is False and "per-replica" in limits["degraded"]
    finally:
        redis.start()
    for g in pair:
        wait_for("the limits to be shared again", lambda g=g: shared(g), 10, interval=0.05)  # type: ignore[misc]
        assert httpx.get(g.url + "/readyz").json()["limits"]["shared"] is True
    got = codes(pair, "KEY_BACK", 6)
    assert got.count(200) == 3, got
    for g in pair:
        log = (Path(str(g.proc.args[-1]).split("=", 1)[1]).parent / "gateway.log").read_text()
        assert log.count("shared rate limits off") == 1
        assert "shared rate limits on" in log
        assert redis.password not in log


def test_a_hung_redis_times_out_to_per_replica_limits_and_back(
    pair: tuple[Process, Process], redis: RedisServer
) -> None:
    """SIGSTOP: the connections stay open and nothing answers, so every round trip
    waits its timeout (1 s) until the circuit opens; then the limits are per replica
    without waiting, and shared again once Redis answers."""
    redis.pause()
    try:
        got = codes(pair, "KEY_HUNG", 8)
        assert got.count(200) == 6, got  # 3 + 3: each replica on its own
        for g in pair:
            assert not shared(g)
            degraded = httpx.get(g.url + "/readyz").json()["limits"]["degraded"]
            assert "timed out" in degraded
    finally:
        redis.resume()
    for g in pair:
        wait_for("the limits to be shared again", lambda g=g: shared(g), 10, interval=0.05)  # type: ignore[misc]
