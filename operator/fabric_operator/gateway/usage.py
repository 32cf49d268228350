"""Token usage of answers as they pass through: what the upstream's `usage` says, read
without parsing a body twice or holding a stream.

- A non-streaming answer keeps only its last TAIL bytes while it is passed on; the
  `usage` object is looked for there at the end (every server we route puts it after
  `choices`/`data`; one that puts it earlier is counted as missing, never guessed).
- A stream is split into SSE events as it passes (only an incomplete last event is
  held back); an event is parsed only until the first token is seen, and afterwards
  only if it names `usage`.
- When the client did not ask for usage (`stream_options.include_usage`), the gateway
  asks the upstream for it (`inject`) and takes the usage-only chunk (`choices: []`)
  out again, so the client gets the bytes the upstream would have sent without it.
  OpenAI (and Azure) also add `"usage":null` to every other chunk when asked; for those
  providers that member is removed from the end of each chunk, byte for byte.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from fabric_operator.api.v1alpha1 import Provider

TAIL = 8192  # bytes of a non-streaming answer kept to find its usage
COUNTED_PATHS = frozenset({"/chat/completions", "/completions", "/embeddings"})
STREAMED_PATHS = frozenset({"/chat/completions", "/completions"})
# Remote providers documented to accept stream_options (OpenAI's API reference; Azure
# OpenAI's v1 API; Anthropic's "OpenAI SDK compatibility": "stream_options: fully
# supported"). Google's, Vertex AI's and Bedrock's compatibility layers do not document
# it (Google's sends usage in its last chunk unasked): the gateway counts what comes.
INJECT_PROVIDERS = frozenset(
    {Provider.OPENAI.value, Provider.AZURE.value, Provider.ANTHROPIC.value}
)
# Providers that add `"usage":null` to every chunk once asked for usage (OpenAI's docs).
NULL_USAGE_PROVIDERS = frozenset({Provider.OPENAI.value, Provider.AZURE.value})
_NULL_ENDINGS = (b',"usage":null}', b', "usage": null}')
_SEPARATORS = (b"\n\n", b"\r\n\r\n", b"\r\r")


@dataclass(frozen=True)
class Usage:
    prompt: int
    completion: int

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def usage_of(value: Any) -> Usage | None:
    """An OpenAI `usage` object as counts; None unless it holds whole numbers."""
    if not isinstance(value, dict):
        return None
    prompt, completion = value.get("prompt_tokens"), value.get("completion_tokens", 0)
    if completion is None:
        completion = 0
    if type(prompt) is not int or type(completion) is not int or prompt < 0 or completion < 0:
        return None
    return Usage(prompt, completion)


def wants_usage(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def injectable(remote: bool, provider: str) -> bool:
    """May the gateway add stream_options to a request to this backend? The providers
    that document it, and local engines (vLLM, SGLang, llama.cpp, Ollama... take it or
    ignore it); not an unknown remote server, nor Google's, Vertex AI's or Bedrock's."""
    if provider in INJECT_PROVIDERS:
        return True
    return provider == Provider.OPENAI_COMPATIBLE.value and not remote


ASK_USAGE = b'"stream_options":{"include_usage":true},'


def ask_usage(body: bytes) -> bytes:
    """A JSON object's bytes (one that names neither `stream_options` nor is empty) with
    the option as its first member, the rest byte for byte."""
    at = body.index(b"{") + 1
    return body[:at] + ASK_USAGE + body[at:]


def with_usage(payload: dict[str, Any]) -> dict[str, Any]:
    """The request asking for the final usage chunk, other stream options kept."""
    options = payload.get("stream_options")
    merged = {**options} if isinstance(options, dict) else {}
    merged["include_usage"] = True
    return {**payload, "stream_options": merged}


class BodyMeter:
    """A non-streaming answer: its last TAIL bytes, read for `usage` at the end."""

    stream = False
    first_token: float | None = None

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, chunk: bytes) -> bytes:
        if not self._tail and len(chunk) <= TAIL:
            self._tail = chunk
        else:
            self._tail = (self._tail + chunk)[-TAIL:]
        return chunk

    def end(self) -> bytes:
        return b""

    def usage(self) -> Usage | None:
        tail = self._tail
        at = tail.rfind(b'"usage"')
        while at >= 0:
            found = _value_after(tail, at + 7)
            if found is not None:
                return found
            at = tail.rfind(b'"usage"', 0, at)
        return None


def _value_after(text: bytes, at: int) -> Usage | None:
    """The usage object after a `"usage"` key at `at` (its colon, then the object)."""
    i = at
    while i < len(text) and text[i] in b" \t\r\n":
        i += 1
    if i >= len(text) or text[i] != ord(":"):
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(text[i + 1 :].decode("utf-8").lstrip())
    except (ValueError, UnicodeDecodeError):
        return None
    return usage_of(value)


class StreamMeter:
    """An SSE answer, event by event: the time of its first token and its usage. With
    `strip` (the gateway asked for the usage the client did not), the usage-only chunk
    is taken out, and with `strip_null` also each chunk's trailing `"usage":null`."""

    stream = True

    def __init__(self, *, strip: bool = False, strip_null: bool = False) -> None:
        self.strip, self.strip_null = strip, strip_null
        self.first_token: float | None = None  # perf_counter() when it passed
        self._usage: Usage | None = None
        self._pending = b""

    def usage(self) -> Usage | None:
        return self._usage

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to pass on now. Counting only, the chunk as it came (its events are
        read on the side); stripping, every complete event (edited), while an incomplete
        last event waits for the rest of it."""
        data = self._pending + chunk if self._pending else chunk
        out: list[bytes] = []
        start = 0
        while True:
            end = _event_end(data, start)
            if end < 0:
                break
            out.append(self._event(data[start:end]))
            start = end
        self._pending = data[start:]
        if not (self.strip or self.strip_null):
            return chunk
        return b"".join(out)

    def end(self) -> bytes:
        """What is left when the answer ends: an event without its blank line."""
        rest, self._pending = self._pending, b""
        if not rest:
            return b""
        edited = self._event(rest)
        return edited if self.strip or self.strip_null else b""

    def _event(self, event: bytes) -> bytes:
        if self.first_token is None or b'"usage"' in event:
            parsed = _data_of(event)
            if parsed is not None:
                if self.first_token is None and _has_token(parsed):
                    self.first_token = time.perf_counter()
                usage = usage_of(parsed.get("usage"))
                if usage is not None:
                    self._usage = usage
                    if self.strip and parsed.get("choices") == []:
                        return b""
        if self.strip_null:
            return _without_null_usage(event)
        return event


Meter = BodyMeter | StreamMeter


def _event_end(data: bytes, start: int) -> int:
    """Where the event starting at `start` ends (after its blank line); -1: not yet."""
    best = -1
    for sep in _SEPARATORS:
        at = data.find(sep, start)
        if at >= 0 and (best < 0 or at + len(sep) < best):
            best = at + len(sep)
    return best


def _data_of(event: bytes) -> dict[str, Any] | None:
    """The JSON of an event's data lines; None for [DONE], comments, or anything else."""
    lines = [line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    try:
        value = json.loads(b"\n".join(lines))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _has_token(chunk: dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        if choice.get("text"):  # /completions
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and (
            delta.get("content") or delta.get("tool_calls") or delta.get("reasoning_content")
        ):
            return True
    return False


def _without_null_usage(event: bytes) -> bytes:
    body = event.rstrip(b"\r\n")
    for ending in _NULL_ENDINGS:
        if body.endswith(ending):
            return body[: -len(ending)] + b"}" + event[len(body) :]
    return event
