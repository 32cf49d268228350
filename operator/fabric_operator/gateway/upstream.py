"""The gateway's HTTP client for upstreams, behind one small interface with two engines.

httpx is the project's HTTP client, but its connection pool costs more per request the
more requests are in flight (bench/gateway: 1,010 req/s per core with one client, 366 with
100). aiohttp's client (already installed with kopf) holds its per-request cost flat, so
it is the default; httpx stays selectable (`--upstream-client httpx`) to re-measure.
Both pass bodies through undecoded, so an answer reaches the caller byte for byte.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import httpx

Headers = Sequence[tuple[bytes, bytes]]
CHUNK = 64 * 1024


class UpstreamTimeoutError(Exception):
    """No answer (headers) within the timeout."""


class UpstreamUnreachableError(Exception):
    """Connection refused, reset or otherwise failed before an answer."""


class BrokenAnswerError(Exception):
    """The upstream stopped in the middle of its body."""


class Response(Protocol):
    status: int
    headers: list[tuple[bytes, bytes]]

    def body(self) -> AsyncIterator[bytes]: ...

    async def close(self) -> None: ...


class Client(Protocol):
    async def post(self, url: str, content: bytes, headers: Headers) -> Response: ...

    async def close(self) -> None: ...


@dataclass
class _HttpxResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    _raw: httpx.Response

    async def body(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._raw.aiter_raw():
                yield chunk
        except httpx.HTTPError as err:
            raise BrokenAnswerError(type(err).__name__) from err

    async def close(self) -> None:
        await self._raw.aclose()


class HttpxClient:
    def __init__(self, timeout: float, connect_timeout: float, max_connections: int) -> None:
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            follow_redirects=False,
        )

    async def post(self, url: str, content: bytes, headers: Headers) -> Response:
        request = self.http.build_request("POST", url, content=content, headers=list(headers))
        try:
            raw = await self.http.send(request, stream=True)
        except httpx.TimeoutException as err:
            raise UpstreamTimeoutError from err
        except httpx.HTTPError as err:
            raise UpstreamUnreachableError(type(err).__name__) from err
        return _HttpxResponse(raw.status_code, list(raw.headers.raw), raw)

    async def close(self) -> None:
        await self.http.aclose()


@dataclass
class _AiohttpResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    _raw: aiohttp.ClientResponse

    async def body(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._raw.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as err:
            raise BrokenAnswerError(type(err).__name__) from err

    async def close(self) -> None:
        self._raw.release()


class AiohttpClient:
    def __init__(self, timeout: float, connect_timeout: float, max_connections: int) -> None:
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=timeout
        )
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Created inside the running loop, on first use.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections, ttl_dns_cache=10),
                timeout=self.timeout,
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
            )
        return self._session

    async def post(self, url: str, content: bytes, headers: Headers) -> Response:
        session = self._open()
        hdrs: dict[str, Any] = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
        try:
            raw = await session.post(url, data=content, headers=hdrs, allow_redirects=False)
        except TimeoutError as err:
            raise UpstreamTimeoutError from err
        except (aiohttp.ClientError, OSError) as err:
            raise UpstreamUnreachableError(type(err).__name__) from err
        return _AiohttpResponse(raw.status, list(raw.raw_headers), raw)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


CLIENTS: dict[str, Callable[[float, float, int], Client]] = {
    "aiohttp": AiohttpClient,
    "httpx": HttpxClient,
}
