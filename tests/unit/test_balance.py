"""Picking a pod (gateway/balance.py) and counting load (gateway/load.py): pure parts."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

from aiohttp.test_utils import TestClient, TestServer

from fabric_operator.gateway import balance, opsserver
from fabric_operator.gateway.load import Load

URLS = tuple(f"http://10.0.0.{i}:8080/v1" for i in range(1, 5))


def test_least_in_flight_picks_the_emptiest_and_takes_turns_among_equals() -> None:
    load = {URLS[0]: 3, URLS[1]: 1, URLS[2]: 1, URLS[3]: 2}
    firsts = {balance.least_in_flight(URLS, load.__getitem__, t)[0] for t in range(8)}
    assert firsts == {URLS[1], URLS[2]}  # both of the least loaded, in turn
    order = balance.least_in_flight(URLS, load.__getitem__, 0)
    assert [load[u] for u in order] == [1, 1, 2, 3]
    idle = Counter(balance.least_in_flight(URLS, lambda _: 0, t)[0] for t in range(40))
    assert set(idle.values()) == {10}  # an idle backend's pods share evenly


def test_least_in_flight_keeps_simulated_in_flight_within_one_of_even() -> None:
    """Requests arriving while others run: each goes where the fewest are."""
    in_flight = dict.fromkeys(URLS, 0)
    for t in range(4 * 25):
        in_flight[balance.least_in_flight(URLS, in_flight.__getitem__, t)[0]] += 1
        assert max(in_flight.values()) - min(in_flight.values()) <= 1
    assert set(in_flight.values()) == {25}


def conversation(system: str, *turns: str) -> dict[str, object]:
    messages: list[dict[str, str]] = [{"role": "system", "content": system}]
    for i, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn})
        if i < len(turns) - 1:
            messages.append({"role": "assistant", "content": f"answer {i}"})
    return {"model": "m", "messages": messages}


def test_a_conversations_turns_keep_one_key_that_includes_the_system_prompt() -> None:
    first = balance.prefix_key(conversation("You are a pirate.", "hi"), 2048)
    later = balance.prefix_key(conversation("You are a pirate.", "hi", "more", "and more"), 2048)
    assert first == later
    other = balance.prefix_key(conversation("You are a lawyer.", "hi"), 2048)
    assert other != first  # the same opener under another system prompt: another key
    assert len(balance.prefix_key(conversation("x" * 5000, "hi"), 100)) == 100
    parts = {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image"}]}
    assert b"look" in balance.prefix_key({"messages": [parts]}, 64)
    assert balance.prefix_key({"prompt": "once upon"}, 64) == b"once upon"
    # Whatever a client sends, a key comes out (never an error on the request path).
    for odd in ({}, {"messages": "x"}, {"messages": [1, None]}, {"prompt": ["a"]}):
        assert isinstance(balance.prefix_key(odd, 64), bytes)


def test_prefix_affinity_is_sticky_spread_and_moves_little_when_a_pod_goes() -> None:
    idle = dict.fromkeys(URLS, 0)
    keys = [f"conversation {i}".encode() for i in range(400)]
    owner = {k: balance.by_prefix(URLS, k, idle.__getitem__)[0][0] for k in keys}
    again = [balance.by_prefix(URLS, k, idle.__getitem__) for k in keys]
    assert all(order[0] == owner[k] and own for k, (order, own) in zip(keys, again, strict=True))
    assert all(sorted(order) == sorted(URLS) for order, _ in again)  # every pod, in an order
    shares = Counter(owner.values())
    assert len(shares) == 4 and min(shares.values()) > 400 / 4 * 0.6  # 256 points per pod
    fewer = URLS[:3]
    moved = [k for k in keys if balance.by_prefix(fewer, k, idle.__getitem__)[0][0] != owner[k]]
    # Only the keys of the pod that left move (consistent hashing), not a reshuffle.
    assert {owner[k] for k in moved} == {URLS[3]}


def test_prefix_affinity_spills_a_hot_prefix_within_the_load_bound() -> None:
    in_flight = dict.fromkeys(URLS, 0)
    spilled = 0
    for _ in range(40):  # one hot conversation, 40 requests at once
        order, own = balance.by_prefix(URLS, b"hot", in_flight.__getitem__)
        spilled += not own
        in_flight[order[0]] += 1
        mean = sum(in_flight.values()) / len(URLS)
        assert max(in_flight.values()) <= max(1, -(-(mean * 1.25) // 1)) + 1
    assert spilled > 0
    assert max(in_flight.values()) <= 13  # 40 / 4 x 1.25 (+ rounding), not 40


def test_load_reports_counts_and_forgets_backends_with_none() -> None:
    load = Load("gw-1")
    load.enter("a/x")
    load.enter("a/x")
    load.hold("b/y")
    assert load.report() == {
        "gateway": "gw-1",
        "backends": {"a/x": {"inFlight": 2, "held": 0}, "b/y": {"inFlight": 0, "held": 1}},
    }
    load.leave("a/x")
    load.leave("a/x")
    load.unhold("b/y")
    assert load.report() == {"gateway": "gw-1", "backends": {}}


def test_a_watch_gets_a_line_at_once_on_a_change_and_a_heartbeat_when_quiet() -> None:
    async def scenario() -> tuple[list[dict[str, object]], float, float]:
        load = Load("gw")
        lines: list[dict[str, object]] = []
        stream = load.watch()
        loop = asyncio.get_running_loop()
        lines.append(json.loads(await anext(stream)))  # at once
        asked = loop.time()
        lines.append(json.loads(await anext(stream)))  # nothing changed: the heartbeat
        quiet = loop.time() - asked
        pending = asyncio.ensure_future(anext(stream))
        changed_at = loop.time()
        load.hold("ns/b")
        lines.append(json.loads(await pending))
        woke = loop.time() - changed_at
        await stream.aclose()
        assert not load._watchers  # a closed stream is no longer woken
        return lines, quiet, woke

    lines, quiet, woke = asyncio.run(scenario())
    assert lines[0]["backends"] == {}
    assert lines[1] == lines[0]  # the heartbeat repeats an unchanged report...
    assert quiet >= 0.9  # ...and comes only at the heartbeat (1 s): no line without a change
    assert lines[2]["backends"] == {"ns/b": {"inFlight": 0, "held": 1}}
    assert woke < 0.5  # a change is a line at once, not at the next heartbeat (1 s)


def test_load_streams_per_peer_are_capped_and_a_closed_one_frees_its_place() -> None:
    async def scenario() -> tuple[int, int, int]:
        load = Load("gw")
        async with TestClient(TestServer(opsserver.app(load), host="127.0.0.1")) as client:
            streams = []
            for _ in range(opsserver.MAX_PER_PEER):
                resp = await client.get("/load", params={"watch": "1"})
                await resp.content.readline()  # the first line: the stream is open
                streams.append(resp)
            refused = await client.get("/load", params={"watch": "1"})
            plain = await client.get("/load")  # a one-off report is never refused
            streams.pop().close()
            for _ in range(100):  # until the server has seen the stream go
                if load.watchers < opsserver.MAX_PER_PEER:
                    break
                await asyncio.sleep(0.05)
                load.hold("x")  # a change makes the server write, and find it closed
            again = await client.get("/load", params={"watch": "1"})
            status = again.status
            for r in [*streams, again]:
                r.close()
            return refused.status, plain.status, status

    assert asyncio.run(scenario()) == (503, 200, 200)
