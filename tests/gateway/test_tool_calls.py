"""Agents call tools through the gateway: what they send reaches the engine unchanged,
what the engine answers reaches them unchanged, streams included, fallbacks too.

Two kinds of upstream: the fake one (tests.support.upstream), which records every body it
gets and answers a fixed tool-call stream, so "unchanged" is checked byte for byte; and a
real engine, llama-cpp-python's server with the `chatml-function-calling` chat format on
the suite's random-weight tiny model, whose tool calls are grammar-constrained: valid JSON
against the tool's schema whatever the weights (an enum keeps the arguments short).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.support.engine import (  # noqa: F401 - fixtures
    TINY_KEY,
    LlamaServer,
    run_llama_server,
    tiny_gguf_fixture,
)
from tests.support.gateway import gateway
from tests.support.upstream import (
    Process,
    read_events,
    tool_call_answer,
    tool_call_chunks,
    upstream,
    wait_event,
)

pytestmark = pytest.mark.timeout(900)  # a cold cache builds the engine first (~3 min)
TEAM_KEY = "sk-team-agents-5150"
ALIAS = "tiny-tools"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "London"]},
        "unit": {"type": "string", "enum": ["c", "f"]},
    },
    "required": ["city", "unit"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": WEATHER,
        },
    }
]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


# --- byte for byte, against the recording fake ------------------------------------------------


@pytest.fixture(scope="module")
def fakes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Process]]:
    d = tmp_path_factory.mktemp("fakes")
    with (
        upstream("engine", events=d / "engine.jsonl") as engine,
        upstream("down", "--status", "503", events=d / "down.jsonl") as down,
        upstream("provider", events=d / "provider.jsonl") as provider,
    ):
        yield {"engine": engine, "down": down, "provider": provider}


@pytest.fixture(scope="module")
def fake_gw(
    fakes: dict[str, Process], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Process]:
    config = {
        "backends": [
            {"id": "ns/agentic", "model": "agentic", "baseURLs": [fakes["engine"].url]},
            {
                "id": "ns/local",
                "model": "local",
                "baseURLs": [fakes["down"].url],
                "fallback": ["ns/cloud"],
            },
            {
                "id": "ns/cloud",
                "model": "cloud",
                "baseURLs": [fakes["provider"].url],
                "upstreamModel": "gpt-4o-mini",
            },
        ],
        "tenants": [{"name": "team", "keyEnv": "TEAM_KEY", "models": ["*"]}],
    }
    env = {"TEAM_KEY": TEAM_KEY}
    with gateway(config=config, env=env, workdir=tmp_path_factory.mktemp("fake-gw")) as g:
        yield g


def _post(gw: Process, raw: bytes) -> httpx.Response:
    headers = {"authorization": f"Bearer {TEAM_KEY}", "content-type": "application/json"}
    return httpx.post(f"{gw.url}/v1/chat/completions", content=raw, headers=headers, timeout=30)


def _bodies(p: Process) -> list[str]:
    assert p.events is not None
    return [e["body"] for e in read_events(p.events) if e["event"] == "request"]


# An agent's second turn: its tool call and the tool's result, with structured output asked.
SECOND_TURN: dict[str, Any] = {
    "messages": [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_0", "content": '{"temp_c": 21, "sky": "clear"}'},
    ],
    "tools": TOOLS,
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "report", "strict": True, "schema": WEATHER},
    },
}


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"messages": ASK, "tools": TOOLS, "tool_choice": NAMED}, id="named"),
        pytest.param({"messages": ASK, "tools": TOOLS, "tool_choice": "required"}, id="required"),
        pytest.param(SECOND_TURN, id="tool-result-turn"),
        pytest.param({"messages": ASK, "response_format": {"type": "json_object"}}, id="json"),
    ],
)
def test_requests_reach_the_engine_byte_for_byte(
    fake_gw: Process, fakes: dict[str, Process], body: dict[str, Any]
) -> None:
    # Spacing and key order as a client might send them: re-encoding would change both.
    raw = json.dumps({"model": "agentic", **body}, indent=1, ensure_ascii=False).encode()
    raw = raw.replace(b"weather", b"weath\\u0065r")  # an escape the gateway must not undo
    assert b"\\u0065" in raw
    before = len(_bodies(fakes["engine"]))
    resp = _post(fake_gw, raw)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-fabric-backend"] == "ns/agentic"
    assert _bodies(fakes["engine"])[before:] == [raw.decode()]


def test_a_tool_call_answer_comes_back_unchanged(fake_gw: Process) -> None:
    body = {"model": "agentic", "messages": ASK, "tools": TOOLS, "tool_choice": NAMED}
    resp = _post(fake_gw, json.dumps(body).encode())
    # The very bytes the engine sent (tests.support.upstream answers json.dumps of it).
    sent = json.dumps(tool_call_answer("engine", "agentic", "get_weather")).encode()
    assert resp.status_code == 200 and resp.content == sent
    client = openai.OpenAI(base_url=fake_gw.url + "/v1", api_key=TEAM_KEY)
    answer = client.chat.completions.create(
        model="agentic",
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice=NAMED,  # type: ignore[arg-type]
    )
    [call] = answer.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]


def test_a_streamed_tool_call_passes_byte_for_byte(fake_gw: Process) -> None:
    body = {"model": "agentic", "messages": ASK, "tools": TOOLS, "stream": True}
    headers = {"authorization": f"Bearer {TEAM_KEY}"}
    with httpx.stream(
        "POST", f"{fake_gw.url}/v1/chat/completions", json=body, headers=headers, timeout=30
    ) as resp:
        assert resp.status_code == 200
        got = b"".join(resp.iter_raw())
    assert got == b"".join(tool_call_chunks("engine", "agentic", "get_weather"))
    assert b'"finish_reason":"tool_calls"}]}\r\n\r\n' in got and b"Par\\u00eds" in got


def test_a_fallback_to_a_remote_provider_keeps_tools_and_structured_output(
    fake_gw: Process, fakes: dict[str, Process]
) -> None:
    sent = {"model": "local", **SECOND_TURN}
    before = len(_bodies(fakes["provider"]))
    resp = _post(fake_gw, json.dumps(sent).encode())
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-fabric-backend"] == "ns/cloud"  # the header names who served
    wait_event(fakes["down"].events, "completed")  # type: ignore[arg-type]
    [seen] = _bodies(fakes["provider"])[before:]
    # The provider's model name in place of the client's; everything else as sent.
    assert json.loads(seen) == {**sent, "model": "gpt-4o-mini"}
    assert resp.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == (
        "get_weather"
    )


# --- a real engine: llama-cpp-python, chatml-function-calling ----------------------------------


@pytest.fixture(scope="module")
def engine(tiny_gguf: Path) -> Iterator[LlamaServer]:
    with run_llama_server(
        tiny_gguf,
        alias=ALIAS,
        api_key=TINY_KEY,
        extra_args=["--chat_format", "chatml-function-calling"],
    ) as server:
        yield server


@pytest.fixture(scope="module")
def agent(engine: LlamaServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    config = {
        "backends": [
            {
                "id": "ns/tiny-tools",
                "model": ALIAS,
                "baseURLs": [engine.base_url],
                "apiKeyEnv": "ENGINE_KEY",
            }
        ],
        "tenants": [{"name": "team", "keyEnv": "TEAM_KEY", "models": [ALIAS]}],
    }
    env = {"ENGINE_KEY": TINY_KEY, "TEAM_KEY": TEAM_KEY}
    with gateway(config=config, env=env, workdir=tmp_path_factory.mktemp("gw")) as g:
        yield openai.OpenAI(base_url=g.url + "/v1", api_key=TEAM_KEY)


def _valid_call(call: Any) -> dict[str, Any]:
    assert call.type == "function" and call.id
    assert call.function.name == "get_weather"
    arguments: dict[str, Any] = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER)
    return arguments


@pytest.mark.parametrize("choice", [NAMED, "auto"], ids=["named", "auto"])
def test_the_engine_answers_tool_calls_through_the_gateway(
    agent: openai.OpenAI, choice: Any
) -> None:
    answer = agent.chat.completions.create(
        model=ALIAS,
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice=choice,
        max_tokens=64,
    )
    assert answer.choices[0].finish_reason == "tool_calls"
    [call] = answer.choices[0].message.tool_calls or []
    print("tool call:", _valid_call(call))


def test_a_streamed_tool_call_from_the_engine_adds_up(agent: openai.OpenAI) -> None:
    stream = agent.chat.completions.create(
        model=ALIAS,
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice=NAMED,  # type: ignore[arg-type]
        max_tokens=64,
        stream=True,
    )
    name, arguments, finish, ids = "", "", None, set()
    for chunk in stream:
        choice = chunk.choices[0]
        for delta in choice.delta.tool_calls or []:
            assert delta.index == 0
            ids.add(delta.id)
            if delta.function and delta.function.name:
                name = delta.function.name
            if delta.function and delta.function.arguments:
                arguments += delta.function.arguments
        finish = choice.finish_reason or finish
    assert finish == "tool_calls" and name == "get_weather" and len(ids - {None}) == 1
    jsonschema.validate(json.loads(arguments), WEATHER)


def test_the_tool_result_turn_is_answered(agent: openai.OpenAI) -> None:
    first = agent.chat.completions.create(
        model=ALIAS,
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice=NAMED,  # type: ignore[arg-type]
        max_tokens=64,
    )
    [call] = first.choices[0].message.tool_calls or []
    arguments = _valid_call(call)
    result = {"city": arguments["city"], "temp": 21, "unit": arguments["unit"]}
    turn = [
        *ASK,
        # llama-cpp-python refuses a null or missing content beside tool_calls (README).
        {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)},
    ]
    second = agent.chat.completions.create(
        model=ALIAS,
        messages=turn,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        max_tokens=16,
    )
    assert second.choices[0].message.role == "assistant"
    assert second.choices[0].finish_reason in {"stop", "length", "tool_calls"}
    assert second.usage is not None and second.usage.prompt_tokens > first.usage.prompt_tokens  # type: ignore[union-attr]


def test_structured_output_reaches_the_engine(agent: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    answer = agent.chat.completions.create(
        model=ALIAS,
        messages=ASK,  # type: ignore[arg-type]
        # llama-cpp-python's own shape: json_object with a schema (no json_schema type).
        response_format={"type": "json_object", "schema": schema},  # type: ignore[typeddict-unknown-key]
        max_tokens=64,
    )
    assert answer.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(answer.choices[0].message.content or ""), schema)
