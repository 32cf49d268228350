"""`transformers serve` (Hugging Face Transformers' OpenAI server) as a real process on CPU,
started exactly as render/transformers.py renders it (its launcher, arguments and
variables; only the address and the folders are the test's), on the suite's tiny Qwen2
model (tests/support/tiny_hf_model.py), answering the official `openai` client directly
and through the gateway: chats, streams, tool calls, a tool result's turn.

The server comes from hack/get-transformers-serve.sh's venv (transformers 5.25.0, torch
2.13.0's CPU build; built once, ~65 s, then cached). Figures are printed (`pytest -s`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from fabric_operator.api.backend import LLMBackend
from fabric_operator.localcluster import free_port
from fabric_operator.render import transformers
from tests.conftest import REPO
from tests.support.gateway import gateway
from tests.support.tiny_hf_model import TOOL_ARGUMENTS, TOOL_NAME, write_tiny_hf_model
from tests.support.upstream import Process

pytestmark = pytest.mark.timeout(900)  # a cold cache builds the venv first (~65 s)
SCRIPT = REPO / "hack" / "get-transformers-serve.sh"
SERVED = "team/tiny-tf"  # a served name with a slash: the launcher's link has a folder
TEAM_KEY = "sk-team-tf-7321"
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": TOOL_NAME,
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "enum": ["Paris", "London"]},
                    "unit": {"type": "string", "enum": ["c", "f"]},
                },
                "required": ["city", "unit"],
            },
        },
    }
]

_python: dict[str, str] = {}


def serve_python() -> str:
    """The venv's python (the script builds it once per machine). Skips only where the
    CPU torch wheel is nowhere pip looks (a machine without it); any other failure fails."""
    if "path" not in _python:
        out = subprocess.run(
            ["bash", str(SCRIPT)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        if out.returncode != 0:
            if "no torch==" in out.stderr and "wheel where pip looks" in out.stderr:
                pytest.skip(f"torch's CPU wheel not found by pip: {out.stderr.strip()[:300]}")
            pytest.fail(f"{SCRIPT} failed:\n{out.stderr[-3000:]}", pytrace=False)
        _python["path"] = out.stdout.strip().splitlines()[-1]
    return _python["path"]


def descendants(pid: int) -> list[int]:
    """The process's children, theirs, and so on (from /proc)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                kids = [int(k) for k in (task / "children").read_text().split()]
                out += kids
                todo += kids
    return out


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    ready_s: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


@contextlib.contextmanager
def run_server(backend: LLMBackend, workdir: Path, model: str | None = None) -> Iterator[Server]:
    """The rendered container as a local process: its command, its arguments with the
    model's path (PVC sources), the address and port replaced, and its variables with
    the folders (served dir, HF_HOME) under `workdir`. Offline: no hub is reachable."""
    c = transformers.container(backend)
    assert c.command is not None and c.command[:2] == ["python3", "-c"]
    port = free_port()
    args = list(c.args)
    if model is not None:
        args[0] = model
    args[args.index("0.0.0.0")] = "127.0.0.1"
    args[args.index(str(transformers.PORT))] = str(port)
    env = {e["name"]: e["value"] for e in c.env if "value" in e}
    env |= {
        "FABRIC_SERVED_DIR": str(workdir / "served"),
        "HF_HOME": str(workdir / "huggingface"),
        "HF_HUB_OFFLINE": "1",
        "PATH": os.environ["PATH"],
        "HOME": str(workdir),
        "TMPDIR": str(workdir),  # multiprocessing's pymp-* folder, left after a SIGTERM
    }
    log = workdir / "server.log"
    started = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [serve_python(), *c.command[1:], *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=workdir,
        )
    server = Server(process, port, log)
    family: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"transformers serve exited {process.returncode}:\n{server.tail()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"no /health in 120 s:\n{server.tail()}"
            time.sleep(0.1)
        server.ready_s = time.monotonic() - started
        family = [process.pid, *descendants(process.pid)]
        server.figures = {"start_to_health_s": round(server.ready_s, 1)}
        server.figures["rss_mb_all_processes"] = round(rss_mb(family), 0)
        server.figures["processes"] = len(family)
        yield server
    finally:
        if process.poll() is None:
            family = sorted({*family, *descendants(process.pid)})  # a /reset's new model
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        # The model's process exits with its parent; if one lingers, it is ours to end.
        deadline = time.monotonic() + 10
        while (
            alive := [p for p in family if p != process.pid and Path(f"/proc/{p}").exists()]
        ) and (time.monotonic() < deadline):
            time.sleep(0.2)
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not alive, f"processes outlived the server: {alive}"


def backend(spec: dict[str, Any], name: str = "tiny-tf") -> LLMBackend:
    manifest = {"metadata": {"name": name, "namespace": "ns"}, "spec": spec}
    return LLMBackend.from_manifest(manifest)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_hf_model(tmp_path_factory.mktemp("tiny-hf") / "tiny")


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Weights on a claim (a PVC source), served as SERVED."""
    spec = {
        "engine": "transformers",
        "image": "localhost/fabric-transformers-serve:test",
        "model": {"pvc": {"claimName": "weights", "path": "tiny"}},
        "servedModelName": SERVED,
    }
    with run_server(backend(spec), tmp_path_factory.mktemp("tf"), str(tiny_model)) as s:
        yield s
        print(f"\ntransformers serve figures: {json.dumps(s.figures)}")


@pytest.fixture(scope="module")
def gw(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    config = {
        "backends": [{"id": "ns/tiny-tf", "model": SERVED, "baseURLs": [server.base_url]}],
        "tenants": [{"name": "team", "keyEnv": "TEAM_KEY", "models": ["*"]}],
    }
    env = {"TEAM_KEY": TEAM_KEY}
    with gateway(config=config, env=env, workdir=tmp_path_factory.mktemp("gw")) as g:
        yield g


def direct(server: Server) -> openai.OpenAI:
    # transformers serve has no key: any bearer (or none) is let in.
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def via_gateway(gw: Process) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key=TEAM_KEY, max_retries=0, timeout=60)


def check_chat(c: openai.OpenAI) -> openai.types.chat.ChatCompletion:
    answer = c.chat.completions.create(model=SERVED, messages=ASK, max_tokens=8)
    assert answer.object == "chat.completion"
    assert answer.model == SERVED  # the link's name is the model's id
    [choice] = answer.choices
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.message.tool_calls is None
    assert choice.finish_reason in {"stop", "length"}
    assert answer.usage is not None and answer.usage.prompt_tokens > 0
    assert 0 < answer.usage.completion_tokens <= 8
    return answer


def check_stream(c: openai.OpenAI) -> list[Any]:
    with c.chat.completions.create(
        model=SERVED,
        messages=ASK,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        chunks = list(stream)
    assert chunks and all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert len({ch.id for ch in chunks}) == 1
    choices = [ch.choices[0] for ch in chunks if ch.choices]
    assert choices[0].delta.role == "assistant"
    assert all(ch.finish_reason is None for ch in choices[:-1])
    assert choices[-1].finish_reason in {"stop", "length"}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 8
    return chunks


def check_tool_call(c: openai.OpenAI) -> Any:
    answer = c.chat.completions.create(model=SERVED, messages=ASK, tools=TOOLS)
    [choice] = answer.choices
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.function.name == TOOL_NAME  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == TOOL_ARGUMENTS  # type: ignore[union-attr]
    assert call.id
    return call


def check_streamed_tool_call(c: openai.OpenAI) -> None:
    with c.chat.completions.create(model=SERVED, messages=ASK, tools=TOOLS, stream=True) as s:
        choices = [ch.choices[0] for ch in s if ch.choices]
    deltas = [d for ch in choices for d in ch.delta.tool_calls or []]
    assert choices[-1].finish_reason == "tool_calls"
    assert {d.function.name for d in deltas if d.function and d.function.name} == {TOOL_NAME}
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert json.loads(arguments) == TOOL_ARGUMENTS


# --- directly -----------------------------------------------------------------------------


def test_it_lists_the_served_name_alone(server: Server) -> None:
    models = direct(server).models.list()
    assert [m.id for m in models] == [SERVED]


def test_the_openai_client_gets_a_chat_and_a_stream(server: Server) -> None:
    c = direct(server)
    sent = time.monotonic()
    check_chat(c)
    server.figures["first_chat_s"] = round(time.monotonic() - sent, 3)
    sent = time.monotonic()
    check_chat(c)
    server.figures["chat_8_tokens_s"] = round(time.monotonic() - sent, 3)
    check_stream(c)


def test_its_streams_end_without_done(server: Server) -> None:
    """A fact the gateway and clients must live with: the last event is the finish (or
    usage) chunk; no `data: [DONE]` follows (the openai client stops at the stream's end)."""
    body = {"model": SERVED, "messages": ASK, "max_tokens": 4, "stream": True}
    raw = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=60)
    assert raw.status_code == 200
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[-1][6:])["choices"][0]["finish_reason"] in {"stop", "length"}
    assert "[DONE]" not in raw.text


def test_another_model_name_is_refused(server: Server) -> None:
    """Pinned to the model it was started with: unlike llama-cpp-python, which answers
    any name, it refuses other names (so the served name must be its model's name)."""
    with pytest.raises(openai.BadRequestError) as refused:
        direct(server).chat.completions.create(model="tiny-tf", messages=ASK, max_tokens=2)
    assert f"pinned to '{SERVED}'" in refused.value.response.json()["detail"]


def test_tools_offered_a_tool_call_comes_back(server: Server) -> None:
    c = direct(server)
    call = check_tool_call(c)
    check_streamed_tool_call(c)
    # The agent's second turn: the call, its result; the model answers in text.
    turn = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'},
    ]
    answer = c.chat.completions.create(model=SERVED, messages=turn, tools=TOOLS, max_tokens=8)
    assert answer.choices[0].finish_reason in {"stop", "length"}
    assert answer.choices[0].message.tool_calls is None


def test_no_key_is_checked(server: Server) -> None:
    """It has no API key of its own: whatever bearer comes, or none, is answered."""
    for headers in ({}, {"authorization": "Bearer sk-anything"}):
        r = httpx.get(f"{server.base_url}/models", headers=headers, timeout=10)
        assert r.status_code == 200
    assert httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10).status_code == 404


# --- through the gateway ------------------------------------------------------------------


def test_through_the_gateway_chat_stream_and_tool_calls(server: Server, gw: Process) -> None:
    c = via_gateway(gw)
    raw = c.chat.completions.with_raw_response.create(model=SERVED, messages=ASK, max_tokens=8)
    assert raw.headers["x-fabric-backend"] == "ns/tiny-tf"
    assert raw.parse().model == SERVED
    check_chat(c)
    chunks = check_stream(c)
    check_tool_call(c)
    check_streamed_tool_call(c)
    assert [m.id for m in c.models.list()] == [SERVED]
    print(f"\nthrough the gateway: {len(chunks)} stream chunks, tool calls plain and streamed")


# --- a Hub source, from the cache (no hub is reachable) -------------------------------------


def seed_hub_cache(hf_home: Path, repo: str, model: Path) -> str:
    """The folder layout huggingface_hub downloads into (hub/models--org--name: snapshots
    by commit, refs/main naming it), holding the tiny model's files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in model.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return str(snapshot)


def test_a_hub_source_found_in_the_cache_is_served_under_its_name(
    tiny_model: Path, tmp_path: Path
) -> None:
    """What a preloaded (or earlier) download looks like to the launcher with the Hub out
    of reach: it serves the cached snapshot under the backend's name."""
    repo = "fabric-test/tiny-qwen2"
    snapshot = seed_hub_cache(tmp_path / "huggingface", repo, tiny_model)
    spec = {"engine": "transformers", "image": "x:1", "model": {"huggingface": {"repo": repo}}}
    with run_server(backend(spec, name="hub-tiny"), tmp_path) as s:
        assert os.readlink(tmp_path / "served" / "hub-tiny") == snapshot
        answer = direct(s).chat.completions.create(model="hub-tiny", messages=ASK, max_tokens=4)
        assert answer.model == "hub-tiny"
        assert answer.choices[0].finish_reason in {"stop", "length"}


def test_reset_is_open_and_the_model_comes_back(server: Server) -> None:
    """POST /reset needs no key: it stops the model's process; the next request loads it
    again (the time it takes is printed). Keep the engine behind the gateway."""
    assert httpx.post(f"http://127.0.0.1:{server.port}/reset", timeout=30).status_code == 200
    sent = time.monotonic()
    check_chat(direct(server))
    server.figures["chat_after_reset_s"] = round(time.monotonic() - sent, 1)
