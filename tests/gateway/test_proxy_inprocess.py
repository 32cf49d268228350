"""The gateway's request path in-process, where a process test cannot reach: an error
nobody expected (a bug) before and after an answer began, the per-upstream slots, the
rate limiter's memory, the timeout flags."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
import uvicorn
from prometheus_client import CollectorRegistry
from uvicorn.server import ServerState

from fabric_operator.gateway import server
from fabric_operator.gateway.metrics import GatewayMetrics
from fabric_operator.gateway.proxy import AnswerAbortedError, Gateway, QuietAborts, Settings
from fabric_operator.gateway.ratelimit import RateLimiter
from fabric_operator.gateway.routes import (
    Backend,
    Hold,
    Snapshot,
    Tenant,
    build_snapshot,
    key_digest,
)
from fabric_operator.gateway.sources import Source
from fabric_operator.gateway.upstream import (
    CLIENTS,
    BrokenAnswerError,
    Headers,
    Slots,
    Timeouts,
    UpstreamTimeoutError,
)
from tests.support import asgi

KEY = "sk-inproc-77"
PROMPT = "the-prompt-nobody-may-log"
TENANT = Tenant(name="ns/key", models=("*",), namespaces=("*",))


class BrokenSnapshot(Snapshot):
    def candidates(self, tenant: Tenant, model: str) -> tuple[Backend, ...]:
        raise RuntimeError(f"a bug that quotes the request: {PROMPT} {KEY}")


def source(snapshot: Snapshot) -> Source:
    s = Source()
    s.snapshot = snapshot
    return s


def snapshot(cls: type[Snapshot] = Snapshot) -> Snapshot:
    built = build_snapshot(
        [Backend(id="ns/m", model="m", urls=("http://127.0.0.1:9/v1",))],
        {key_digest(KEY): TENANT},
    )
    return cls(routes=built.routes, tenants=built.tenants, scoped=built.scoped, by_id=built.by_id)


async def call(gateway: Gateway, body: dict[str, Any]) -> list[dict[str, Any]]:
    """One POST through the ASGI app; what it sent."""
    sent: list[dict[str, Any]] = []
    await asgi.post(gateway, json.dumps(body).encode(), KEY, sent)  # type: ignore[arg-type]
    return sent


def values(registry: CollectorRegistry, name: str) -> dict[str, float]:
    return {
        json.dumps(s.labels, sort_keys=True): s.value
        for m in registry.collect()
        for s in m.samples
        if s.name == name
    }


def test_an_unexpected_error_before_the_answer_is_an_openai_502_logged_without_secrets(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    gateway = Gateway(source(snapshot(BrokenSnapshot)), GatewayMetrics(registry))
    with caplog.at_level(logging.INFO, logger="fabric_operator.gateway"):
        sent = asyncio.run(call(gateway, {"model": "m", "messages": [PROMPT]}))
    start, body = sent
    assert start["status"] == 502
    error = json.loads(body["body"])["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("server_error", "internal_error")
    counted = values(registry, "fabric_gateway_unexpected_errors_total")
    assert counted == {'{"stage": "before_answer"}': 1.0}
    requests = values(registry, "fabric_gateway_requests_total")
    assert requests == {
        '{"backend": "-", "code": "502", "model": "unknown", "tenant": "ns/key"}': 1
    }
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    fields = record.fields  # type: ignore[attr-defined]
    assert fields["error"] == "RuntimeError" and fields["stage"] == "before_answer"
    assert any("candidates" in frame for frame in fields["where"])
    text = caplog.text + json.dumps([r.__dict__.get("fields") for r in caplog.records])
    assert PROMPT not in text and KEY not in text


class _Answer:
    status = 200

    def __init__(self) -> None:
        self.headers = [(b"content-type", b"text/event-stream")]
        self.aborted = False

    async def body(self) -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        raise ValueError(f"a bug mid-answer: {PROMPT}")

    async def close(self) -> None:
        raise AssertionError("an answer cut off is aborted, not closed")

    async def abort(self) -> None:
        self.aborted = True


class _Client:
    def __init__(self) -> None:
        self.answer = _Answer()

    async def post(self, url: str, content: bytes, headers: Headers, first_byte: float) -> Any:
        return self.answer

    async def close(self) -> None:
        pass


def test_an_unexpected_error_mid_answer_closes_the_connection_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    gateway = Gateway(source(snapshot()), GatewayMetrics(registry))
    client = gateway.client = _Client()
    with pytest.raises(AnswerAbortedError):  # uvicorn closes the connection on it
        asyncio.run(call(gateway, {"model": "m", "stream": True}))
    assert client.answer.aborted  # the upstream's connection closed: its request cancelled
    counted = values(registry, "fabric_gateway_unexpected_errors_total")
    assert counted == {'{"stage": "mid_answer"}': 1.0}
    assert gateway.slots.in_flight("ns/m http://127.0.0.1:9/v1") == 0
    assert PROMPT not in caplog.text


def test_uvicorns_traceback_of_a_cut_off_answer_is_left_out() -> None:
    def record(exc: BaseException) -> logging.LogRecord:
        return logging.LogRecord(
            "uvicorn.error", logging.ERROR, "", 0, "x", (), (type(exc), exc, None)
        )

    assert not QuietAborts().filter(record(AnswerAbortedError("broken")))
    assert QuietAborts().filter(record(RuntimeError("other")))


# ---- slots ---------------------------------------------------------------------------------


def test_slots_bound_each_upstream_and_hand_over_in_order() -> None:
    async def scenario() -> None:
        slots = Slots(2)
        assert slots.take("a") and slots.take("a") and not slots.take("a")
        assert slots.take("b")  # another upstream is not affected
        order: list[int] = []

        async def waiter(i: int) -> None:
            assert await slots.acquire("a", 5)
            order.append(i)

        tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
        await asyncio.sleep(0)
        assert not slots.free("a")
        slots.release("a")
        slots.release("a")
        await asyncio.sleep(0)
        assert order == [0, 1]
        # A waiter that gives up leaves no trace, and the slot goes to the next.
        assert not await slots.acquire("a", 0.01)
        slots.release("a")
        await asyncio.sleep(0)
        assert order == [0, 1, 2]
        for _ in range(2):  # five holders in all: two taken, three handed over
            slots.release("a")
        await asyncio.gather(*tasks)
        slots.release("b")
        assert slots._held == {} and slots._waiting == {}

    asyncio.run(scenario())


def test_a_cancelled_waiter_passes_a_slot_handed_to_it_on() -> None:
    async def scenario() -> None:
        slots = Slots(1)
        assert slots.take("u")
        first = asyncio.create_task(slots.acquire("u", 5))
        second = asyncio.create_task(slots.acquire("u", 5))
        await asyncio.sleep(0)
        slots.release("u")  # handed to `first`...
        first.cancel()  # ...which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await second  # so it went on to the next
        slots.release("u")
        assert slots._held == {} and slots._waiting == {}

    asyncio.run(scenario())


# ---- the rate limiter's memory -------------------------------------------------------------


def test_rate_limit_buckets_of_keys_unused_for_a_minute_are_dropped() -> None:
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    for i in range(1000):  # keys made and dropped, each used once
        assert limiter.take(f"uid-{i}", 10) == 0
    assert len(limiter) == 1000  # all still refilling: each one's limit holds
    now[0] = 61.0
    limiter.take("now", 10)
    for i in range(200):
        limiter.take(f"later-{i}", 10)
    assert len(limiter) <= 201
    # A bucket still refilling is kept: its limit holds.
    for _ in range(10):
        limiter.take("busy", 10)
    for i in range(300):
        limiter.take(f"more-{i}", 10)
    assert limiter.take("busy", 10) > 0


# ---- flags ---------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    server.add_flags(parser)
    return parser.parse_args(argv)


def test_timeout_flags_default_and_timeout_is_the_first_byte_timeout() -> None:
    d = parse()
    assert (d.first_byte_timeout, d.fallback_timeout, d.connect_timeout, d.idle_timeout) == (
        600,
        30,
        5,
        300,
    )
    assert (d.pool_timeout, d.max_connections_per_upstream, d.max_body_mib) == (10, 256, 32)
    assert parse("--timeout=45").first_byte_timeout == 45  # what the chart passes
    assert parse("--first-byte-timeout=7").first_byte_timeout == 7
    for bad in ["--idle-timeout=0", "--pool-timeout=-1", "--max-connections-per-upstream=0"]:
        with pytest.raises(SystemExit):
            parse(bad)


def test_fallback_waits_less_than_the_last_candidate() -> None:
    settings = Settings(first_byte_timeout=600, fallback_timeout=30)
    assert (settings.first_byte(last=False), settings.first_byte(last=True)) == (30, 600)
    short = Settings(first_byte_timeout=5, fallback_timeout=30)
    assert short.first_byte(last=False) == 5  # never longer than the first-byte timeout


# ---- the upstream clients' timeouts, against a bare server on 127.0.0.1 ------------------


class RawUpstream:
    """A bare TCP server on 127.0.0.1 that reads a request and answers with `answer`
    (given the writer); `closed` is set once the gateway's client hung up."""

    def __init__(self, answer: Callable[[asyncio.StreamWriter], Coroutine[Any, Any, None]]) -> None:
        self.answer = answer
        self.requests = 0
        self.closed = asyncio.Event()
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answering: asyncio.Task[None] | None = None
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            for line in head.lower().split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    await reader.readexactly(int(line.split(b":", 1)[1]))
            self.requests += 1
            answering = asyncio.create_task(self.answer(writer))
            while await reader.read(65536):  # until the client hangs up
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()
            if answering is not None:
                answering.cancel()
            writer.close()


async def _drip_headers(writer: asyncio.StreamWriter) -> None:
    """The status line at once, then a header every 50 ms for 3 s, then a whole answer:
    a byte always came lately, but the first byte of the body only after 3 s."""
    writer.write(b"HTTP/1.1 200 OK\r\n")
    for i in range(60):
        writer.write(b"x-drip-%d: %d\r\n" % (i, i))
        await writer.drain()
        await asyncio.sleep(0.05)
    writer.write(b"content-length: 2\r\n\r\nok")
    await writer.drain()


async def _first_chunk_then_silence(writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await writer.drain()
    await asyncio.Event().wait()


async def _never(writer: asyncio.StreamWriter) -> None:
    await asyncio.Event().wait()


@pytest.mark.parametrize("kind", sorted(CLIENTS))
def test_an_upstream_dripping_its_headers_cannot_stretch_the_first_byte_timeout(kind: str) -> None:
    async def scenario() -> None:
        async with RawUpstream(_drip_headers) as up:
            client = CLIENTS[kind](Timeouts(connect=1, idle=300))
            start = time.monotonic()
            try:
                with pytest.raises(UpstreamTimeoutError):
                    await client.post(up.url + "/chat/completions", b"{}", [], 0.5)
                took = time.monotonic() - start
                assert took < 1.5, f"the first byte was waited for {took:.2f}s, not 0.5s"
                # And the connection it gave up on is closed (the upstream sees it).
                await asyncio.wait_for(up.closed.wait(), 2)
            finally:
                await client.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", sorted(CLIENTS))
def test_an_upstream_silent_after_its_first_chunk_is_cut_off_at_the_idle_timeout(
    kind: str,
) -> None:
    async def scenario() -> None:
        async with RawUpstream(_first_chunk_then_silence) as up:
            client = CLIENTS[kind](Timeouts(connect=1, idle=0.3))
            try:
                response = await client.post(up.url + "/chat/completions", b"{}", [], 5)
                assert response.status == 200
                got: list[bytes] = []
                start = time.monotonic()
                with pytest.raises(BrokenAnswerError) as broken:
                    async for chunk in response.body():
                        got.append(chunk)
                took = time.monotonic() - start
                assert broken.value.idle and b"".join(got) == b"hello"
                assert 0.25 < took < 1.5, took
                await response.abort()
                await asyncio.wait_for(up.closed.wait(), 2)
            finally:
                await client.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", sorted(CLIENTS))
def test_a_request_cancelled_before_the_answer_closes_the_upstream_connection(
    kind: str,
) -> None:
    """What a client's disconnect does to the request's task, at the client's level."""

    async def scenario() -> None:
        async with RawUpstream(_never) as up:
            client = CLIENTS[kind](Timeouts(connect=1, idle=300))
            try:
                posting = asyncio.create_task(
                    client.post(up.url + "/chat/completions", b"{}", [], 60)
                )
                while not up.requests:
                    await asyncio.sleep(0.01)
                assert not up.closed.is_set()
                posting.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await posting
                await asyncio.wait_for(up.closed.wait(), 2)
            finally:
                await client.close()

    asyncio.run(scenario())


# ---- the lingering close ---------------------------------------------------------------------


class _Transport:
    def __init__(self, can_write_eof: bool = True) -> None:
        self.calls: list[str] = []
        self._can_write_eof = can_write_eof
        self._closed = False

    def write(self, data: bytes) -> None:
        self.calls.append("write")

    def pause_reading(self) -> None:
        self.calls.append("pause_reading")

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return self._closed

    def can_write_eof(self) -> bool:
        return self._can_write_eof

    def write_eof(self) -> None:
        self.calls.append("write_eof")

    def close(self) -> None:
        self.calls.append("close")
        self._closed = True


def test_a_lingering_close_sends_a_fin_then_closes_and_forgets_its_timer() -> None:
    async def scenario() -> None:
        protocol = argparse.Namespace(lingering=False)
        transport = _Transport()
        lingering = server._LingeringTransport(transport, protocol)  # type: ignore[arg-type]
        lingering.close()
        assert transport.calls == ["write_eof", "resume_reading"] and protocol.lingering
        assert lingering.is_closing() and not transport.is_closing()
        lingering.close()  # uvicorn may close twice: once is done
        assert transport.calls == ["write_eof", "resume_reading"]
        timer = lingering._linger
        assert timer is not None
        when = timer.when() - asyncio.get_running_loop().time()
        assert 0 < when <= server.LINGER_SECONDS
        # The client closed first: the connection is gone, and the timer with it.
        lingering.closed()
        assert timer.cancelled() and lingering._linger is None

        # uvicorn's protocol, subclassed: the connection lost, its timer goes.
        async def app(scope: Any, receive: Any, send: Any) -> None:
            pass

        config = uvicorn.Config(app=app, http=server.LingeringProtocol, lifespan="off")
        config.load()
        real = server.LingeringProtocol(config=config, server_state=ServerState(), app_state={})
        transport = _Transport()
        real.connection_made(transport)  # type: ignore[arg-type]
        real.transport.close()
        assert real.lingering and transport.calls == ["write_eof", "resume_reading"]
        real.data_received(b"GET / HTTP/1.1\r\n\r\n")  # dropped unparsed
        timer = real._lingering._linger
        assert timer is not None and not timer.cancelled()
        real.connection_lost(None)
        assert timer.cancelled()

        # Without a way to send a FIN (TLS), or already closing: closed at once.
        tls = _Transport(can_write_eof=False)
        server._LingeringTransport(tls, protocol).close()  # type: ignore[arg-type]
        assert tls.calls == ["close"]

    asyncio.run(scenario())


def held_snapshot(*, urls: tuple[str, ...] = (), key: bool = True) -> Snapshot:
    """Two autoscaled backends without a ready pod (held requests wait for one)."""
    hold = Hold(timeout=30.0, most=10)
    return build_snapshot(
        [
            Backend(id="ns/a", model="a", urls=urls, hold=hold),
            Backend(id="ns/b", model="b", urls=(), hold=hold),
        ],
        {key_digest(KEY): TENANT} if key else {},
    )


def test_held_requests_have_a_cap_over_all_backends() -> None:
    async def scenario() -> tuple[int, float, int]:
        gateway = Gateway(
            source(held_snapshot()), GatewayMetrics(CollectorRegistry()), Settings(max_held=1)
        )
        first = asyncio.ensure_future(call(gateway, {"model": "a", "messages": []}))
        while gateway.load.held_total < 1:
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        began = loop.time()
        second = await call(gateway, {"model": "b", "messages": []})  # another backend
        took = loop.time() - began
        first.cancel()
        return second[0]["status"], took, gateway.load.held("ns/b")

    status, took, held_b = asyncio.run(scenario())
    assert status == 503 and took < 1.0  # refused at once: the gateway's cap is reached
    assert held_b == 0


def held_then_ready(key: bool) -> tuple[int, str]:
    """A request held for ns/a, then a snapshot where it has a ready pod (nothing listens
    there: were the request sent, the gateway's own 502 says so), with or without the
    request's key: what it was answered."""

    async def scenario() -> tuple[int, str]:
        src = source(held_snapshot())
        gateway = Gateway(src, GatewayMetrics(CollectorRegistry()))
        held = asyncio.ensure_future(call(gateway, {"model": "a", "messages": []}))
        while gateway.load.held("ns/a") < 1:
            await asyncio.sleep(0.01)
        src.snapshot = held_snapshot(urls=("http://127.0.0.1:9/v1",), key=key)
        start, body = await asyncio.wait_for(held, 10)
        return start["status"], json.loads(body["body"])["error"]["code"]

    return asyncio.run(scenario())


def test_a_key_revoked_while_its_request_is_held_is_not_served() -> None:
    """The pod comes, but the key is gone by then: the request is not sent to it."""
    assert held_then_ready(key=False) == (503, "upstream_unavailable")


def test_a_held_request_is_woken_by_the_next_snapshot_and_sent_to_its_pod() -> None:
    """The same path with the key still valid reaches the pod."""
    assert held_then_ready(key=True) == (502, "upstream_unreachable")
