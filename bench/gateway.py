"""Gateway overhead: the same requests straight to a fast upstream and through the gateway.

    PYTHONPATH=operator:. .venv/bin/python -m bench.gateway            # ~1 min
    PYTHONPATH=operator:. .venv/bin/python -m bench.gateway --seconds 0.3 --concurrency 1,4

The upstream (tests/support/upstream.py) and the gateway run as their own processes, the
gateway in its default configuration (access log on, one key, one route). The load comes
from this process: raw HTTP/1.1 keep-alive connections on asyncio, one per simulated
client, so the client costs as little as we can make it; it shares the machine's cores
with both servers. Clients either send back to back (closed loop: the figures then include
queueing once a server saturates) or paced at a fixed total rate. Prints a table and
writes JSON.

With `--redis` (the default when redis-server is installed) each row is also measured
through a second gateway whose key has rpm and tpm limits (too high to refuse anything)
shared through a redis-server of the run's own: a Redis round trip before each request
and a token charge after it. Usage counting is always on in both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.gateway import gateway
from tests.support.redisserver import RedisServer
from tests.support.upstream import REPO, upstream

from fabric_operator.localcluster import free_port

KEY = "sk-bench-0001"
PATH = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
TARGETS = {"added_p50_ms@10": 1.0, "added_p99_ms@10": 5.0, "rps@100": 1500.0}


@dataclass(frozen=True)
class Load:
    clients: int
    stream: bool
    rate: float = 0.0  # total requests/s when paced; 0: back to back


@dataclass
class Run:
    latencies: list[float]
    seconds: float
    cpu: float  # CPU seconds of the measured server process during the run
    errors: int

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def request_bytes(host: str, stream: bool, key: str | None) -> bytes:
    body = json.dumps({**BODY, "stream": stream}).encode()
    auth = f"authorization: Bearer {key}\r\n" if key else ""
    head = (
        f"POST {PATH} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"{auth}content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = head.lower()
    if b"transfer-encoding: chunked" in headers:
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                return status
    length = int(headers.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    await reader.readexactly(length)
    return status


@dataclass
class Sink:
    latencies: list[float]
    errors: list[int]


async def client(url: str, request: bytes, until: float, interval: float, sink: Sink) -> None:
    """Requests back to back, or one every `interval` seconds."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    slot = time.perf_counter() + interval * random.random()
    try:
        while time.perf_counter() < until:
            if interval:
                await asyncio.sleep(max(0.0, slot - time.perf_counter()))
                slot += interval
            start = time.perf_counter()
            writer.write(request)
            status = await read_response(reader)
            if status == 200:
                sink.latencies.append(time.perf_counter() - start)
            else:
                sink.errors.append(status)
    finally:
        writer.close()


async def load(url: str, spec: Load, seconds: float, key: str | None) -> Sink:
    host = url.split("//", 1)[1].split("/", 1)[0]
    request = request_bytes(host, spec.stream, key)
    sink = Sink([], [])
    until = time.perf_counter() + seconds
    interval = spec.clients / spec.rate if spec.rate else 0.0
    await asyncio.gather(
        *(client(url, request, until, interval, sink) for _ in range(spec.clients))
    )
    return sink


def measure(url: str, spec: Load, seconds: float, key: str | None, pid: int) -> Run:
    asyncio.run(load(url, spec, min(seconds, 0.2), key))  # warm up connections and caches
    cpu0, start = cpu_seconds(pid), time.perf_counter()
    sink = asyncio.run(load(url, spec, seconds, key))
    elapsed = time.perf_counter() - start
    return Run(sink.latencies, elapsed, cpu_seconds(pid) - cpu0, len(sink.errors))


def row(spec: Load, direct: Run, via: Run, limited: Run | None = None) -> dict[str, Any]:
    more: dict[str, Any] = {}
    if limited is not None:
        more = {
            "limited_p50_ms": limited.pct(0.5),
            "limited_p99_ms": limited.pct(0.99),
            "limited_added_p50_ms": limited.pct(0.5) - direct.pct(0.5),
            "limited_added_p99_ms": limited.pct(0.99) - direct.pct(0.99),
            "limited_rps": limited.rps,
            "limited_rps_per_core": (
                limited.rps / (limited.cpu / limited.seconds) if limited.cpu else None
            ),
        }
    return {
        "stream": spec.stream,
        "clients": spec.clients,
        "paced_rps": spec.rate or None,
        "direct_p50_ms": direct.pct(0.5),
        "direct_p99_ms": direct.pct(0.99),
        "gateway_p50_ms": via.pct(0.5),
        "gateway_p99_ms": via.pct(0.99),
        "added_p50_ms": via.pct(0.5) - direct.pct(0.5),
        "added_p99_ms": via.pct(0.99) - direct.pct(0.99),
        "direct_rps": direct.rps,
        "gateway_rps": via.rps,
        "gateway_cores": via.cpu / via.seconds,
        "gateway_rps_per_core": via.rps / (via.cpu / via.seconds) if via.cpu else None,
        "requests": len(via.latencies),
        "errors": direct.errors + via.errors + (limited.errors if limited else 0),
        **more,
    }


def print_row(r: dict[str, Any]) -> None:
    clients = f"{r['clients']}@{r['paced_rps']:g}/s" if r["paced_rps"] else str(r["clients"])
    per_core = r["gateway_rps_per_core"] or float("nan")
    print(
        f"{'stream' if r['stream'] else 'plain':<7}{clients:>11}"
        f"{r['direct_p50_ms']:>9.2f}/{r['direct_p99_ms']:<8.2f}"
        f"{r['gateway_p50_ms']:>9.2f}/{r['gateway_p99_ms']:<8.2f}"
        f"{r['added_p50_ms']:>8.2f}/{r['added_p99_ms']:<8.2f}"
        f"{r['gateway_rps']:>10.0f}{per_core:>12.0f}"
        + (
            f"{r['limited_added_p50_ms']:>9.2f}/{r['limited_added_p99_ms']:<8.2f}"
            f"{r['limited_rps']:>9.0f}{r['limited_rps_per_core'] or float('nan'):>10.0f}"
            if "limited_rps" in r
            else ""
        )
    )


def summary(rows: list[dict[str, Any]], paced: float) -> None:
    by = {(r["stream"], r["clients"], r["paced_rps"]): r for r in rows}
    for key, label in (((False, 10, None), "back to back"), ((False, 10, paced or None), "paced")):
        if key in by:
            r = by[key]
            print(
                f"10 clients {label}: added p50 {r['added_p50_ms']:.2f} ms (target <= 1), "
                f"p99 {r['added_p99_ms']:.2f} ms (target <= 5)"
            )
    if (False, 100, None) in by:
        r = by[False, 100, None]
        print(
            f"100 clients: {r['gateway_rps']:.0f} req/s through one gateway (target >= 1500), "
            f"{r['gateway_rps_per_core'] or 0:.0f} per core it used"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--concurrency", default="1,10,100")
    parser.add_argument(
        "--paced", type=float, default=500.0, help="also 10 clients at this total req/s (0: no)"
    )
    parser.add_argument("--json", default=str(REPO / "bench" / "gateway-results.json"))
    parser.add_argument("--gateway-args", default="", help="extra flags for the gateway")
    parser.add_argument(
        "--redis",
        action=argparse.BooleanOptionalAction,
        default=shutil.which("redis-server") is not None,
        help="also through a gateway with limits shared in Redis (default: if installed)",
    )
    args = parser.parse_args(argv)
    plan = [Load(int(c), s) for s in (False, True) for c in args.concurrency.split(",")]
    if args.paced:
        plan += [Load(10, s, args.paced) for s in (False, True)]
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        up = stack.enter_context(upstream("bench"))
        cfg = {
            "backends": [{"id": "bench/m", "model": "m", "baseURLs": [up.url]}],
            "tenants": [{"name": "bench", "keyEnv": "BENCH_KEY", "models": ["*"]}],
        }
        flags = args.gateway_args.split()
        (tmp / "plain").mkdir()
        gw = stack.enter_context(
            gateway(*flags, config=cfg, env={"BENCH_KEY": KEY}, workdir=tmp / "plain")
        )
        limited_gw = None
        if args.redis:
            (tmp / "redis").mkdir()
            (tmp / "limited").mkdir()
            redis = RedisServer(free_port(), "bench-redis-pass", tmp / "redis")
            redis.start()
            stack.callback(redis.stop)
            limited_cfg = {
                **cfg,
                "tenants": [{**cfg["tenants"][0], "rpm": 10**9, "tpm": 10**12}],  # type: ignore[dict-item]
            }
            env = {"BENCH_KEY": KEY, "FABRIC_REDIS_PASSWORD": redis.password}
            limited_gw = stack.enter_context(
                gateway(
                    *flags,
                    f"--redis-url={redis.url}",
                    config=limited_cfg,
                    env=env,
                    workdir=tmp / "limited",
                )
            )
            _wait_shared(limited_gw.metrics_url)  # type: ignore[attr-defined]
        print(
            f"{'mode':<7}{'clients':>11}{'direct p50/p99 ms':>18}{'gateway p50/p99':>17}"
            f"{'added p50/p99':>16}{'req/s':>10}{'per core':>12}"
            + (f"{'redis added':>18}{'req/s':>9}{'per core':>10}" if limited_gw else "")
        )
        for spec in plan:
            direct = measure(up.url, spec, args.seconds, None, up.proc.pid)
            via = measure(gw.url, spec, args.seconds, KEY, gw.proc.pid)
            limited = None
            if limited_gw is not None:
                limited = measure(limited_gw.url, spec, args.seconds, KEY, limited_gw.proc.pid)
            rows.append(row(spec, direct, via, limited))
            print_row(rows[-1])
    print()
    summary(rows, args.paced)
    results = {"machine": {"cpus": os.cpu_count()}, "targets": TARGETS, "runs": rows}
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    errors = sum(r["errors"] for r in rows)
    print(f"errors: {errors}; JSON: {args.json}")
    return 1 if errors else 0


def _wait_shared(metrics_url: str, timeout: float = 10.0) -> None:
    """Until the gateway says its limits are shared (it connects in the background)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(metrics_url, timeout=2) as resp:
            if b"fabric_gateway_limiter_shared 1.0" in resp.read():
                return
        time.sleep(0.05)
    raise TimeoutError("the limited gateway never reached Redis")


if __name__ == "__main__":
    raise SystemExit(main())
