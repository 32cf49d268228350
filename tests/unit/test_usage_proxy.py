"""Counting and charging tokens on the gateway's request path, in-process with a fake
upstream client: answers cut off or without usage are charged an estimate, streams are
known by their content type, counts are clamped, bodies that are not UTF-8 are not
edited."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from fabric_operator.gateway.limits import Limits
from fabric_operator.gateway.metrics import GatewayMetrics
from fabric_operator.gateway.proxy import AnswerAbortedError, Gateway
from fabric_operator.gateway.routes import Backend, Tenant, build_snapshot, key_digest
from fabric_operator.gateway.sources import Source
from fabric_operator.gateway.upstream import BrokenAnswerError, Headers
from tests.support import asgi
from tests.support.upstream import stream_chunks

KEY = "sk-usage-proxy-1"
TENANT = Tenant(name="ns/key", models=("*",), namespaces=("*",), tpm=1_000_000)
SSE = [(b"content-type", b"text/event-stream")]
JSON_TYPE = [(b"content-type", b"application/json")]


class Answer:
    status = 200

    def __init__(self, headers: list[tuple[bytes, bytes]], chunks: list[bytes], cut: bool):
        self.headers, self.chunks, self.cut = list(headers), chunks, cut

    async def body(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        if self.cut:
            raise BrokenAnswerError("cut")

    async def close(self) -> None:
        pass

    async def abort(self) -> None:
        pass


class Client:
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.sent: list[bytes] = []

    async def post(self, url: str, content: bytes, headers: Headers, first_byte: float) -> Any:
        self.sent.append(content)
        return self.answer

    async def close(self) -> None:
        pass


class Charged(Limits):
    def __init__(self) -> None:
        super().__init__()
        self.charged: list[int] = []

    def charge(self, tenant: Tenant, tokens: int) -> None:
        self.charged.append(tokens)
        super().charge(tenant, tokens)


def gateway(answer: Answer, provider: str = "openai-compatible") -> tuple[Gateway, Client]:
    built = build_snapshot(
        [Backend(id="ns/m", model="m", urls=("http://127.0.0.1:9/v1",), provider=provider)],
        {key_digest(KEY): TENANT},
    )
    src = Source()
    src.snapshot = built
    registry = CollectorRegistry()
    gw = Gateway(src, GatewayMetrics(registry), limits=Charged())
    gw.registry = registry  # type: ignore[attr-defined]
    client = gw.client = Client(answer)  # type: ignore[assignment]
    return gw, client


def run(gw: Gateway, content: bytes) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def go() -> None:
        await asgi.post(gw, content, KEY, sent)  # type: ignore[arg-type]

    with contextlib.suppress(AnswerAbortedError):  # the cut ones
        asyncio.run(go())
    return sent


def samples(gw: Gateway, name: str) -> dict[str, float]:
    registry: CollectorRegistry = gw.registry  # type: ignore[attr-defined]
    return {
        s.labels["kind"]: s.value for m in registry.collect() for s in m.samples if s.name == name
    }


def missing(gw: Gateway) -> float:
    return sum(samples_all(gw, "fabric_gateway_usage_missing_total"))


def samples_all(gw: Gateway, name: str) -> list[float]:
    registry: CollectorRegistry = gw.registry  # type: ignore[attr-defined]
    return [s.value for m in registry.collect() for s in m.samples if s.name == name]


def charged(gw: Gateway) -> list[int]:
    limits = gw.limits
    assert isinstance(limits, Charged)
    return limits.charged


BODY = {"model": "m", "messages": [{"role": "user", "content": "x" * 390}]}


def test_a_stream_cut_off_before_its_usage_is_charged_an_estimate() -> None:
    chunks = stream_chunks("a", "m", 5, usage=True)[:-3]  # cut before the usage chunk
    gw, _ = gateway(Answer(SSE, chunks, cut=True))
    content = json.dumps({**BODY, "stream": True}).encode()
    run(gw, content)
    assert samples(gw, "fabric_gateway_tokens_total") == {"prompt": 0, "completion": 0}
    estimated = samples(gw, "fabric_gateway_tokens_estimated_total")
    assert estimated == {"prompt": len(content) // 4, "completion": 5}
    assert missing(gw) == 1
    assert charged(gw) == [len(content) // 4 + 5]


def test_the_estimate_is_capped_by_max_tokens() -> None:
    chunks = stream_chunks("a", "m", 20)
    gw, _ = gateway(Answer(SSE, chunks, cut=True))
    run(gw, json.dumps({**BODY, "stream": True, "max_tokens": 3}).encode())
    assert samples(gw, "fabric_gateway_tokens_estimated_total")["completion"] == 3


def test_a_non_streaming_answer_without_usage_is_charged_by_its_bytes() -> None:
    answer = json.dumps({"choices": [{"message": {"content": "y" * 400}}]}).encode()
    gw, _ = gateway(Answer(JSON_TYPE, [answer], cut=False))
    content = json.dumps(BODY).encode()
    run(gw, content)
    estimated = samples(gw, "fabric_gateway_tokens_estimated_total")
    assert estimated == {"prompt": len(content) // 4, "completion": len(answer) // 4}
    assert missing(gw) == 1


def test_usage_that_came_before_a_cut_is_what_is_charged() -> None:
    chunks = stream_chunks("a", "m", 5, usage=True)[:-1]  # cut before [DONE]
    gw, _ = gateway(Answer(SSE, chunks, cut=True))
    run(gw, json.dumps({**BODY, "stream": True}).encode())
    assert samples(gw, "fabric_gateway_tokens_total") == {"prompt": 3, "completion": 5}
    assert missing(gw) == 0


@pytest.mark.parametrize("stream", [1, "true", "false", 0])
def test_a_stream_flag_that_is_no_boolean_is_refused(stream: Any) -> None:
    gw, client = gateway(Answer(SSE, [], cut=False))
    start, body = run(gw, json.dumps({**BODY, "stream": stream}).encode())
    assert start["status"] == 400
    error = json.loads(body["body"])["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_type")
    assert client.sent == []


def test_a_stream_is_known_by_its_content_type_not_the_request() -> None:
    chunks = stream_chunks("a", "m", 4, usage=True)
    gw, _ = gateway(Answer(SSE, chunks, cut=False))
    run(gw, json.dumps(BODY).encode())  # no "stream": the engine streamed all the same
    assert samples(gw, "fabric_gateway_tokens_total") == {"prompt": 3, "completion": 4}
    assert samples_all(gw, "fabric_gateway_time_to_first_token_seconds_count") == [1]


def test_counts_no_answer_could_hold_are_clamped() -> None:
    answer = json.dumps(
        {"choices": [], "usage": {"prompt_tokens": 2**70, "completion_tokens": 2**70}}
    ).encode()
    gw, _ = gateway(Answer(JSON_TYPE, [answer], cut=False))
    content = json.dumps({**BODY, "max_tokens": 5000}).encode()
    run(gw, content)
    counted = samples(gw, "fabric_gateway_tokens_total")
    assert counted == {"prompt": len(content) + 4096, "completion": 5000}
    assert charged(gw) == [len(content) + 4096 + 5000]


def test_a_utf16_body_is_forwarded_unchanged() -> None:
    content = json.dumps({**BODY, "stream": True}).encode("utf-16")
    gw, client = gateway(Answer(SSE, stream_chunks("a", "m", 2), cut=False))
    run(gw, content)
    assert client.sent == [content]
    assert missing(gw) == 1  # nothing was asked, nothing came: estimated


def test_injection_drops_continuous_usage_stats() -> None:
    body = {**BODY, "stream": True, "stream_options": {"continuous_usage_stats": True}}
    gw, client = gateway(Answer(SSE, stream_chunks("a", "m", 2, usage=True), cut=False))
    run(gw, json.dumps(body).encode())
    assert json.loads(client.sent[0])["stream_options"] == {"include_usage": True}


def test_token_counters_start_at_zero_for_each_routed_key_and_model() -> None:
    """So that Prometheus's increase() sees a counter's first answer."""
    gw, _ = gateway(Answer(SSE, [], cut=False))
    assert samples(gw, "fabric_gateway_tokens_total") == {"prompt": 0, "completion": 0}
    second = Backend(id="ns/n", model="n", urls=("http://127.0.0.1:9/v1",))
    first = Backend(id="ns/m", model="m", urls=("http://127.0.0.1:9/v1",))
    gw.source.snapshot = build_snapshot([first, second], {key_digest(KEY): TENANT})
    registry: CollectorRegistry = gw.registry  # type: ignore[attr-defined]
    found = {
        (s.labels["model"], s.labels["kind"])
        for m in registry.collect()
        for s in m.samples
        if s.name == "fabric_gateway_tokens_total"
    }
    assert found == {(m, k) for m in ("m", "n") for k in ("prompt", "completion")}
