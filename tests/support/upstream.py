"""A small, fast OpenAI-compatible server run as a real process: the upstream of gateway
tests and benchmarks. Deterministic answers, so a stream can be compared byte for byte.

    python -m tests.support.upstream --port 8001 --name a [--status 503] [--key K]

For robustness tests it can also misbehave and say what it saw:

- `--events FILE`: one JSON line per request (`request`), per answer ended (`completed`),
  per client that went away before its answer ended (`disconnected`, with the chunks
  sent): how a test sees that the gateway cancelled a request, without sleeping.
- `--break-after N`: a stream breaks off after N chunks (the connection is closed).
- `--raw MODE`: not uvicorn but a bare TCP server, answering /v1/models and otherwise:
  `hang` reads the request and never answers (`closed` once the peer hangs up);
  `garbage` answers bytes that are no HTTP; `bad-status` a status line of 799;
  `bad-header` a header value with a control character.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from fabric_operator.localcluster import free_port

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
REPO = Path(__file__).resolve().parents[2]


def chat_answer(name: str, model: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{name}",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": f"hello from {name}"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
    }


def _chunk(
    name: str, model: str, delta: dict[str, Any], finish: str | None, extra: dict[str, Any]
) -> bytes:
    body = {
        "id": f"chatcmpl-{name}",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return f"data: {json.dumps(body)}\n\n".encode()


PROMPT_TOKENS = 3  # what the fake says every prompt took


def stream_chunks(
    name: str, model: str, pieces: int, *, usage: bool = False, null_usage: bool = False
) -> list[bytes]:
    """A streamed answer of `pieces` tokens; with `usage` (the request's
    stream_options.include_usage) a usage-only chunk before [DONE], as OpenAI sends it,
    and with `null_usage` also `"usage": null` in every other chunk, as OpenAI does."""
    extra = {"usage": None} if usage and null_usage else {}
    out = [_chunk(name, model, {"role": "assistant", "content": ""}, None, extra)]
    out += [_chunk(name, model, {"content": f"{name}-{i} "}, None, extra) for i in range(pieces)]
    out += [_chunk(name, model, {}, "stop", extra)]
    if usage:
        counts = {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": pieces,
            "total_tokens": PROMPT_TOKENS + pieces,
        }
        body = {
            "id": f"chatcmpl-{name}",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": model,
            "choices": [],
            "usage": counts,
        }
        out.append(f"data: {json.dumps(body)}\n\n".encode())
    return [*out, b"data: [DONE]\n\n"]


def tool_call(name: str) -> dict[str, Any]:
    """The call the fake answers a request with tools with: the first tool, fixed args."""
    return {
        "id": "call_0",
        "type": "function",
        "function": {"name": name, "arguments": '{"city": "Paris"}'},
    }


def tool_call_answer(name: str, model: str, tool: str) -> dict[str, Any]:
    answer = chat_answer(name, model)
    answer["choices"][0]["message"] = {"role": "assistant", "content": None}
    answer["choices"][0]["message"]["tool_calls"] = [tool_call(tool)]
    answer["choices"][0]["finish_reason"] = "tool_calls"
    return answer


def tool_call_chunks(name: str, model: str, tool: str) -> list[bytes]:
    """A streamed tool call as OpenAI sends one: the call's id and name first, then its
    arguments in pieces, then finish_reason tool_calls. Written so that any re-encoding
    on the way shows: compact JSON with an escape, CRLF line ends, and writes that cut
    events (and a multi-byte escape) in two."""
    call = tool_call(tool)
    head = {"index": 0, "id": call["id"], "type": "function"}
    head["function"] = {"name": tool, "arguments": ""}
    deltas: list[tuple[dict[str, Any], str | None]] = [
        ({"role": "assistant", "content": None}, None),
        ({"tool_calls": [head]}, None),
    ]
    for piece in ('{"city": ', '"Par\u00eds"}'):
        deltas.append(({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}, None))
    deltas.append(({}, "tool_calls"))
    events = []
    for delta, finish in deltas:
        body = {
            "id": f"chatcmpl-{name}",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        events.append(b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\r\n\r\n")
    stream = b"".join(events) + b"data: [DONE]\r\n\r\n"
    return [stream[i : i + 37] for i in range(0, len(stream), 37)]


class Events:
    """Appends one JSON line per event to a file (or does nothing without one)."""

    def __init__(self, path: str | None) -> None:
        self.path = path

    def __call__(self, event: str, **fields: Any) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def wait_event(path: Path, event: str, count: int = 1, timeout: float = 5.0) -> list[float]:
    """Until the file holds `count` events of that name; the times they were written."""
    deadline = time.monotonic() + timeout
    while True:
        times = [e["time"] for e in read_events(path) if e["event"] == event]
        if len(times) >= count:
            return times
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} {event!r} events not in {path} within {timeout}s")
        time.sleep(0.01)


class Upstream:
    def __init__(self, args: argparse.Namespace) -> None:
        self.name, self.status, self.key = args.name, args.status, args.key
        self.delay, self.pieces, self.gap = args.delay, args.pieces, args.gap
        # Optional: tests.support.tenancy builds its arguments without them.
        self.break_after: int | None = getattr(args, "break_after", None)
        self.null_usage: bool = getattr(args, "null_usage", False)
        self.events = Events(getattr(args, "events", None))

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if not self.events.path or scope["path"] == "/v1/models":  # not the probe
            return await self.answer(scope, body, send, [0])
        # Listen for the client while answering: its going away cancels the answer.
        self.events("request", path=scope["path"], body=body.decode(errors="replace"))
        task, sent, done, gone = asyncio.current_task(), [0], [False], [False]
        assert task is not None

        async def watch() -> None:
            message = await receive()
            if message["type"] == "http.disconnect" and not done[0]:
                gone[0] = True
                self.events("disconnected", path=scope["path"], chunks=sent[0])
                task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await self.answer(scope, body, send, sent)
            done[0] = True
            self.events("completed", path=scope["path"], chunks=sent[0])
        except asyncio.CancelledError:
            if not gone[0]:
                raise
            task.uncancel()
        finally:
            done[0] = True
            watcher.cancel()
        return None

    async def answer(self, scope: dict[str, Any], body: bytes, send: Send, sent: list[int]) -> None:
        headers = dict(scope["headers"])
        seen = headers.get(b"authorization", b"").decode()
        extra = [(b"x-upstream", self.name.encode()), (b"x-seen-authorization", seen.encode())]
        if self.key and seen != f"Bearer {self.key}":
            return await _send(send, 401, {"error": {"message": "bad key"}}, extra)
        path = scope["path"]
        if path == "/v1/models":  # answered at once: it is how tests see the server is up
            data = {"object": "list", "data": [{"id": self.name, "object": "model"}]}
            return await _send(send, 200, data, extra)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status != 200:
            return await _send(send, self.status, {"error": {"message": self.name}}, extra)
        request = json.loads(body or b"{}")
        model = str(request.get("model"))
        if path == "/v1/embeddings":
            data = {"object": "list", "data": [{"embedding": [0.1, 0.2], "index": 0}]}
            return await _send(send, 200, {**data, "model": model}, extra)
        tools = request.get("tools") or []
        tool = tools[0]["function"]["name"] if tools else None
        if request.get("stream"):
            start = [(b"content-type", b"text/event-stream"), *extra]
            await send({"type": "http.response.start", "status": 200, "headers": start})
            options = request.get("stream_options") or {}
            pieces = (
                tool_call_chunks(self.name, model, tool)
                if tool
                else stream_chunks(
                    self.name,
                    model,
                    self.pieces,
                    usage=options.get("include_usage") is True,
                    null_usage=self.null_usage,
                )
            )
            for piece in pieces:
                if sent[0] == self.break_after:
                    self.events("broke", path=path, chunks=sent[0])
                    raise BrokenOnPurposeError  # uvicorn closes the connection mid-answer
                await send({"type": "http.response.body", "body": piece, "more_body": True})
                sent[0] += 1
                if self.gap:
                    await asyncio.sleep(self.gap)
            await send({"type": "http.response.body", "body": b""})
            return None
        if tool:
            return await _send(send, 200, tool_call_answer(self.name, model, tool), extra)
        return await _send(send, 200, chat_answer(self.name, model), extra)


class BrokenOnPurposeError(Exception):
    """--break-after: raised out of the app mid-answer, so uvicorn closes the connection."""


RAW_ANSWERS = {
    "garbage": b"HELLO THERE\r\n\r\n",
    "bad-status": b"HTTP/1.1 799 Weird\r\ncontent-length: 2\r\n\r\nok",
    "bad-header": b"HTTP/1.1 200 OK\r\nx-odd: a\x01b\r\ncontent-length: 2\r\n\r\nok",
}
_MODELS = b'{"object": "list", "data": []}'
MODELS_ANSWER = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
    + f"content-length: {len(_MODELS)}\r\n\r\n".encode()
    + _MODELS
)


async def serve_raw(host: str, port: int, mode: str, events: Events) -> None:
    """A bare TCP server that misbehaves as `mode` says (see the module's doc)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            for line in head.lower().split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    await reader.readexactly(int(line.split(b":", 1)[1]))
            if path == "/v1/models":
                writer.write(MODELS_ANSWER)
            elif mode == "hang":
                events("request", path=path)
                await reader.read()  # until the peer hangs up; never an answer
                events("closed", path=path)
            else:
                events("request", path=path)
                writer.write(RAW_ANSWERS[mode])
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    async with server:
        await server.serve_forever()


async def _send(send: Send, status: int, data: Any, extra: list[tuple[bytes, bytes]]) -> None:
    body = json.dumps(data).encode()
    length = (b"content-length", str(len(body)).encode())
    headers = [(b"content-type", b"application/json"), length, *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", default="upstream")
    p.add_argument("--status", type=int, default=200, help="answer every request with this")
    p.add_argument("--key", help="require this bearer key")
    p.add_argument("--delay", type=float, default=0.0, help="seconds before answering")
    p.add_argument("--pieces", type=int, default=5, help="content chunks of a stream")
    p.add_argument("--gap", type=float, default=0.0, help="seconds between stream chunks")
    p.add_argument("--events", help="append what happened to this file (JSON lines)")
    p.add_argument("--break-after", type=int, help="break a stream off after N chunks")
    p.add_argument(
        "--null-usage",
        action="store_true",
        help='asked for usage, also put "usage": null in every chunk (as OpenAI does)',
    )
    p.add_argument("--raw", choices=["hang", *RAW_ANSWERS], help="misbehave as a bare server")
    args = p.parse_args()
    if args.raw:
        asyncio.run(serve_raw(args.host, args.port, args.raw, Events(args.events)))
        return
    uvicorn.run(
        Upstream(args),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        http="httptools",
        loop="uvloop",
        lifespan="off",
        server_header=False,
        date_header=False,
        backlog=4096,
    )


# ---- for tests: the server (and the gateway) as processes ------------------------------


def wait_http(
    url: str, proc: subprocess.Popen[bytes], timeout: float = 20, *, need_ok: bool = False
) -> None:
    """Until `url` answers (with 200 if need_ok); fails early if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            if not need_ok:
                return  # it answers, if only with an error
            time.sleep(0.05)
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    url: str  # base URL, ending in /v1 for upstreams
    events: Path | None = None  # what an upstream started with `events=` saw

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def upstream(
    name: str,
    *args: str,
    host: str = "127.0.0.1",
    port: int = 0,
    enter: list[str] | None = None,
    events: Path | None = None,
) -> Iterator[Process]:
    """The fake upstream as its own process, stopped at exit; `enter` runs it in another
    network namespace (tests.support.testhost); `events`: the file it records to."""
    port = port or free_port(host)
    more = ["--events", str(events)] if events is not None else []
    proc = subprocess.Popen(
        [
            *(enter or []),
            *(sys.executable, "-m", "tests.support.upstream"),
            *("--host", host, "--port", str(port), "--name", name, *args, *more),
        ],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'operator'}"),
    )
    p = Process(proc, f"http://{host}:{port}/v1", events)
    try:
        wait_http(f"{p.url}/models", proc)
        yield p
    finally:
        p.stop()


if __name__ == "__main__":
    main()
