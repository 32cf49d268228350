"""One `/load?watch=1` stream per gateway replica, feeding a `Signal`.

A stream that fails, closes or stays silent for longer than the stale time (its
heartbeat is 1 s; httpx's read timeout) is dropped from the sum at once and reconnected
with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable

import httpx

from fabric_operator.autoscaler.signal import STALE_SECONDS, Report, Signal, parse_report

log = logging.getLogger(__name__)

CONNECT_SECONDS = 2.0
MAX_BACKOFF = 5.0
MAX_LINE = 4 << 20  # a report per backend is ~60 bytes: 4 MiB is ~70,000 backends


def watch_url(url: str) -> httpx.URL:
    """The streaming form of a /load URL."""
    return httpx.URL(url).copy_merge_params({"watch": "1"})


class Streams:
    """One `/load?watch=1` stream per URL, feeding `signal`; reconnects with backoff."""

    def __init__(
        self,
        signal: Signal,
        *,
        stale_after: float = STALE_SECONDS,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.signal = signal
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.connects = 0  # streams opened (for tests and logs)
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(CONNECT_SECONDS, read=stale_after),
            limits=httpx.Limits(max_keepalive_connections=0),
            trust_env=False,  # a gateway pod's address never goes through a proxy
            follow_redirects=False,
            transport=transport,
        )

    @property
    def urls(self) -> set[str]:
        return set(self._tasks)

    def set_urls(self, urls: Iterable[str]) -> None:
        """Stream from exactly these URLs (new ones start, gone ones stop and drop)."""
        wanted = set(urls)
        self.signal.expect(wanted)
        for url in self.urls - wanted:
            self._tasks.pop(url).cancel()
            self.signal.drop(url)
        for url in sorted(wanted - self.urls):
            self._tasks[url] = asyncio.create_task(self._follow(url))

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self.set_urls(())
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._http.aclose()

    async def _follow(self, url: str) -> None:
        backoff = 0.1
        while True:
            try:
                async for report in self._stream(url):
                    self.signal.update(url, report)
                    backoff = 0.1
                why = "closed"
            except asyncio.CancelledError:
                raise
            except (httpx.HTTPError, ValueError, UnicodeDecodeError) as err:
                why = f"{type(err).__name__}: {str(err)[:200]}"
            self.signal.drop(url)
            # Said once per outage; the retries of a gateway that stays away only at debug.
            level = logging.INFO if backoff == 0.1 else logging.DEBUG
            log.log(level, "gateway load %s: %s; reconnecting in %.1fs", url, why, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _stream(self, url: str) -> AsyncIterator[Report]:
        async with self._http.stream("GET", watch_url(url)) as resp:
            resp.raise_for_status()
            self.connects += 1
            buffer = b""
            async for chunk in resp.aiter_bytes():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                if len(buffer) > MAX_LINE:
                    raise ValueError("a line longer than 4 MiB")
                for line in lines:
                    if line.strip():
                        yield parse_report(line)
