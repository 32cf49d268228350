"""The shared limits' circuit without a Redis: replies that are no answer, charges Redis
refuses, failures in a row; and the Redis URL's password refused at start."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from fabric_operator.gateway import server, sharedlimit
from fabric_operator.gateway.sharedlimit import FAILURES_TO_OPEN, Refusal, SharedLimits

SCHEMA = Path(__file__).parents[2] / "charts/fabric-operator/values.schema.json"


def limits(replies: list[Any]) -> SharedLimits:
    shared = SharedLimits("redis://127.0.0.1:9/0", timeout=1.0)
    shared.up = True

    async def admit(keys: list[str], args: list[Any], client: Any = None) -> Any:
        reply = replies.pop(0) if replies else ConnectionError("down")
        if isinstance(reply, Exception):
            raise reply
        return reply

    shared._admit = admit  # type: ignore[assignment]
    return shared


@pytest.mark.parametrize("reply", [None, [], [1], [1, b"x", b"0", b"3"], [7, 1, 1, 1], b"OK"])
def test_a_reply_that_is_no_answer_falls_back_and_is_no_error_of_the_request(reply: Any) -> None:
    async def go() -> None:
        shared = limits([reply])
        assert await shared.admit("p", 5, None) is None  # the caller's own limits decide
        assert shared.errors == 1 and shared.up  # one failure does not open the circuit
        await shared.close()

    asyncio.run(go())


def test_the_circuit_opens_after_failures_in_a_row_and_a_success_resets_them() -> None:
    async def go() -> None:
        down = ConnectionError("down")
        shared = limits([down, down, [0], down, down, [1, b"5", b"0", b"1"]])
        for _ in range(5):
            await shared.admit("p", 5, None)
        assert shared.up  # never FAILURES_TO_OPEN in a row
        got = await shared.admit("p", 5, None)
        assert isinstance(got, Refusal) and got.kind == "requests"
        for _ in range(FAILURES_TO_OPEN):
            assert shared.up
            await shared.admit("p", 5, None)
        assert not shared.up
        await shared.close()

    asyncio.run(go())


class _Pipe:
    async def __aenter__(self) -> _Pipe:
        return self

    async def __aexit__(self, *_: Any) -> None:
        pass

    async def execute(self) -> None:
        raise aioredis.ResponseError("ERR increment or decrement would overflow")


def test_a_charge_redis_refuses_does_not_open_the_circuit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sharedlimit, "CHARGE_SECONDS", 0.0)

    async def go() -> None:
        shared = limits([])

        async def charge(keys: list[str], args: list[Any], client: Any = None) -> None:
            pass

        shared._charge = charge  # type: ignore[assignment]
        shared.client.pipeline = lambda transaction=False: _Pipe()  # type: ignore[assignment,method-assign,misc]
        shared.charge("p", 10)
        await asyncio.gather(*shared._charges)
        assert shared.errors == 1 and shared.up
        await shared.close()

    asyncio.run(go())


@pytest.mark.parametrize(
    "url",
    ["redis://:s3cret@h:6379/0", "rediss://user:s3cret@h/0", "redis://h/0?password=s3cret"],
)
def test_a_redis_url_with_a_password_is_refused_at_start(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    p = argparse.ArgumentParser()
    server.add_flags(p)
    with pytest.raises(SystemExit):
        p.parse_args(["--redis-url", url])
    err = capsys.readouterr().err
    assert "password" in err and "s3cret" not in err
    assert p.parse_args(["--redis-url", "redis://h:6379/0"]).redis_url == "redis://h:6379/0"


def test_the_charts_schema_refuses_a_redis_url_with_userinfo() -> None:
    schema = json.loads(SCHEMA.read_text())
    pattern = schema["properties"]["gateway"]["properties"]["redis"]["properties"]["url"]
    check = re.compile(pattern["pattern"])
    assert check.search("redis://redis.ns:6379/0") and check.search("")
    for url in ("redis://:s3cret@h:6379/0", "rediss://u:p@h/0", "redis://u@h/0", "redis://h /0"):
        assert not check.search(url), url
