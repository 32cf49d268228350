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
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import httpx
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:  # routes imports QUEUE_GAUGES from here
    from fabric_operator.gateway.load import Load
    from fabric_operator.gateway.routes import Backend, Snapshot

log = logging.getLogger(__name__)

QUEUE_GAUGES: dict[str, tuple[str, ...]] = {
    "vllm": ("vllm:num_requests_running", "vllm:num_requests_waiting"),
    "tgi": ("tgi_queue_size", "tgi_batch_current_size"),
    "llamacpp": ("llamacpp:requests_processing", "llamacpp:requests_deferred"),
}
SCRAPE_SECONDS = 2.0
TIMEOUT_SECONDS = 1.0
MAX_BYTES = 1024 * 1024  # an engine's /metrics is tens of KiB; more is not a gauge page
MAX_QUEUE = 1_000_000  # more requests at one pod is a broken gauge, not a queue


def queue_depth(text: str, gauges: Iterable[str]) -> int | None:
    """Requests an engine reports as running or waiting (its samples summed over labels,
    e.g. vLLM's per model); None when the page has none of the gauges."""
    wanted, total, seen = set(gauges), 0.0, False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted and math.isfinite(sample.value) and sample.value >= 0:
                total += sample.value
                seen = True
    return min(round(total), MAX_QUEUE) if seen else None


def metrics_url(base_url: str) -> str:
    """A pod's metrics page from its OpenAI base URL (`http://ip:port/v1`)."""
    return base_url.removesuffix("/v1") + "/metrics"


class EngineQueues:
    """Reads the queue gauges of every ready pod of each backend that has them (routes
    gives them to autoscaled backends of vllm, tgi and llamacpp; a static file names the
    `engine`), every SCRAPE_SECONDS, into `Load.set_engine`."""

    def __init__(
        self,
        snapshot: Callable[[], Snapshot],
        load: Load,
        *,
        interval: float = SCRAPE_SECONDS,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.snapshot, self.load, self.interval = snapshot, load, interval
        self.client = client or httpx.AsyncClient(timeout=TIMEOUT_SECONDS)
        self.failures = 0  # pages that could not be read (for tests and the log)

    async def run(self) -> None:
        try:
            while True:
                await self.scrape_once()
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

    async def _backend(self, backend: Backend) -> int | None:
        assert backend.queue_gauges is not None
        pages = await asyncio.gather(*(self._page(url, backend) for url in backend.urls))
        depths = [d for d in pages if d is not None]
        # A pod that could not be read counts as nothing: the gateway's own count stays.
        return sum(depths) if depths else None

    async def _page(self, base_url: str, backend: Backend) -> int | None:
        assert backend.queue_gauges is not None
        try:
            async with self.client.stream(
                "GET", metrics_url(base_url), headers=backend.headers()
            ) as resp:
                if resp.status_code != 200:
                    raise ValueError(f"answered {resp.status_code}")
                body = b""
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_BYTES:
                        raise ValueError(f"metrics page over {MAX_BYTES} bytes")
            text = body.decode("utf-8", "replace")
        except (httpx.HTTPError, ValueError) as err:
            self._failed(backend, base_url, err)
            return None
        try:
            return queue_depth(text, backend.queue_gauges)
        except Exception as err:  # a pod's page is the team's: never fatal to the gateway
            self._failed(backend, base_url, err)
            return None

    def _failed(self, backend: Backend, base_url: str, err: Exception) -> None:
        self.failures += 1
        log.debug("%s: engine metrics of %s not read: %s", backend.id, base_url, err)


def _scraped(backend: Backend) -> bool:
    return backend.queue_gauges is not None and bool(backend.urls)
