"""The gateways' load summed: per backend over the replicas, stale and closed streams
dropped, every change told at once; the stream reader against a fake transport."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from fabric_operator.autoscaler.signal import Demand, Report, Signal, parse_report
from fabric_operator.autoscaler.streams import Streams, watch_url


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def report(gateway: str, **backends: tuple[int, int]) -> Report:
    return Report(gateway, {k.replace("__", "/"): Demand(*v) for k, v in backends.items()})


def test_a_report_is_parsed_and_absent_counts_are_zero() -> None:
    line = json.dumps({"gateway": "gw-0", "backends": {"a/b": {"inFlight": 3}, "a/c": {}}})
    assert parse_report(line) == Report("gw-0", {"a/b": Demand(3, 0), "a/c": Demand(0, 0)})
    assert parse_report(b'{"gateway": "gw-1"}') == Report("gw-1", {})


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[]",
        '{"backends": {}}',
        '{"gateway": "g", "backends": []}',
        '{"gateway": "g", "backends": {"no-slash": {"inFlight": 1}}}',
        '{"gateway": "g", "backends": {"a/b": {"inFlight": -1}}}',
        '{"gateway": "g", "backends": {"a/b": {"held": true}}}',
        '{"gateway": "g", "backends": {"a/b": {"held": 1.5}}}',
        '{"gateway": "g", "backends": {"a/b": {"inFlight": 100000000000}}}',
    ],
)
def test_a_broken_report_is_refused(body: str) -> None:
    with pytest.raises(ValueError):
        parse_report(body)


def test_demand_is_summed_over_gateway_replicas() -> None:
    changes: list[set[str] | None] = []
    signal = Signal(changes.append, clock=Clock())
    signal.update("http://g0/load", report("g0", a__b=(2, 1), a__c=(1, 0)))
    signal.update("http://g1/load", report("g1", a__b=(3, 0)))
    assert signal.gateways == 2
    assert signal.demand("a/b") == Demand(5, 1) and signal.demand("a/b").total == 6
    assert signal.demand("a/c") == Demand(1, 0)
    assert signal.demand("x/y") == Demand(0, 0)  # absent: zero
    # Each gateway that joined changed every backend's reading: "all" (None).
    assert changes == [None, None]
    signal.update("http://g1/load", report("g1", a__b=(4, 0)))
    assert changes[-1] == {"a/b"}
    signal.update("http://g1/load", report("g1", a__b=(4, 0)))  # a heartbeat: no change
    assert len(changes) == 3


def test_a_closed_stream_no_longer_counts() -> None:
    changes: list[set[str] | None] = []
    signal = Signal(changes.append, clock=Clock())
    signal.update("u0", report("g0", a__b=(2, 0)))
    signal.update("u1", report("g1", a__b=(3, 0)))
    signal.drop("u1")
    assert signal.gateways == 1 and signal.demand("a/b") == Demand(2, 0)
    signal.drop("u1")  # again: nothing
    assert len(changes) == 3


def test_a_silent_gateway_is_dropped_after_the_stale_time() -> None:
    clock = Clock()
    signal = Signal(clock=clock, stale_after=3.0)
    signal.update("u0", report("g0", a__b=(2, 0)))
    signal.update("u1", report("g1", a__b=(3, 0)))
    clock.now += 2.0
    signal.update("u0", report("g0", a__b=(2, 0)))  # g0's heartbeat; g1 is silent
    clock.now += 1.0
    signal.expire()
    assert signal.gateways == 2  # 3 s of silence: not yet
    clock.now += 0.5
    signal.expire()
    assert signal.gateways == 1 and signal.demand("a/b") == Demand(2, 0)


def test_one_replica_reached_by_two_urls_counts_once() -> None:
    clock = Clock()
    signal = Signal(clock=clock)
    signal.update("http://10.0.0.1:9090/load", report("gw-a", a__b=(2, 0)))
    clock.now += 0.5
    signal.update("http://gateway.svc:9090/load", report("gw-a", a__b=(5, 0)))
    assert signal.gateways == 1 and signal.demand("a/b") == Demand(5, 0)


def test_the_watch_url_keeps_the_path() -> None:
    assert str(watch_url("http://127.0.0.1:9/load")) == "http://127.0.0.1:9/load?watch=1"


class FakeGateways(httpx.AsyncBaseTransport):
    """Answers /load?watch=1 with the chunks given per host, then closes the stream."""

    def __init__(self, chunks: dict[str, list[bytes]]) -> None:
        self.chunks = chunks
        self.requests: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(str(request.url))
        chunks = self.chunks.get(request.url.host)
        if chunks is None:
            return httpx.Response(503)

        async def body() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)

        return httpx.Response(200, content=body())


def line(gateway: str, backends: dict[str, Any]) -> bytes:
    return json.dumps({"gateway": gateway, "backends": backends}).encode() + b"\n"


def test_streams_feed_lines_split_across_chunks_and_drop_a_closed_stream() -> None:
    async def scenario() -> None:
        seen: list[int] = []
        signal = Signal(lambda _keys: seen.append(signal.demand("a/b").total))
        first = line("g0", {"a/b": {"inFlight": 1, "held": 1}})
        transport = FakeGateways(
            {"g0": [first[:10], first[10:] + line("g0", {"a/b": {"inFlight": 4}})]}
        )
        streams = Streams(signal, transport=transport)
        streams.set_urls(["http://g0/load", "http://down/load"])
        for _ in range(100):
            if 4 in seen:
                break
            await asyncio.sleep(0.01)
        assert seen[:2] == [2, 4] and signal.gateways == 1
        # The stream closes: its numbers are gone until it reconnects.
        for _ in range(100):
            if signal.gateways == 0:
                break
            await asyncio.sleep(0.01)
        assert signal.demand("a/b").total in (0, 4)
        assert streams.connects >= 1
        assert "http://down/load?watch=1" in transport.requests  # tried, refused, retried
        await streams.close()
        assert signal.gateways == 0 and streams.urls == set()

    asyncio.run(scenario())


def test_the_gateways_own_report_is_read() -> None:
    """The other end of the contract: gateway/load.py's document, as it writes it."""
    from fabric_operator.gateway.load import Load  # noqa: PLC0415

    load = Load("gw-7")
    load.enter("team-a/qwen")
    load.enter("team-a/qwen")
    load.hold("team-b/tiny")
    body = json.dumps(load.report())
    assert parse_report(body) == Report(
        "gw-7", {"team-a/qwen": Demand(2, 0), "team-b/tiny": Demand(0, 1)}
    )
