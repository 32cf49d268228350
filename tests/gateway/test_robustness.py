"""The gateway under misbehaving clients and upstreams, all real processes on 127.0.0.1:
clients that leave mid-answer, upstreams that break off, hang, or answer garbage, bodies
too large, and floods of names meant to blow up the metrics. What the upstream saw comes
from its event file (tests.support.upstream `--events`), not from sleeping."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway import gateway
from tests.support.upstream import Process, read_events, upstream, wait_event

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
KEY = "sk-robust-2b7e"
LIMITED_KEY = "sk-limited-90aa"
PROMPT = "the-secret-prompt-4f1d"


def error_of(resp: httpx.Response) -> dict[str, Any]:
    assert resp.headers["content-type"] == "application/json"
    error: dict[str, Any] = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def samples(gw: Process) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of the gateway's own metrics: (name, labels, value)."""
    with urllib.request.urlopen(gw.metrics_url) as r:  # type: ignore[attr-defined]
        text = r.read().decode()
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        if family.name.startswith("fabric_gateway_")
        for s in family.samples
    ]


def metric(gw: Process, name: str, **labels: str) -> float:
    """The sum of a metric's samples that carry these labels (0 if none)."""
    return sum(
        value
        for n, have, value in samples(gw)
        if n == name and all(have.get(k) == v for k, v in labels.items())
    )


def chat(gw: Process, model: str, *, key: str | None = KEY, timeout: float = 10) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}]}
    return httpx.post(gw.url + "/v1/chat/completions", json=body, headers=headers, timeout=timeout)


def keyed(*backends: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "backends": list(backends),
        "tenants": [
            {"name": "robust", "keyEnv": "KEY", "models": ["*"]},
            {"name": "limited", "keyEnv": "LIMITED", "models": ["*"], "rpm": 1},
        ],
        **extra,
    }


ENV = {"KEY": KEY, "LIMITED": LIMITED_KEY}


# ---- a client that leaves cancels the upstream request -----------------------------------


def test_a_client_leaving_mid_stream_cancels_the_upstream_request(tmp_path: Path) -> None:
    events = tmp_path / "upstream.jsonl"
    with upstream("long", "--pieces", "1000", "--gap", "0.01", events=events) as up:
        cfg = keyed({"id": "ns/long", "model": "m", "baseURLs": [up.url]})
        with gateway(config=cfg, env=ENV, workdir=tmp_path) as gw:
            body = {"model": "m", "stream": True, **CHAT}
            headers = {"authorization": f"Bearer {KEY}"}
            url = gw.url + "/v1/chat/completions"
            with httpx.stream("POST", url, json=body, headers=headers, timeout=10) as r:
                received = b""
                for chunk in r.iter_raw():
                    received += chunk
                    if received.count(b"long-") >= 20:
                        break
                left = time.time()
            # Leaving the block closed the connection mid-answer.
            [gone] = wait_event(events, "disconnected", timeout=5)
            assert gone - left < 1.0, f"the upstream saw it {gone - left:.2f}s later"
            seen = [e for e in read_events(events) if e["event"] == "disconnected"]
            assert 20 <= seen[0]["chunks"] < 1000
            assert metric(gw, "fabric_gateway_client_disconnects_total", backend="ns/long") == 1
            log = (tmp_path / "gateway.log").read_text()
    assert not [e for e in read_events(events) if e["event"] == "completed"]
    assert '"aborted": "client_disconnected"' in log
    print(f"upstream saw the disconnect {gone - left:.3f}s after the client left")


def test_a_client_giving_up_before_the_first_byte_cancels_the_upstream(tmp_path: Path) -> None:
    events = tmp_path / "upstream.jsonl"
    with upstream("slow", "--delay", "30", events=events) as up:
        cfg = keyed({"id": "ns/slow", "model": "m", "baseURLs": [up.url]})
        with gateway(config=cfg, env=ENV, workdir=tmp_path) as gw:
            with pytest.raises(httpx.ReadTimeout):
                chat(gw, "m", timeout=0.5)
            left = time.time()
            [gone] = wait_event(events, "disconnected", timeout=5)
            assert gone - left < 1.0
            assert metric(gw, "fabric_gateway_client_disconnects_total", backend="ns/slow") == 1
            log = (tmp_path / "gateway.log").read_text()
    assert '"status": 499' in log


# ---- an answer that breaks off is cut off for the client too ------------------------------


def test_an_upstream_breaking_mid_stream_is_no_clean_end_for_the_client(tmp_path: Path) -> None:
    events = tmp_path / "upstream.jsonl"
    with upstream("brittle", "--break-after", "3", events=events) as up:
        cfg = keyed({"id": "ns/brittle", "model": "m", "baseURLs": [up.url]})
        with gateway(config=cfg, env=ENV, workdir=tmp_path) as gw:
            body = {"model": "m", "stream": True, **CHAT}
            headers = {"authorization": f"Bearer {KEY}"}
            got = b""
            url = gw.url + "/v1/chat/completions"
            with httpx.stream("POST", url, json=body, headers=headers, timeout=10) as r:
                assert r.status_code == 200
                with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
                    for chunk in r.iter_raw():
                        got += chunk
            assert got.count(b"data:") == 3 and b"[DONE]" not in got
            assert metric(gw, "fabric_gateway_upstream_errors_total", reason="broken") == 1
            # Not a crash: the next request is answered (the upstream breaks that too).
            assert chat(gw, "m").status_code == 200
            log = (tmp_path / "gateway.log").read_text()
    assert "Exception in ASGI application" not in log  # the gateway logged it its own way
    assert "upstream ns/brittle broke off its answer" in log


def test_an_upstream_silent_past_the_idle_timeout_is_cut_off(tmp_path: Path) -> None:
    events = tmp_path / "upstream.jsonl"
    with upstream("sleepy", "--pieces", "3", "--gap", "5", events=events) as up:
        cfg = keyed({"id": "ns/sleepy", "model": "m", "baseURLs": [up.url]})
        with gateway("--idle-timeout=0.5", config=cfg, env=ENV, workdir=tmp_path) as gw:
            body = {"model": "m", "stream": True, **CHAT}
            headers = {"authorization": f"Bearer {KEY}"}
            start = time.monotonic()
            url = gw.url + "/v1/chat/completions"
            with (
                httpx.stream("POST", url, json=body, headers=headers, timeout=10) as r,
                pytest.raises(httpx.RemoteProtocolError),
            ):
                for _ in r.iter_raw():
                    pass
            took = time.monotonic() - start
            assert 0.4 < took < 3, took
            wait_event(events, "disconnected")  # and the upstream request is cancelled
            assert metric(gw, "fabric_gateway_upstream_errors_total", reason="idle_timeout") == 1


# ---- a hung backend stalls nothing else --------------------------------------------------


@pytest.fixture
def hung(tmp_path: Path) -> Iterator[tuple[Process, Process, Path]]:
    """An upstream that accepts and never answers, behind two backends (one falls back to
    a healthy one, one has nothing to fall back to), and a healthy backend of its own."""
    events = tmp_path / "hung.jsonl"
    with upstream("hung", "--raw", "hang", events=events) as hang, upstream("ok") as ok:
        cfg = keyed(
            {"id": "ns/hung", "model": "hung", "baseURLs": [hang.url], "fallback": ["ns/spare"]},
            {"id": "ns/alone", "model": "alone", "baseURLs": [hang.url]},
            {"id": "ns/spare", "model": "spare", "baseURLs": [ok.url]},
            {"id": "ns/fast", "model": "fast", "baseURLs": [ok.url]},
        )
        flags = [
            "--max-connections-per-upstream=2",
            "--fallback-timeout=1",
            "--first-byte-timeout=2.5",
            "--pool-timeout=0.3",
        ]
        with gateway(*flags, config=cfg, env=ENV, workdir=tmp_path) as gw:
            yield gw, hang, events


def timed(gw: Process, model: str) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    resp = chat(gw, model)
    return resp, time.monotonic() - start


def test_a_hung_backend_holds_its_own_connections_and_nothing_else(
    hung: tuple[Process, Process, Path],
) -> None:
    gw, _, events = hung
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        stuck = [pool.submit(timed, gw, "hung") for _ in range(5)]
        wait_event(events, "request", count=2)  # both its connections are taken now
        fast = [timed(gw, "fast") for _ in range(10)]
        assert sum(not f.done() for f in stuck) >= 2  # answered while those still wait
        answers = [f.result() for f in stuck]
    assert [r.status_code for r, _ in fast] == [200] * 10
    slowest = max(t for _, t in fast)
    assert slowest < 0.5, f"a request for another backend took {slowest:.2f}s"
    # Two held a connection until the fallback timeout, three found none free within
    # the pool timeout: all five answered by the fallback, none waited longer.
    assert [r.headers["x-fabric-backend"] for r, _ in answers] == ["ns/spare"] * 5
    took = sorted(t for _, t in answers)
    assert all(0.25 < t < 0.9 for t in took[:3]), took
    assert all(0.95 < t < 2.4 for t in took[3:]), took
    assert metric(gw, "fabric_gateway_upstream_errors_total", backend="ns/hung") == 5
    assert metric(gw, "fabric_gateway_upstream_errors_total", reason="timeout") == 2
    assert metric(gw, "fabric_gateway_upstream_errors_total", reason="saturated") == 3
    # The gateway closed both connections it gave up on.
    wait_event(events, "closed", count=2)
    print(f"other backend: slowest {slowest * 1000:.0f} ms; hung: {[round(t, 2) for t in took]}")


def test_a_hung_backend_without_fallback_answers_504_and_503_in_bounded_time(
    hung: tuple[Process, Process, Path],
) -> None:
    gw, _, events = hung
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        answers = sorted(pool.map(lambda _: timed(gw, "alone"), range(3)), key=lambda a: a[1])
    (saturated, t0), *timeouts = answers
    assert saturated.status_code == 503 and 0.25 < t0 < 0.9, t0
    assert error_of(saturated)["code"] == "upstream_saturated"
    assert saturated.headers["retry-after"] == "1"
    for resp, took in timeouts:  # the last backend to try: --first-byte-timeout
        assert resp.status_code == 504 and 2.4 < took < 4, took
        assert error_of(resp)["code"] == "upstream_timeout"
    wait_event(events, "closed", count=2)


# ---- bodies: too large, or not read at all -----------------------------------------------


def raw_exchange(gw: Process, head: str, body: bytes = b"", timeout: float = 2.0) -> bytes:
    """Send a request head (and maybe part of a body), then read until the gateway closes
    the connection; fails if it does not within `timeout`."""
    host, port = gw.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head.encode() + b"\r\n" + body)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def head(length: str, key: str | None = KEY) -> str:
    auth = f"authorization: Bearer {key}\r\n" if key else ""
    return (
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
        f"{auth}{length}\r\n"
    )


def parse(answer: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    top, _, body = answer.partition(b"\r\n\r\n")
    lines = top.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(body)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    """A gateway taking bodies up to 1 MiB."""
    workdir = tmp_path_factory.mktemp("small")
    with upstream("ok") as ok:
        cfg = keyed({"id": "ns/m", "model": "m", "baseURLs": [ok.url]})
        with gateway("--max-body-mib=1", config=cfg, env=ENV, workdir=workdir) as gw:
            yield gw


def test_a_content_length_over_the_limit_is_413_without_reading_it(small: Process) -> None:
    start = time.monotonic()
    answer = raw_exchange(small, head("content-length: 1000000000000"))  # no body sent
    status, headers, body = parse(answer)
    assert (status, body["error"]["code"]) == (413, "body_too_large")
    assert headers["connection"] == "close"  # and closed: the body is never read
    assert time.monotonic() - start < 1
    # Under the limit is fine (a 900 KiB message).
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * 900_000}]}
    ok = httpx.post(
        small.url + "/v1/chat/completions", json=big, headers={"authorization": f"Bearer {KEY}"}
    )
    assert ok.status_code == 200


def test_a_chunked_body_growing_over_the_limit_is_413_with_the_rest_unread(
    small: Process,
) -> None:
    chunk = b"x" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(24))  # 1.5 MiB
    answer = raw_exchange(small, head("transfer-encoding: chunked"), body)  # no end chunk
    status, headers, error = parse(answer)
    assert (status, error["error"]["code"], headers["connection"]) == (
        413,
        "body_too_large",
        "close",
    )


@pytest.mark.parametrize(
    ("key", "status", "code"),
    [(None, 401, "missing_api_key"), ("sk-guess", 401, "invalid_api_key")],
)
def test_an_unknown_caller_with_a_huge_body_is_refused_at_once(
    small: Process, key: str | None, status: int, code: str
) -> None:
    start = time.monotonic()
    answer = raw_exchange(small, head("content-length: 1000000000000", key), b"{" * 65536)
    got, headers, error = parse(answer)
    assert (got, error["error"]["code"], headers["connection"]) == (status, code, "close")
    assert time.monotonic() - start < 1


def test_a_real_client_uploading_a_huge_body_without_a_key_gets_its_401(small: Process) -> None:
    """httpx writes the whole body before it reads: the gateway answers at once, then
    lingers (reads and drops, for a second at most) before it closes, so the client's
    write fails only after the answer is surely in, and it reads the 401, not a reset."""
    sent = [0]

    def endless() -> Iterator[bytes]:
        block = b"x" * 65536
        while sent[0] < 64 << 30:  # 64 GiB: far more than it could send in the time
            sent[0] += len(block)
            yield block

    start = time.monotonic()
    resp = httpx.post(small.url + "/v1/chat/completions", content=endless(), timeout=10)
    took = time.monotonic() - start
    assert resp.status_code == 401 and error_of(resp)["code"] == "missing_api_key"
    assert took < 1 + 2 and sent[0] < 16 << 30, (took, sent[0])  # a second's linger
    print(f"401 read after {took * 1000:.0f} ms, {sent[0] >> 20} MiB sent meanwhile")


def test_over_the_rate_limit_is_429_before_the_body(small: Process) -> None:
    assert chat(small, "m", key=LIMITED_KEY).status_code == 200  # its one a minute
    answer = raw_exchange(small, head("content-length: 500000", LIMITED_KEY), b"{")
    status, headers, error = parse(answer)
    assert (status, error["error"]["code"], headers["connection"]) == (
        429,
        "rate_limit_exceeded",
        "close",
    )
    assert int(headers["retry-after"]) >= 1


# ---- an upstream answering garbage -------------------------------------------------------


def test_garbage_from_an_upstream_is_an_openai_shaped_502_counted_and_logged(
    tmp_path: Path,
) -> None:
    modes = ["garbage", "bad-status", "bad-header"]
    with (
        upstream("garbage", "--raw", "garbage") as g,
        upstream("bad-status", "--raw", "bad-status") as s,
        upstream("bad-header", "--raw", "bad-header") as h,
        upstream("ok") as ok,
    ):
        urls = dict(zip(modes, [g.url, s.url, h.url], strict=True))
        cfg = keyed(
            *({"id": f"ns/{m}", "model": m, "baseURLs": [urls[m]]} for m in modes),
            {"id": "ns/saved", "model": "saved", "baseURLs": [g.url], "fallback": ["ns/ok"]},
            {"id": "ns/ok", "model": "ok", "baseURLs": [ok.url]},
        )
        with gateway(config=cfg, env=ENV, workdir=tmp_path) as gw:
            for mode in modes:
                resp = chat(gw, mode)
                error = error_of(resp)
                assert resp.status_code == 502, (mode, resp.text)
                assert (error["type"], error["code"]) == ("upstream_error", "upstream_bad_response")
                assert f"ns/{mode}" in error["message"]
                n = metric(gw, "fabric_gateway_upstream_errors_total", backend=f"ns/{mode}")
                assert n == 1
            # With somewhere to fall back to, garbage is passed over like a 5xx.
            saved = chat(gw, "saved")
            assert saved.status_code == 200 and saved.headers["x-fabric-backend"] == "ns/ok"
            assert metric(gw, "fabric_gateway_requests_total", code="502") == 3
    log = (tmp_path / "gateway.log").read_text()
    assert KEY not in log and PROMPT not in log
    assert "HELLO" not in log  # what the upstream sent is not echoed either


# ---- metrics: no client makes series -----------------------------------------------------


def test_a_flood_of_made_up_names_leaves_the_metric_series_bounded(tmp_path: Path) -> None:
    with upstream("ok") as ok:
        cfg = keyed(
            {"id": "ns/qwen", "model": "qwen", "baseURLs": [ok.url]},
            tenants=[
                {"name": "robust", "keyEnv": "KEY", "models": ["*"]},
                {"name": "qwen-only", "keyEnv": "LIMITED", "models": ["qwen"]},
            ],
        )
        with gateway("--no-access-log", config=cfg, env=ENV, workdir=tmp_path) as gw:
            assert chat(gw, "qwen").status_code == 200

            def flood(n: int) -> None:
                for _ in range(n):
                    made_up = f"rnd-{uuid.uuid4().hex}"
                    assert chat(gw, made_up).status_code == 404
                    assert chat(gw, made_up, key=f"sk-{made_up}").status_code == 401
                    httpx.post(f"{gw.url}/v1/{made_up}", json={"model": made_up})
                    body = {"model": {"nested": made_up}}
                    httpx.post(
                        f"{gw.url}/v1/chat/completions",
                        json=body,
                        headers={"authorization": f"Bearer {KEY}"},
                    )

            flood(5)
            before = samples(gw)
            flood(100)
            after = samples(gw)
    series = {(n, tuple(sorted(labels.items()))) for n, labels, _ in after}
    assert series == {(n, tuple(sorted(labels.items()))) for n, labels, _ in before}
    values = {v for _, labels, _ in after for v in labels.values()}
    assert not [v for v in values if "rnd-" in v]
    models = {labels["model"] for n, labels, _ in after if "model" in labels}
    assert models == {"qwen", "unknown", "-"}
    print(f"{len(series)} series after 420 requests with made-up names")
