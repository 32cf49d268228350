"""Through the gateway to a real engine: llama-cpp-python's OpenAI server on a tiny
generated model (random weights: the text is nonsense, the protocol is real)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.support.engine import (  # noqa: F401 - fixtures
    LlamaServer,
    tiny_engine_fixture,
    tiny_gguf_fixture,
)
from tests.support.gateway import gateway
from tests.support.upstream import Process

pytestmark = pytest.mark.timeout(900)  # a cold cache builds the engine first (~3 min)
TEAM_KEY = "sk-team-tiny-4411"


@pytest.fixture(scope="module")
def gw(tiny_engine: LlamaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    assert tiny_engine.alias is not None and tiny_engine.api_key is not None
    config = {
        "backends": [
            {
                "id": "ns/tiny",
                "model": tiny_engine.alias,
                "baseURLs": [tiny_engine.base_url],
                "apiKeyEnv": "ENGINE_KEY",
            }
        ],
        "tenants": [{"name": "team", "keyEnv": "TEAM_KEY", "models": [tiny_engine.alias]}],
    }
    env = {"ENGINE_KEY": tiny_engine.api_key, "TEAM_KEY": TEAM_KEY}
    with gateway(config=config, env=env, workdir=tmp_path_factory.mktemp("gw")) as g:
        yield g


def test_openai_client_gets_real_completions_through_the_gateway(
    gw: Process, tiny_engine: LlamaServer
) -> None:
    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=TEAM_KEY)
    messages = [{"role": "user", "content": "hello"}]
    raw = client.chat.completions.with_raw_response.create(
        model=str(tiny_engine.alias),
        messages=messages,
        max_tokens=8,  # type: ignore[arg-type]
    )
    assert raw.headers["x-fabric-backend"] == "ns/tiny"
    answer = raw.parse()
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason in {"stop", "length"}
    assert answer.usage is not None and answer.usage.prompt_tokens > 0
    chunks = list(
        client.chat.completions.create(
            model=str(tiny_engine.alias),
            messages=messages,  # type: ignore[arg-type]
            max_tokens=8,
            stream=True,
        )
    )
    assert chunks and chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}
    print(f"{len(chunks)} stream chunks from the real engine through the gateway")


def test_the_engine_key_stays_in_the_gateway(gw: Process, tiny_engine: LlamaServer) -> None:
    # The team's key opens the gateway, not the engine; the gateway holds the engine's key.
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=tiny_engine.base_url, api_key=TEAM_KEY).models.list()
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gw.url + "/v1", api_key="sk-nope").models.list()
    models = openai.OpenAI(base_url=gw.url + "/v1", api_key=TEAM_KEY).models.list()
    assert [m.id for m in models] == [tiny_engine.alias]
    log = (Path(str(gw.proc.args[-1]).split("=", 1)[1]).parent / "gateway.log").read_text()
    assert str(tiny_engine.api_key) not in log and TEAM_KEY not in log
