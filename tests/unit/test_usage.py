"""Reading usage from answers as they pass (gateway/usage.py), and the limits' arithmetic
(ratelimit, sharedlimit): pure, no process."""

from __future__ import annotations

import asyncio
import json

import pytest

from fabric_operator.gateway import usage
from fabric_operator.gateway.limits import Limits
from fabric_operator.gateway.ratelimit import RateLimiter
from fabric_operator.gateway.routes import Tenant
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


def test_usage_before_a_long_tail_is_found_and_strings_or_non_numbers_are_not() -> None:
    """vLLM puts prompt_logprobs / prompt_token_ids after usage: far past any tail."""
    early = {
        "usage": {"prompt_tokens": 1, "completion_tokens": 2},
        "prompt_logprobs": ["x" * 50] * 2000,
    }
    for size in (1, 5, 4096, 10**6):
        meter = usage.BodyMeter()
        for p in pieces(json.dumps(early).encode(), size):
            meter.feed(p)
        assert meter.usage() == usage.Usage(1, 2), size
    meter = usage.BodyMeter()
    meter.feed(
        b'{"content": "\\"usage\\": {\\"prompt_tokens\\": 5}", "usage": {"prompt_tokens": "many"}}'
    )
    assert meter.usage() is None
    # the last usage that holds numbers counts
    meter = usage.BodyMeter()
    meter.feed(b'{"usage": {"prompt_tokens": 4}, "x": {"usage" :\n {"prompt_tokens": null}}}')
    assert meter.usage() == usage.Usage(4, 0)


def test_a_big_event_is_scanned_once_and_an_endless_one_stops_the_meter() -> None:
    big = b"data: " + b"x" * 10_000_000 + b"\n\n"
    meter = usage.StreamMeter(strip=True, strip_null=True)
    out = b"".join(meter.feed(p) for p in pieces(big, 4096)) + meter.end()
    assert out == big  # passed on unchanged
    assert meter.scanned < 2 * len(big)  # not quadratic: each byte about once
    assert meter.overflowed and meter.usage() is None
    # under the cap, the held bytes are not searched again either
    small = b"data: " + b"x" * 500_000 + b"\n\n"
    meter = usage.StreamMeter()
    assert b"".join(meter.feed(p) for p in pieces(small, 4096)) == small
    assert meter.scanned < 2 * len(small) and not meter.overflowed


@pytest.mark.parametrize("sep", [b"\n\n", b"\r\n\r\n", b"\r\r", b"\n\r\n", b"\r\n\n"])
def test_every_sse_event_separator_ends_an_event(sep: bytes) -> None:
    asked = b"".join(stream_chunks("a", "m", 2, usage=True)).replace(b"\n\n", sep)
    meter = usage.StreamMeter(strip=True)
    out = b"".join(meter.feed(p) for p in pieces(asked, 3)) + meter.end()
    assert meter.usage() == usage.Usage(3, 2)
    assert b'"choices": []' not in out


def test_null_usage_is_taken_out_wherever_it_is_a_member() -> None:
    event = (
        b'data: {"id": "x", "usage": null, "choices": [{"delta": '
        b'{"content": "\\", \\"usage\\": null"}}], "obfuscation": "ab"}\n\n'
    )
    meter = usage.StreamMeter(strip=True, strip_null=True)
    out = meter.feed(event)
    assert out == event.replace(b', "usage": null', b"", 1)
    assert json.loads(out[6:])["choices"] == json.loads(event[6:])["choices"]  # a string's
    compact = b'data: {"id":"x","choices":[],"usage":null,"obfuscation":"ab"}\n\n'
    assert usage.StreamMeter(strip_null=True).feed(compact) == compact.replace(
        b',"usage":null', b""
    )


def test_a_usage_only_chunk_is_stripped_even_with_counts_that_are_no_numbers() -> None:
    event = b'data: {"choices": [], "usage": {"prompt_tokens": "x"}}\n\ndata: [DONE]\n\n'
    meter = usage.StreamMeter(strip=True)
    assert meter.feed(event) == b"data: [DONE]\n\n"
    assert meter.usage() is None


def test_asking_for_usage_drops_continuous_usage_stats() -> None:
    sent = usage.with_usage({"stream_options": {"continuous_usage_stats": True}})
    assert sent["stream_options"] == {"include_usage": True}


def test_estimates_and_clamps() -> None:
    meter = usage.StreamMeter()
    for chunk in stream_chunks("a", "m", 7):
        meter.feed(chunk)
    assert meter.token_events == 8  # the 7 tokens' events and the one that ends it
    assert usage.estimate(400, meter, None) == usage.Usage(100, 8)
    assert usage.estimate(400, meter, 5) == usage.Usage(100, 5)
    body = usage.BodyMeter()
    body.feed(b"x" * 80)
    assert usage.estimate(0, body, None) == usage.Usage(0, 20)
    assert usage.max_tokens_of({"max_tokens": 9, "max_completion_tokens": 3}) == 3
    assert usage.max_tokens_of({"max_tokens": True}) is None
    huge = usage.Usage(2**70, 2**70)
    assert usage.clamped(huge, 100, 1000, None) == usage.Usage(100 + 4096, 1000)
    assert usage.clamped(huge, 100, 1000, 5000) == usage.Usage(100 + 4096, 5000)
    assert usage.clamped(usage.Usage(3, 4), 100, 1000, 1) == usage.Usage(3, 4)


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


def test_a_request_must_fit_its_estimate_into_the_tokens_per_minute() -> None:
    async def go() -> list[bool]:
        limits = Limits(clock=lambda: 0.0)
        tenant = Tenant(name="t", models=("*",), tpm=100)
        limits.charge(tenant, 50)
        return [await limits.admit(tenant, need) is None for need in (40, 60, 10**9)]

    # 10**9 is capped at the tpm: it would fit an unused minute, not this one
    assert asyncio.run(go()) == [True, False, False]
    limiter = RateLimiter(clock=lambda: 0.0)
    assert limiter.waiting("t", 60, need=61) == pytest.approx(1.0)  # one more at 60/min


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
