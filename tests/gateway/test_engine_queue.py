"""Requests that bypass the gateway still count: the gateway reads the engine's own queue
gauges and reports them on /load, where the autoscaler takes them into the demand.

The engine is a real process: llama-cpp-python's server with the CPU engine image's shim
(hack/images/engine/sitecustomize.py), which serves llama-server's
`llamacpp:requests_processing` and `llamacpp:requests_deferred` behind the API key, as
llama-server does with --metrics.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import REPO
from tests.support.engine import (  # noqa: F401 - fixtures
    TINY_KEY,
    LlamaServer,
    run_llama_server,
    tiny_gguf_fixture,
)
from tests.support.gateway import gateway
from tests.support.kube import wait_for
from tests.support.upstream import Process

pytestmark = pytest.mark.timeout(900)  # a cold cache builds the engine first (~3 min)
ALIAS = "tiny-queue"
SHIM = {
    "PYTHONPATH": str(REPO / "hack" / "images" / "engine"),
    "FABRIC_ENGINE_SHIM": "1",
    "FABRIC_ENGINE_METRICS": "1",
}


@pytest.fixture(scope="module")
def engine(tiny_gguf: Path) -> Iterator[LlamaServer]:
    with run_llama_server(tiny_gguf, alias=ALIAS, api_key=TINY_KEY, n_ctx=4096, env=SHIM) as server:
        yield server


@pytest.fixture(scope="module")
def gw(engine: LlamaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    config = {
        "backends": [
            {
                "id": "ns/queue",
                "model": ALIAS,
                "baseURLs": [engine.base_url],
                "apiKeyEnv": "ENGINE_KEY",
                "engine": "llamacpp",
            }
        ],
        "tenants": [{"name": "team", "keyEnv": "TEAM_KEY", "models": [ALIAS]}],
    }
    env = {"ENGINE_KEY": TINY_KEY, "TEAM_KEY": "sk-team-queue-1"}
    with gateway(
        "--engine-metrics-interval=0.1",
        config=config,
        env=env,
        workdir=tmp_path_factory.mktemp("gw"),
    ) as g:
        yield g


def load_of(gw: Process) -> dict[str, Any]:
    backends: dict[str, Any] = httpx.get(gw.load_url, timeout=5).json()["backends"]  # type: ignore[attr-defined]
    return backends.get("ns/queue", {})


def test_the_metrics_page_needs_the_engines_key(engine: LlamaServer) -> None:
    url = engine.base_url.removesuffix("/v1") + "/metrics"
    assert httpx.get(url, timeout=5).status_code == 401
    page = httpx.get(url, headers={"authorization": f"Bearer {TINY_KEY}"}, timeout=5)
    assert page.status_code == 200 and "llamacpp:requests_processing" in page.text


def test_requests_straight_to_the_engine_show_on_load(gw: Process, engine: LlamaServer) -> None:
    assert load_of(gw) == {}  # idle: nothing in flight, held or queued
    direct = openai.OpenAI(base_url=engine.base_url, api_key=TINY_KEY, max_retries=0)
    done = threading.Event()
    errors: list[BaseException] = []

    def bypass() -> None:
        # Long answers, one at a time at this engine: the others wait (deferred).
        try:
            while not done.is_set():
                direct.chat.completions.create(
                    model=ALIAS,
                    messages=[{"role": "user", "content": "Tell me a long story."}],
                    max_tokens=3000,
                )
        except BaseException as err:  # reported by the test below
            errors.append(err)

    senders = [threading.Thread(target=bypass, daemon=True) for _ in range(3)]
    for t in senders:
        t.start()
    try:
        seen = wait_for(
            "the engine's queue on /load",
            lambda: (d := load_of(gw)).get("engine", 0) >= 2 and d,
            60,
        )
        # None of them passed the gateway: only the engine's gauges tell of them.
        assert seen["inFlight"] == 0 and seen["held"] == 0, seen
        print(f"/load while 3 clients bypass the gateway: {seen}")
    finally:
        done.set()
        for t in senders:
            t.join(timeout=120)
    assert not errors, errors
    wait_for("the engine's queue to empty on /load", lambda: load_of(gw) == {}, 30)
