"""Token usage of answers as they pass through: what the upstream's `usage` says, read
without parsing a body twice or holding a stream.

- A non-streaming answer is scanned as it passes for a `"usage": {` key (a small
  overlap across chunks); the object is parsed from there (at most USAGE_BYTES of it)
  and the last one that holds whole numbers counts, wherever it is in the body (vLLM
  puts `prompt_logprobs` after it).
- A stream is split into SSE events as it passes (only an incomplete last event is
  held back, at most MAX_PENDING bytes of it: past that the meter stops and passes the
  bytes on as they come); each new chunk is searched, not the held bytes again. An
  event is parsed only until the first token is seen, and afterwards only if it names
  `usage`; the events after the first token are counted, for an estimate when no usage
  comes (`estimate`).
- When the client did not ask for usage (`stream_options.include_usage`), the gateway
  asks the upstream for it (`inject`) and takes the usage-only chunk (`choices: []`)
  out again, so the client gets the bytes the upstream would have sent without it.
  OpenAI (and Azure) also add `"usage":null` to every other chunk when asked; for those
  providers that member is removed from each chunk wherever it is, byte for byte.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from fabric_operator.api.v1alpha1 import Provider

USAGE_BYTES = 4096  # of a non-streaming answer's usage object, at most, parsed
MAX_PENDING = 1024 * 1024  # an SSE event held back longer than this stops the meter
PROMPT_SLACK = 4096  # tokens a prompt may count over its body's bytes (templates)
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
# `"usage": null` as a member (after a comma; a quote inside a string is escaped, so only
# a key can match), followed by the next member or the object's end.
_NULL_USAGE = re.compile(rb',[ \t]*"usage"[ \t]*:[ \t]*null(?=[ \t]*[,}])')
# SSE: an event ends with an empty line, each line ending with \r\n, \n or \r.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\r\n|\r\n\n|\n\n|\r\r")
_SEPARATOR_MAX = 4  # bytes of the longest separator
_USAGE_KEY = re.compile(rb'"usage"\s{0,16}:\s{0,16}\{')
_KEY_OVERLAP = 64  # bytes kept across chunks so that a key split between them is found


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


def clamped(used: Usage, body_bytes: int, answer_bytes: int, max_tokens: int | None) -> Usage:
    """Counts no upstream could mean: a prompt is at most its body's bytes (and a
    template's worth), a completion at most its answer's bytes or max_tokens."""
    completion_cap = max(max_tokens or 0, answer_bytes)
    return Usage(min(used.prompt, body_bytes + PROMPT_SLACK), min(used.completion, completion_cap))


def max_tokens_of(payload: dict[str, Any]) -> int | None:
    """The completion's cap the request set (max_completion_tokens or max_tokens)."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = payload.get(name)
        if type(value) is int and value >= 0:
            return value
    return None


def estimate(body_bytes: int, meter: Meter | None, max_tokens: int | None) -> Usage:
    """What an answer without usage is charged: the prompt at 4 bytes a token, the
    completion as the token-bearing events seen (a stream) or 4 bytes a token, capped
    by the request's max_tokens."""
    completion = 0
    if meter is not None:
        completion = meter.token_events if meter.stream else meter.bytes // 4
    if max_tokens is not None:
        completion = min(completion, max_tokens)
    return Usage(body_bytes // 4, completion)


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
    """The request asking for the final usage chunk, other stream options kept but
    vLLM's `continuous_usage_stats` (usage in every chunk, which only asking for usage
    turns on: the client would get what it would not have had)."""
    options = payload.get("stream_options")
    merged = {**options} if isinstance(options, dict) else {}
    merged.pop("continuous_usage_stats", None)
    merged["include_usage"] = True
    return {**payload, "stream_options": merged}


class BodyMeter:
    """A non-streaming answer, scanned as it passes for its `usage` object."""

    stream = False
    first_token: float | None = None
    token_events = 0
    overflowed = False

    def __init__(self) -> None:
        self.bytes = 0  # of the answer so far
        self._carry = b""  # the last bytes, for a key split between chunks
        self._found_until = 0  # absolute offset: keys starting before it were seen
        self._open: list[bytearray] = []  # usage objects being collected
        self._usage: Usage | None = None

    def feed(self, chunk: bytes) -> bytes:
        for part in self._open:
            part.extend(chunk[: USAGE_BYTES - len(part)])
        base = self.bytes - len(self._carry)
        data = self._carry + chunk if self._carry else chunk
        for match in _USAGE_KEY.finditer(data):
            at = base + match.start()
            if at < self._found_until:
                continue
            self._found_until = at + 1
            if match.start() > 0 and data[match.start() - 1] == ord("\\"):
                continue  # inside a string
            brace = match.end() - 1
            self._open.append(bytearray(data[brace : brace + USAGE_BYTES]))
        self.bytes += len(chunk)
        self._carry = data[-_KEY_OVERLAP:]
        while self._open and (len(self._open[0]) >= USAGE_BYTES or len(self._open) > 8):
            self._settle(self._open.pop(0))
        return chunk

    def end(self) -> bytes:
        while self._open:
            self._settle(self._open.pop(0))
        return b""

    def usage(self) -> Usage | None:
        if self._open:
            self.end()
        return self._usage

    def _settle(self, text: bytearray) -> None:
        try:
            value, _ = json.JSONDecoder().raw_decode(bytes(text).decode("utf-8", "replace"))
        except ValueError:
            return
        found = usage_of(value)
        if found is not None:
            self._usage = found


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
        self.bytes = 0  # of the answer so far
        self.token_events = 0  # events with tokens (from the first one on)
        self.scanned = 0  # bytes searched for an event's end (each byte about once)
        self.overflowed = False  # an event over MAX_PENDING: no longer read

    def usage(self) -> Usage | None:
        return None if self.overflowed else self._usage

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to pass on now. Counting only, the chunk as it came (its events are
        read on the side); stripping, every complete event (edited), while an incomplete
        last event waits for the rest of it."""
        self.bytes += len(chunk)
        if self.overflowed:
            return chunk
        held = len(self._pending)
        data = self._pending + chunk if held else chunk
        out: list[bytes] = []
        start = 0
        # Only the new bytes can end an event (a separator may begin in the held ones).
        search = max(0, held - (_SEPARATOR_MAX - 1))
        while True:
            found = _EVENT_END.search(data, max(start, search))
            if found is None:
                break
            self.scanned += found.end() - max(start, search)
            end = found.end()
            out.append(self._event(data[start:end]))
            start = end
        self.scanned += len(data) - max(start, search)
        self._pending = data[start:]
        editing = self.strip or self.strip_null
        if len(self._pending) > MAX_PENDING:
            # An event this long is no chat chunk: stop reading, pass everything on.
            self.overflowed = True
            self._usage = None
            rest, self._pending = self._pending, b""
            if editing:
                out.append(rest)
        if not editing:
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
        names_usage = b'"usage"' in event
        if self.first_token is None or names_usage:
            parsed = _data_of(event)
            if parsed is not None:
                if self.first_token is None and _has_token(parsed):
                    self.first_token = time.perf_counter()
                    self.token_events += 1
                elif self.first_token is not None and parsed.get("choices"):
                    self.token_events += 1
                usage = usage_of(parsed.get("usage"))
                if usage is not None:
                    self._usage = usage
                if self.strip and "usage" in parsed and parsed.get("choices") == []:
                    return b""
        elif event.startswith(b"data:") and not event.startswith(b"data: [DONE]"):
            self.token_events += 1
        if self.strip_null and names_usage:
            return _without_null_usage(event)
        return event


Meter = BodyMeter | StreamMeter


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
    return _NULL_USAGE.sub(b"", event)
