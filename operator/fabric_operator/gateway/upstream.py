"""The gateway's HTTP client for upstreams, behind one small interface with two engines.

httpx is the project's HTTP client, but its connection pool costs more per request the
more requests are in flight (bench/gateway: 1,010 req/s per core with one client, 366 with
100). aiohttp's client (already installed with kopf) holds its per-request cost flat, so
it is the default; httpx stays selectable (`--upstream-client httpx`) to re-measure.
Both pass bodies through undecoded, so an answer reaches the caller byte for byte.

Timeouts, each its own (the proxy's `Settings` says why each default):

- connect: the TCP (and TLS) connection, set when the client is made;
- first byte: a deadline from the start of the request (connecting and sending it
  included) to the first byte of the answer's body (status and headers alone are not an
  answer: an engine may send them at once and then hang, or drip them), given per
  request, because the proxy waits less when it has another backend to try;
- idle: between two chunks of the body once it began, set when the client is made.

Neither client limits connections itself: the proxy holds one of `Slots` per upstream
while a request is in flight, and times out waiting for one, which a client's own pool
would not do per upstream. `Response.abort` closes the connection, so the upstream sees
its request cancelled (an engine stops generating).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import httpx

Headers = Sequence[tuple[bytes, bytes]]


class UpstreamTimeoutError(Exception):
    """No first byte of an answer within the timeout."""


class UpstreamUnreachableError(Exception):
    """Connection refused, reset, timed out or closed before an answer: nothing was
    answered, so the request may go to another replica or backend."""


class UpstreamBadResponseError(Exception):
    """The upstream answered something that is not HTTP (or not HTTP we can pass on)."""


class BrokenAnswerError(Exception):
    """The upstream stopped in the middle of its body, or went silent for longer than the
    idle timeout (`idle` is then true)."""

    def __init__(self, why: str, *, idle: bool = False) -> None:
        super().__init__(why)
        self.idle = idle


class Response(Protocol):
    status: int
    headers: list[tuple[bytes, bytes]]

    def body(self) -> AsyncIterator[bytes]:
        """The body as it arrives, its first chunk included (read before `post`
        returned); raises BrokenAnswerError."""
        ...

    async def close(self) -> None:
        """Done with it: the connection goes back to the pool if the body was read."""
        ...

    async def abort(self) -> None:
        """Close the connection now, whatever is left unread."""
        ...


class Client(Protocol):
    async def post(
        self, url: str, content: bytes, headers: Headers, first_byte: float
    ) -> Response: ...

    async def close(self) -> None: ...


@dataclass
class Timeouts:
    connect: float = 5.0
    idle: float = 300.0


# ---- httpx ---------------------------------------------------------------------------------


@dataclass
class _HttpxResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    _raw: httpx.Response
    _chunks: AsyncIterator[bytes]
    _first: bytes
    _idle: float

    async def body(self) -> AsyncIterator[bytes]:
        if self._first:
            yield self._first
        while True:
            try:
                async with asyncio.timeout(self._idle):
                    chunk = await anext(self._chunks)
            except StopAsyncIteration:
                return
            except TimeoutError as err:
                raise BrokenAnswerError("idle timeout", idle=True) from err
            except httpx.HTTPError as err:
                raise BrokenAnswerError(type(err).__name__) from err
            yield chunk

    async def close(self) -> None:
        await self._raw.aclose()

    async def abort(self) -> None:
        await self._raw.aclose()  # httpcore closes a connection not read to its end


class HttpxClient:
    def __init__(self, timeouts: Timeouts) -> None:
        self.idle = timeouts.idle
        self.http = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=timeouts.connect),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=1000),
            follow_redirects=False,
        )

    async def post(self, url: str, content: bytes, headers: Headers, first_byte: float) -> Response:
        request = self.http.build_request("POST", url, content=content, headers=list(headers))
        raw: httpx.Response | None = None
        try:
            async with asyncio.timeout(first_byte):
                raw = await self.http.send(request, stream=True)
                chunks = raw.aiter_raw()
                first = await anext(chunks, b"")
        except BaseException as err:
            if raw is not None:
                await raw.aclose()
            if isinstance(err, TimeoutError | httpx.TimeoutException):
                if isinstance(err, httpx.ConnectTimeout):
                    raise UpstreamUnreachableError("connect timeout") from err
                raise UpstreamTimeoutError from err
            if isinstance(err, httpx.RemoteProtocolError | httpx.DecodingError):
                raise UpstreamBadResponseError(type(err).__name__) from err
            if isinstance(err, httpx.HTTPError):
                raise UpstreamUnreachableError(type(err).__name__) from err
            raise
        return _HttpxResponse(raw.status_code, list(raw.headers.raw), raw, chunks, first, self.idle)

    async def close(self) -> None:
        await self.http.aclose()


# ---- aiohttp -------------------------------------------------------------------------------


@dataclass
class _AiohttpResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    _raw: aiohttp.ClientResponse
    _first: bytes

    async def body(self) -> AsyncIterator[bytes]:
        if self._first:
            yield self._first
        content = self._raw.content
        try:
            while chunk := await content.readany():
                yield chunk
        except aiohttp.SocketTimeoutError as err:
            raise BrokenAnswerError("idle timeout", idle=True) from err
        except (aiohttp.ClientError, TimeoutError) as err:
            raise BrokenAnswerError(type(err).__name__) from err

    async def close(self) -> None:
        self._raw.release()

    async def abort(self) -> None:
        self._raw.close()


class AiohttpClient:
    """The first-byte timeout is a deadline of the gateway's own (`asyncio.timeout`) over
    sending the request and reading the status, the headers and the first chunk of the
    body: aiohttp's socket read timer is re-armed by every byte, so an upstream dripping
    its status line and headers a byte at a time would never run out of it. Once the
    first chunk is in, that timer is the idle timeout: no timer of the gateway's own per
    chunk."""

    def __init__(self, timeouts: Timeouts) -> None:
        self.connect, self.idle = timeouts.connect, timeouts.idle
        # No socket read timer until the answer began: the deadline covers that part.
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect)
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Created inside the running loop, on first use.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                # No limit of its own: its queue has no timeout (see the module's doc).
                connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=10),
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding"),
            )
        return self._session

    async def post(self, url: str, content: bytes, headers: Headers, first_byte: float) -> Response:
        session = self._open()
        hdrs: dict[str, Any] = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
        raw: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(first_byte):
                raw = await session.post(
                    url,
                    data=content,
                    headers=hdrs,
                    allow_redirects=False,
                    timeout=self._timeout,
                )
                first = await raw.content.readany()
        except BaseException as err:
            if raw is not None:
                raw.close()  # cancelled (the client left), timed out or broken: not reused
            if isinstance(err, aiohttp.ConnectionTimeoutError):
                raise UpstreamUnreachableError("connect timeout") from err
            if isinstance(err, TimeoutError):
                raise UpstreamTimeoutError from err
            if isinstance(err, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
                raise UpstreamBadResponseError(type(err).__name__) from err
            if isinstance(err, aiohttp.ClientError | OSError):
                raise UpstreamUnreachableError(type(err).__name__) from err
            raise
        connection = raw.connection  # None once the whole body is in and the request sent
        # Not once the body is all in: aiohttp drops its timer at the body's end, and one
        # armed after that would go off on the connection back in the pool.
        if connection is not None and connection.protocol is not None and not raw.content.is_eof():
            connection.protocol.read_timeout = self.idle
            connection.protocol.start_timeout()
        return _AiohttpResponse(raw.status, list(raw.raw_headers), raw, first)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


CLIENTS: dict[str, Callable[[Timeouts], Client]] = {
    "aiohttp": AiohttpClient,
    "httpx": HttpxClient,
}


# ---- connection slots ------------------------------------------------------------------------

SlotKey = str  # "backend-id upstream-base-url" (a string: no garbage to collect)


def slot_key(backend: str, url: str) -> SlotKey:
    return f"{backend} {url}"


class Slots:
    """At most `limit` requests in flight to each upstream (a backend's replica, or a
    remote's URL), so a hung or slow one holds its own slots and no more; a request for a
    full one waits up to a timeout, in order. Keyed by backend and URL: two teams'
    backends never share slots, even on the same provider. An upstream with nothing in
    flight holds no entry, so memory follows what is in flight."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[SlotKey, int] = {}
        self._waiting: dict[SlotKey, deque[asyncio.Future[None]]] = {}

    def free(self, key: SlotKey) -> bool:
        return self._held.get(key, 0) < self.limit and key not in self._waiting

    def in_flight(self, key: SlotKey) -> int:
        return self._held.get(key, 0)

    def take(self, key: SlotKey) -> bool:
        """True with a slot held (give it back with `release`) if one is free now."""
        held = self._held.get(key, 0)
        if held < self.limit and key not in self._waiting:
            self._held[key] = held + 1
            return True
        return False

    async def acquire(self, key: SlotKey, timeout: float) -> bool:
        """True with a slot held (give it back with `release`), False after `timeout`."""
        return self.take(key) or await self.wait(key, timeout)

    async def wait(self, key: SlotKey, timeout: float) -> bool:
        """`acquire` once `take` failed: in turn, up to `timeout`."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiting.setdefault(key, deque())
        queue.append(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except BaseException as err:
            if waiter.done() and not waiter.cancelled():
                self.release(key)  # handed over just as this one gave up: pass it on
            else:
                waiter.cancel()
                with contextlib.suppress(ValueError):
                    queue.remove(waiter)
                if not queue and self._waiting.get(key) is queue:
                    del self._waiting[key]
            if isinstance(err, TimeoutError):
                return False
            raise
        return True

    def release(self, key: SlotKey) -> None:
        queue = self._waiting.get(key)
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot changes hands: the count stays
                if not queue:
                    del self._waiting[key]
                return
        if queue is not None:
            del self._waiting[key]
        held = self._held[key] - 1
        if held:
            self._held[key] = held
        else:
            del self._held[key]
