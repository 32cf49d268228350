"""Requests at the engines themselves: their own queue gauges, read by the gateway.

The gateway counts what passes through it; requests that go straight to a backend's
Service (a batch job in the team's namespace, say) are invisible to that count, and the
autoscaler would scale such a backend down under load. Engines that export a queue gauge
say what they are serving and what waits; the gateway reads it from every ready pod of an
autoscaled backend and reports the sum beside its own counts (`/load`: `engine`). The
autoscaler takes the larger of the two (requests through the gateway are also at the
engine), so neither is counted twice.

Checked against: vLLM v0.11 (`vllm:num_requests_running`, `vllm:num_requests_waiting`),
TGI 3.3 (`tgi_queue_size`, `tgi_batch_current_size`), llama.cpp's server with --metrics
(`llamacpp:requests_processing`, `llamacpp:requests_deferred`). Ollama and
llama-cpp-python export none: the gateway's count is all there is for them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:  # routes imports QUEUE_GAUGES from here
    from fabric_operator.gateway.load import Load
    from fabric_operator.gateway.routes import Backend, Snapshot

log = logging.getLogger(__name__)

QUEUE_GAUGES: dict[str, tuple[str, ...]] = {
    "vllm": ("vllm:num_requests_running", "vllm:num_requests_waiting"),
    "tgi": ("tgi_queue_size", "tgi_batch_current_size"),
    "llamacpp": ("llamacpp:requests_processing", "llamacpp:requests_deferred"),
    # --enable-metrics (always rendered); /metrics needs no key (SGLang 0.5.19-0.5.23).
    "sglang": ("sglang:num_running_reqs", "sglang:num_queue_reqs"),
}
SCRAPE_SECONDS = 2.0
TIMEOUT_SECONDS = 1.0  # the whole read of one page, headers to last byte
MAX_BYTES = 512 * 1024  # an engine's /metrics is tens of KiB; more is not a gauge page
MAX_CHUNKS = 1024  # a page dribbled in tiny pieces costs the shared loop per piece
MAX_QUEUE = 1_000_000  # more requests at one backend is a broken gauge, not a queue
CONCURRENT_READS = 8  # pages read at once: the loop also proxies every team's requests
BACKOFF_SECONDS = 30.0  # a pod whose page failed is not read again for this long


# `name{labels} value [timestamp]`: the name, then (greedily, as label values may hold
# braces) the labels, then the value.
SAMPLE = re.compile(r"(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{.*\})?\s+(?P<value>\S+)")


class PageError(Exception):
    """A metrics page that is not read: too big, too slow, compressed, not a 200."""


def queue_depth(text: str, gauges: Iterable[str]) -> int | None:
    """Requests an engine reports as running or waiting (its samples summed over labels,
    e.g. vLLM's per model); None when the page has none of the gauges.

    Only the lines of the wanted gauges are looked at (`name{labels} value [timestamp]`,
    the exposition format): a page is the team's, and parsing all of it would cost the
    loop every team's requests run on."""
    names = tuple(gauges)
    total, seen = 0.0, False
    for line in text.splitlines():
        if not line.startswith(names):
            continue
        sample = SAMPLE.match(line)
        if sample is None:
            raise ValueError(f"not a sample: {line[:80]!r}")
        if sample["name"] not in names:
            continue  # a longer name that begins like a wanted one
        value = float(sample["value"])
        if math.isfinite(value) and value >= 0:
            total += value
            seen = True
    return min(round(total), MAX_QUEUE) if seen else None


def metrics_url(base_url: str) -> str:
    """A pod's metrics page from its OpenAI base URL (`http://ip:port/v1`)."""
    return base_url.removesuffix("/v1") + "/metrics"


class EngineQueues:
    """Reads the queue gauges of every ready pod of each backend that has them (routes
    gives them to autoscaled backends of vllm, tgi and llamacpp; a static file names the
    `engine`), every SCRAPE_SECONDS, into `Load.set_engine`.

    A team's pods serve what they like: every page is read within TIMEOUT_SECONDS whole,
    uncompressed, at most MAX_BYTES in at most MAX_CHUNKS pieces, CONCURRENT_READS at a
    time; a pod whose page failed is skipped for BACKOFF_SECONDS. A round that fails
    clears every figure (none is reported stale) and the loop goes on."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        load: Load,
        *,
        interval: float = SCRAPE_SECONDS,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.snapshot, self.load, self.interval, self.clock = snapshot, load, interval, clock
        # No proxy from the environment: the pages carry the backends' keys.
        self.client = client or httpx.AsyncClient(timeout=TIMEOUT_SECONDS, trust_env=False)
        self.failures = 0  # pages that could not be read (for tests and the log)
        self._reads = asyncio.Semaphore(CONCURRENT_READS)
        self._failed_at: dict[str, float] = {}  # pod URL -> when its page last failed

    async def run(self) -> None:
        try:
            while True:
                try:
                    await self.scrape_once()
                except Exception:
                    log.exception("engine queue gauges: a round failed; figures cleared")
                    for ident in self.load.engine_backends():
                        self.load.set_engine(ident, None)
                await asyncio.sleep(self.interval)
        finally:
            await self.client.aclose()

    async def scrape_once(self) -> None:
        backends = [b for b in self.snapshot().by_id.values() if _scraped(b)]
        results = await asyncio.gather(*(self._backend(b) for b in backends))
        wanted = {b.id for b in backends}
        for backend, depth in zip(backends, results, strict=True):
            self.load.set_engine(backend.id, depth)
        for ident in self.load.engine_backends() - wanted:
            self.load.set_engine(ident, None)
        live = {u for b in backends for u in b.urls}
        self._failed_at = {u: t for u, t in self._failed_at.items() if u in live}

    async def _backend(self, backend: Backend) -> int | None:
        assert backend.queue_gauges is not None
        pages = await asyncio.gather(*(self._page(url, backend) for url in backend.urls))
        depths = [d for d in pages if d is not None]
        # A pod that could not be read counts as nothing: the gateway's own count stays.
        return min(sum(depths), MAX_QUEUE) if depths else None

    async def _page(self, base_url: str, backend: Backend) -> int | None:
        assert backend.queue_gauges is not None
        failed = self._failed_at.get(base_url)
        if failed is not None and self.clock() - failed < BACKOFF_SECONDS:
            return None
        try:
            async with self._reads, asyncio.timeout(TIMEOUT_SECONDS):
                text = await self._read(metrics_url(base_url), backend)
            depth = queue_depth(text, backend.queue_gauges)
        except (httpx.HTTPError, PageError, ValueError, TimeoutError, UnicodeError) as err:
            self.failures += 1
            self._failed_at[base_url] = self.clock()
            log.debug("%s: engine metrics of %s not read: %r", backend.id, base_url, err)
            return None
        self._failed_at.pop(base_url, None)
        return depth

    async def _read(self, url: str, backend: Backend) -> str:
        headers = {**backend.headers(), "accept-encoding": "identity"}
        async with self.client.stream("GET", url, headers=headers) as resp:
            if resp.status_code != 200:
                raise PageError(f"answered {resp.status_code}")
            encoding = resp.headers.get("content-encoding", "identity").strip().lower()
            if encoding != "identity":
                raise PageError(f"content-encoding {encoding[:40]!r} (identity was asked)")
            body, chunks = bytearray(), 0
            async for chunk in resp.aiter_raw():  # as sent: nothing decompressed
                body += chunk
                chunks += 1
                if len(body) > MAX_BYTES or chunks > MAX_CHUNKS:
                    raise PageError(f"over {MAX_BYTES} bytes or {MAX_CHUNKS} pieces")
        return body.decode("utf-8", "strict")


def _scraped(backend: Backend) -> bool:
    return backend.queue_gauges is not None and bool(backend.urls)
