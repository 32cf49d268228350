"""Which replica a request reaches, through the gateway process and real upstream
processes on 127.0.0.1: least in flight steers around a slow replica (round-robin would
give it its full share), prefix affinity keeps a conversation on one replica and spills
a hot prefix within the load bound; /load reports what is in flight."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.gateway import gateway
from tests.support.upstream import Process, upstream

KEY = "sk-routing-8c2"


def run_gateway(tmp: Path, backends: list[dict[str, Any]]) -> Any:
    return gateway(
        config={
            "backends": backends,
            "tenants": [{"name": "t", "keyEnv": "ROUTING_KEY", "models": ["*"]}],
        },
        env={"ROUTING_KEY": KEY},
        workdir=tmp,
    )


@pytest.fixture(scope="module")
def replicas() -> Iterator[dict[str, Process]]:
    """Three replicas of one backend: `slow` takes a second, the others 50 ms."""
    with ExitStack() as stack:
        yield {
            "slow": stack.enter_context(upstream("slow", "--delay", "1.0")),
            "fast1": stack.enter_context(upstream("fast1", "--delay", "0.05")),
            "fast2": stack.enter_context(upstream("fast2", "--delay", "0.05")),
        }


def chat(gw: Process, messages: list[dict[str, str]], model: str = "m") -> httpx.Response:
    resp = httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": model, "messages": messages},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    return resp


def test_least_in_flight_sends_less_to_a_slow_replica(
    replicas: dict[str, Process], tmp_path: Path
) -> None:
    urls = [replicas[n].url for n in ("slow", "fast1", "fast2")]
    with run_gateway(tmp_path, [{"id": "ns/m", "model": "m", "baseURLs": urls}]) as gw:
        served: Counter[str] = Counter()
        lock = threading.Lock()

        def client(_: int) -> None:
            for _ in range(6):
                upstream_name = chat(gw, [{"role": "user", "content": "hi"}]).headers["x-upstream"]
                with lock:
                    served[upstream_name] += 1

        with ThreadPoolExecutor(6) as pool:
            list(pool.map(client, range(6)))
        print(f"36 requests, 6 at a time, over slow/fast/fast replicas: {dict(served)}")
        assert sum(served.values()) == 36
        # Round-robin would give the slow replica 12 (a third); least in flight gives it
        # only what arrives while it has no more in flight than the others.
        assert served["slow"] <= 6, served
        assert served["fast1"] > 0 and served["fast2"] > 0


def conversation(system: str, turns: int) -> list[list[dict[str, str]]]:
    """The request of each turn of one conversation (each resends what came before)."""
    out: list[list[dict[str, str]]] = []
    messages = [{"role": "system", "content": system}]
    for t in range(turns):
        messages = [*messages, {"role": "user", "content": f"turn {t}"}]
        out.append(messages)
        messages = [*messages, {"role": "assistant", "content": f"answer {t}"}]
    return out


def test_prefix_affinity_keeps_each_conversation_on_one_replica(tmp_path: Path) -> None:
    with ExitStack() as stack:
        ups = [stack.enter_context(upstream(f"r{i}")) for i in range(3)]
        backend = {
            "id": "ns/m",
            "model": "m",
            "baseURLs": [u.url for u in ups],
            "routing": {"strategy": "PrefixAffinity", "prefixCharacters": 2048},
        }
        with run_gateway(tmp_path, [backend]) as gw:
            placed: dict[int, set[str]] = {}
            for c in range(12):
                turns = conversation(f"You are assistant number {c}. " * 20, 3)
                placed[c] = {chat(gw, m).headers["x-upstream"] for m in turns}
            print(f"12 conversations x 3 turns: replicas per conversation {placed}")
            assert all(len(p) == 1 for p in placed.values()), placed  # sticky
            assert len(set().union(*placed.values())) >= 2  # and spread
            metrics = httpx.get(gw.metrics_url, timeout=5).text  # type: ignore[attr-defined]
            assert (
                'fabric_gateway_routing_decisions_total{backend="ns/m",decision="affinity"} 36.0'
                in metrics
            )


def test_a_hot_prefix_spills_within_the_load_bound(tmp_path: Path) -> None:
    with ExitStack() as stack:
        ups = [stack.enter_context(upstream(f"h{i}", "--delay", "1.0")) for i in range(3)]
        backend = {
            "id": "ns/m",
            "model": "m",
            "baseURLs": [u.url for u in ups],
            "routing": {"strategy": "PrefixAffinity"},
        }
        with run_gateway(tmp_path, [backend]) as gw, ThreadPoolExecutor(9) as pool:
            same = [
                {"role": "system", "content": "one prompt for all"},
                {"role": "user", "content": "hi"},
            ]
            served = Counter(
                r.headers["x-upstream"] for r in pool.map(lambda _: chat(gw, same), range(9))
            )
        print(f"9 concurrent requests of one prefix over 3 replicas: {dict(served)}")
        assert sum(served.values()) == 9
        # Bound 125 % of the mean: at most ceil(9 / 3 x 1.25) = 4 on one, never all 9.
        assert max(served.values()) <= 4, served


def test_load_reports_in_flight_and_streams_changes(
    replicas: dict[str, Process], tmp_path: Path
) -> None:
    backend = {"id": "ns/m", "model": "m", "baseURLs": [replicas["slow"].url]}
    with run_gateway(tmp_path, [backend]) as gw:
        load_url = gw.load_url  # type: ignore[attr-defined]
        assert httpx.get(load_url, timeout=5).json()["backends"] == {}
        with (
            httpx.stream("GET", load_url, params={"watch": "1"}, timeout=10) as stream,
            ThreadPoolExecutor(2) as pool,
        ):
            lines = stream.iter_lines()
            assert json.loads(next(lines))["backends"] == {}
            pending = [pool.submit(chat, gw, [{"role": "user", "content": "hi"}]) for _ in range(2)]
            seen = []
            for line in lines:  # each change a line; the requests take a second
                seen.append(json.loads(line)["backends"].get("ns/m", {}).get("inFlight", 0))
                if seen[-1] == 2 or len(seen) > 40:  # 40: heartbeats of many seconds
                    break
            for p in pending:
                p.result(timeout=10)
            for line in lines:
                seen.append(json.loads(line)["backends"].get("ns/m", {}).get("inFlight", 0))
                if seen[-1] == 0 or len(seen) > 80:
                    break
        print(f"in flight as /load?watch=1 streamed it: {seen}")
        assert 2 in seen and seen[-1] == 0
