"""Reading usage from answers as they pass (gateway/usage.py), and the limits' arithmetic
(ratelimit, sharedlimit): pure, no process."""

from __future__ import annotations

import json

import pytest

from fabric_operator.gateway import usage
from fabric_operator.gateway.ratelimit import RateLimiter
from fabric_operator.gateway.sharedlimit import tenant_prefix, where, window_wait
from tests.support.upstream import chat_answer, stream_chunks


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [1, 7, 64, 100000])
def test_a_stream_asked_for_usage_passes_as_if_it_had_not_been(size: int) -> None:
    asked = b"".join(stream_chunks("a", "m", 4, usage=True))
    plain = b"".join(stream_chunks("a", "m", 4))
    meter = usage.StreamMeter(strip=True)
    out = b"".join(meter.feed(p) for p in pieces(asked, size)) + meter.end()
    assert out == plain
    assert meter.usage() == usage.Usage(3, 4)
    assert meter.first_token is not None


@pytest.mark.parametrize("size", [3, 100000])
def test_openais_null_usage_members_are_taken_out_too(size: int) -> None:
    asked = b"".join(stream_chunks("a", "m", 2, usage=True, null_usage=True))
    assert asked.count(b'"usage": null') == 4
    meter = usage.StreamMeter(strip=True, strip_null=True)
    out = b"".join(meter.feed(p) for p in pieces(asked, size)) + meter.end()
    assert out == b"".join(stream_chunks("a", "m", 2))
    assert meter.usage() == usage.Usage(3, 2)


def test_counting_only_passes_every_chunk_as_it_came() -> None:
    asked = b"".join(stream_chunks("a", "m", 3, usage=True)).replace(b"\n\n", b"\r\n\r\n")
    meter = usage.StreamMeter()
    chunks = pieces(asked, 5)
    assert [meter.feed(c) for c in chunks] == chunks  # not held back, not joined
    assert meter.end() == b""
    assert meter.usage() == usage.Usage(3, 3)


def test_usage_in_a_chunk_with_choices_is_counted_and_kept() -> None:
    """Google's compatibility layer sends usage in its last chunk, unasked."""
    event = {"choices": [{"index": 0, "delta": {"content": "x"}}], "usage": {"prompt_tokens": 9}}
    raw = f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode()
    meter = usage.StreamMeter(strip=True)
    assert meter.feed(raw) + meter.end() == raw
    assert meter.usage() == usage.Usage(9, 0)


def test_the_first_token_is_the_first_chunk_with_content() -> None:
    meter = usage.StreamMeter()
    role, first, *_ = stream_chunks("a", "m", 2)
    meter.feed(role)
    assert meter.first_token is None  # role and "" content: no token yet
    meter.feed(first)
    assert meter.first_token is not None


def test_a_non_streaming_answer_is_read_from_its_tail() -> None:
    body = json.dumps(chat_answer("a", "m")).encode()
    meter = usage.BodyMeter()
    for p in pieces(body, 10):
        assert meter.feed(p) == p
    assert meter.usage() == usage.Usage(3, 3)
    big = {"data": [{"embedding": [0.5] * 5000}], "usage": {"prompt_tokens": 7, "total_tokens": 7}}
    meter = usage.BodyMeter()
    for p in pieces(json.dumps(big).encode(), 4096):
        meter.feed(p)
    assert meter.usage() == usage.Usage(7, 0)


def test_usage_not_in_the_tail_or_not_numbers_is_missing_not_guessed() -> None:
    early = {"usage": {"prompt_tokens": 1, "completion_tokens": 1}, "pad": "x" * 10000}
    meter = usage.BodyMeter()
    meter.feed(json.dumps(early).encode())
    assert meter.usage() is None
    meter = usage.BodyMeter()
    meter.feed(b'{"content": "\\"usage\\": 5", "usage": {"prompt_tokens": "many"}}')
    assert meter.usage() is None


def test_the_option_goes_first_and_the_rest_is_the_clients_bytes() -> None:
    body = b' {"model": "m",\n "stream": true, "x": "\\u00e9"}'
    asked = usage.ask_usage(body)
    assert asked == b" {" + usage.ASK_USAGE + body[2:]
    assert json.loads(asked)["stream_options"] == {"include_usage": True}
    merged = usage.with_usage({"stream_options": {"include_usage": False, "other": 1}})
    assert merged["stream_options"] == {"include_usage": True, "other": 1}


@pytest.mark.parametrize(
    ("remote", "provider", "asked"),
    [
        (False, "openai-compatible", True),
        (True, "openai", True),
        (True, "azure", True),
        (True, "anthropic", True),
        (True, "google", False),
        (True, "vertex", False),
        (True, "bedrock", False),
        (True, "openai-compatible", False),
    ],
)
def test_which_upstreams_are_asked_for_usage(remote: bool, provider: str, asked: bool) -> None:
    assert usage.injectable(remote, provider) is asked


def test_the_tokens_bucket_is_charged_after_and_checked_before() -> None:
    now = [0.0]
    limiter = RateLimiter(clock=lambda: now[0])
    assert limiter.waiting("t", 100) == 0
    limiter.spend("t", 100, 250)  # one answer over the minute's allowance: debt, capped
    assert limiter.waiting("t", 100) == pytest.approx(60.6)  # from -100 to 1 at 100/min
    now[0] = 61.0
    assert limiter.waiting("t", 100) == 0


def test_sliding_window_retry_after() -> None:
    # Room this minute once the last minute's weight falls: 10 last minute, 5 now, limit 10.
    assert window_wait(5, 10, 0.0, 10) == pytest.approx(36.0)
    # This minute is full: after it, and then as much as the full minute takes to fade.
    assert window_wait(10, 0, 15.0, 10) == pytest.approx(45.0 + 6.0)
    assert window_wait(0, 0, 30.0, 10) == 0


def test_redis_names_hold_no_key_and_logs_no_password() -> None:
    prefix = tenant_prefix("uid-1234")
    assert "uid-1234" not in prefix and prefix.startswith("fabric:limits:{")
    assert where("redis://:s3cret@redis.example:6380/0") == "redis.example:6380"
    assert "s3cret" not in where("rediss://user:s3cret@h/1")
