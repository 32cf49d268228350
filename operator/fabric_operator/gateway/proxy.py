"""The gateway's ASGI application: authenticate, authorize, pick an upstream, pass the
answer through byte for byte, fall back before the first byte if the upstream fails.

Plain ASGI rather than a framework: five routes, and the request path is the product, so
every step on it is visible here.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from fabric_operator.gateway.metrics import GatewayMetrics
from fabric_operator.gateway.ratelimit import RateLimiter
from fabric_operator.gateway.routes import Backend, Tenant
from fabric_operator.gateway.sources import Source
from fabric_operator.gateway.upstream import (
    CLIENTS,
    BrokenAnswerError,
    Client,
    Response,
    UpstreamTimeoutError,
    UpstreamUnreachableError,
)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("fabric_operator.gateway")

FORWARDED = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
RETRYABLE = frozenset({429, 500, 502, 503, 504})
# Not passed on between hops (RFC 9110 7.6.1), plus what the server sets itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
PASSED_REQUEST_HEADERS = frozenset({b"accept", b"x-request-id", b"user-agent"})
MAX_BODY = 32 * 1024 * 1024
BACKEND_HEADER = b"x-fabric-backend"
JSON = [(b"content-type", b"application/json")]


class HTTPError(Exception):
    """An answer of the gateway's own, in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code
        self.headers = list(headers)

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.type, "param": None, "code": self.code}
        return json.dumps({"error": error}).encode()


@dataclass
class Outcome:
    """What one request did, for the access log and the metrics."""

    model: str = "-"
    tenant: str = "-"
    backend: str = "-"
    status: int = 0
    ttfb: float | None = None
    tried: list[str] = field(default_factory=list)


@dataclass
class Call:
    """One forwarded request as the candidates are tried."""

    model: str
    payload: dict[str, Any]
    body: bytes
    headers: list[tuple[bytes, bytes]]
    suffix: str  # the path after /v1
    send: Send
    outcome: Outcome
    start: float


@dataclass
class Settings:
    timeout: float = 600.0  # before the upstream's first byte (and between bytes)
    connect_timeout: float = 5.0
    max_connections: int = 1000
    access_log: bool = True
    client: str = "aiohttp"  # or httpx: see fabric_operator.gateway.upstream


class Gateway:
    def __init__(
        self, source: Source, metrics: GatewayMetrics, settings: Settings | None = None
    ) -> None:
        self.source, self.metrics = source, metrics
        self.settings = settings or Settings()
        self.limiter = RateLimiter()
        st = self.settings
        self.client: Client = CLIENTS[st.client](st.timeout, st.connect_timeout, st.max_connections)

    async def aclose(self) -> None:
        await self.client.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        start = time.perf_counter()
        outcome = Outcome()
        try:
            if path in FORWARDED:
                if method != "POST":
                    raise HTTPError(405, f"{path} takes POST", "invalid_request_error", "405")
                await self._forward(scope, receive, send, outcome, start)
            elif path == "/v1/models" and method == "GET":
                await self._models(scope, send, outcome)
            elif path == "/healthz":
                await _json(send, 200, {"status": "ok", **self.source.status()})
                return
            elif path == "/readyz":
                ready = self.source.ready
                await _json(send, 200 if ready else 503, {"ready": ready, **self.source.status()})
                return
            else:
                raise HTTPError(404, f"no route {method} {path}", "invalid_request_error", "404")
        except HTTPError as err:
            outcome.status = err.status
            await send(
                {
                    "type": "http.response.start",
                    "status": err.status,
                    "headers": [*JSON, *err.headers],
                }
            )
            await send({"type": "http.response.body", "body": err.body()})
        self._record(outcome, path, time.perf_counter() - start)

    # ---- the parts of a request --------------------------------------------------------

    def _tenant(self, scope: Scope) -> Tenant:
        key = _bearer(scope)
        snapshot = self.source.snapshot
        tenant = snapshot.tenant(key)
        if tenant is None:
            if key is None:
                raise HTTPError(
                    401,
                    "missing API key: send it as 'Authorization: Bearer KEY'",
                    "authentication_error",
                    "missing_api_key",
                )
            raise HTTPError(401, "invalid API key", "authentication_error", "invalid_api_key")
        return tenant

    async def _models(self, scope: Scope, send: Send, outcome: Outcome) -> None:
        tenant = self._tenant(scope)
        outcome.tenant = tenant.name
        data = [
            {"id": model, "object": "model", "created": 0, "owned_by": backend.id}
            for model, backend in self.source.snapshot.models_for(tenant)
        ]
        outcome.status = 200
        await _json(send, 200, {"object": "list", "data": data})

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, outcome: Outcome, start: float
    ) -> None:
        tenant = self._tenant(scope)
        outcome.tenant = tenant.name
        body = await _read_body(receive)
        payload = _parse(body)
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise HTTPError(
                400, "'model' is required (a string)", "invalid_request_error", "missing_model"
            )
        outcome.model = model
        candidates = self.source.snapshot.candidates(tenant, model)
        if not candidates:
            raise HTTPError(
                404,
                f"the model '{model}' does not exist",
                "invalid_request_error",
                "model_not_found",
            )
        if not tenant.may_use(model):
            raise HTTPError(
                403,
                f"tenant '{tenant.name}' may not use the model '{model}'"
                + ("" if tenant.models else " (its key lists no models)"),
                "permission_error",
                "model_not_allowed",
            )
        if tenant.rpm is not None:
            wait = self.limiter.take(tenant.id, tenant.rpm)
            if wait > 0:
                raise HTTPError(
                    429,
                    f"tenant '{tenant.name}' is over its limit of {tenant.rpm} requests per minute",
                    "rate_limit_error",
                    "rate_limit_exceeded",
                    [(b"retry-after", str(math.ceil(wait)).encode())],
                )
        headers = [(k, v) for k, v in scope["headers"] if k in PASSED_REQUEST_HEADERS]
        headers.append((b"content-type", b"application/json"))
        call = Call(model, payload, body, headers, scope["path"][3:], send, outcome, start)
        await self._try(candidates, call)

    async def _try(self, candidates: tuple[Backend, ...], call: Call) -> None:
        """Each candidate in turn until one answers with something other than 429/5xx; the
        last one's answer goes through whatever it is."""
        failure: HTTPError | None = None
        last = len(candidates) - 1
        outcome, model = call.outcome, call.model
        for i, backend in enumerate(candidates):
            if outcome.tried:
                self.metrics.fallbacks.labels(model, outcome.tried[-1], backend.id).inc()
            outcome.tried.append(backend.id)
            if not backend.urls:
                self.metrics.upstream_errors.labels(backend.id, "no_ready_endpoint").inc()
                failure = HTTPError(
                    503,
                    f"upstream {backend.id} has no ready replica",
                    "service_unavailable",
                    "upstream_unavailable",
                )
                continue
            content = call.body
            if backend.upstream_model and backend.upstream_model != model:
                content = json.dumps({**call.payload, "model": backend.upstream_model}).encode()
            headers = [*call.headers, *backend.header_bytes]
            try:
                response = await self._post(backend, call.suffix, content, headers)
            except UpstreamTimeoutError:
                self.metrics.upstream_errors.labels(backend.id, "timeout").inc()
                failure = HTTPError(
                    504,
                    f"upstream {backend.id} did not answer within {self.settings.timeout:g}s",
                    "upstream_error",
                    "upstream_timeout",
                )
                continue
            except UpstreamUnreachableError as err:
                self.metrics.upstream_errors.labels(backend.id, "unreachable").inc()
                failure = HTTPError(
                    502,
                    f"upstream {backend.id} is unreachable ({err})",
                    "upstream_error",
                    "upstream_unreachable",
                )
                continue
            if response.status in RETRYABLE:
                self.metrics.upstream_errors.labels(backend.id, str(response.status)).inc()
                if i < last:
                    await response.close()
                    continue
            await self._pass_through(response, backend, call)
            return
        assert failure is not None
        raise failure

    async def _post(
        self, backend: Backend, suffix: str, content: bytes, headers: list[tuple[bytes, bytes]]
    ) -> Response:
        """One backend: a replica that refuses the connection (it died before the
        Endpoints said so) is skipped for the next ready one; nothing was sent yet."""
        for attempt in range(len(backend.urls)):
            try:
                return await self.client.post(backend.pick() + suffix, content, headers)
            except UpstreamUnreachableError:
                if attempt == len(backend.urls) - 1:
                    raise
                self.metrics.upstream_errors.labels(backend.id, "unreachable").inc()
        raise AssertionError("unreachable: a backend without URLs is skipped before")

    async def _pass_through(self, response: Response, backend: Backend, call: Call) -> None:
        """The upstream's status, headers and body, chunk by chunk as they arrive."""
        send, outcome = call.send, call.outcome
        outcome.backend, outcome.status = backend.id, response.status
        headers = [(k, v) for k, v in response.headers if k.lower() not in HOP_BY_HOP]
        headers.append((BACKEND_HEADER, backend.id.encode()))
        try:
            await send(
                {"type": "http.response.start", "status": response.status, "headers": headers}
            )
            async for chunk in response.body():
                if outcome.ttfb is None:
                    outcome.ttfb = time.perf_counter() - call.start
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except BrokenAnswerError as err:
            # Too late to fall back or to answer otherwise: end the answer where it broke.
            log.warning("upstream %s broke off its answer: %s", backend.id, err)
        finally:
            await response.close()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _record(self, outcome: Outcome, path: str, elapsed: float) -> None:
        m = self.metrics
        m.requests.labels(outcome.model, outcome.tenant, outcome.backend, str(outcome.status)).inc()
        if outcome.model != "-":
            m.latency.labels(outcome.model, outcome.tenant).observe(elapsed)
            if outcome.ttfb is not None:
                m.ttfb.labels(outcome.model, outcome.tenant).observe(outcome.ttfb)
        if self.settings.access_log:
            log.info(
                "%s %s",
                path,
                outcome.status,
                extra={
                    "fields": {
                        "path": path,
                        "status": outcome.status,
                        "model": outcome.model,
                        "tenant": outcome.tenant,
                        "backend": outcome.backend,
                        "tried": outcome.tried,
                        "ms": round(elapsed * 1000, 2),
                        "ttfb_ms": round(outcome.ttfb * 1000, 2) if outcome.ttfb else None,
                    }
                },
            )


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            text: str = value.decode("latin-1")
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HTTPError(499, "client went away", "invalid_request_error", "disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise HTTPError(
                413,
                f"request body over {MAX_BODY // (1024 * 1024)} MiB",
                "invalid_request_error",
                "body_too_large",
            )
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def _parse(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except ValueError as err:
        raise HTTPError(
            400, f"the body is not JSON: {err}", "invalid_request_error", "invalid_json"
        ) from err
    if not isinstance(payload, dict):
        raise HTTPError(
            400, "the body must be a JSON object", "invalid_request_error", "invalid_json"
        )
    return payload


async def _json(send: Send, status: int, data: Any) -> None:
    await send({"type": "http.response.start", "status": status, "headers": JSON})
    await send({"type": "http.response.body", "body": json.dumps(data).encode()})
