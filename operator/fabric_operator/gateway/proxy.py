"""The gateway's ASGI application: authenticate, authorize, pick an upstream, pass the
answer through byte for byte, fall back before the first byte if the upstream fails.

Plain ASGI rather than a framework: five routes, and the request path is the product, so
every step on it is visible here.

What a request may cost the gateway, in order:

- Refused before its body is read: no or an unknown key (401), a Content-Length over the
  limit (413), over its key's requests or tokens per minute (429; `limits`). The answer
  then says `connection: close` and uvicorn closes the connection, so the unread body is
  never read, nor drained.
- A body that grows over the limit while it is read (chunked): 413, the rest unread.
- A backend is tried only with a free slot for its upstream (`upstream.Slots`); a full
  one is waited for up to `pool_timeout`, then the next candidate (or a 503) follows.
- Until the first byte of an answer nothing has reached the client, so a backend that
  does not answer in time (`fallback_timeout` when there is another candidate, else
  `first_byte_timeout`), refuses, answers garbage, 429 or 5xx is passed over.
- Once an answer began it is passed on to its end; if the upstream breaks off or goes
  silent for `idle_timeout`, the client's connection is closed without the end of the
  answer (no final chunk), so the client sees it cut rather than complete.
- A client that goes away cancels the upstream request: its connection is closed, which
  an engine takes as the end of the request (it stops generating).
- Tokens are counted from the upstream's `usage` as the answer passes (`usage`), then
  charged to the key's tokens per minute; counts no answer could hold are clamped, and
  an answer that ends without usage (cut off, left by its client, or from an upstream
  that sends none) is charged an estimate (`usage.estimate`), counted apart.
- Anything unexpected is logged (the error's type and where, never its message, the key
  or the body), counted, and answered with an OpenAI-shaped 502, or, once the answer
  began, by closing the connection.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from fabric_operator.gateway import balance, usage
from fabric_operator.gateway.limits import Limits
from fabric_operator.gateway.load import Load
from fabric_operator.gateway.metrics import NONE, UNKNOWN, GatewayMetrics
from fabric_operator.gateway.providerauth import UpstreamAuthError
from fabric_operator.gateway.routes import Backend, Snapshot, Tenant
from fabric_operator.gateway.sharedlimit import Refusal, ceil_seconds
from fabric_operator.gateway.sources import Source
from fabric_operator.gateway.upstream import (
    CLIENTS,
    BrokenAnswerError,
    Client,
    Response,
    SlotKey,
    Slots,
    Timeouts,
    UpstreamBadResponseError,
    UpstreamTimeoutError,
    UpstreamUnreachableError,
    slot_key,
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
MIB = 1024 * 1024
BACKEND_HEADER = b"x-fabric-backend"
JSON = [(b"content-type", b"application/json")]
CLOSE = (b"connection", b"close")
# What an upstream's header may hold to be passed on: names are RFC 9110 tokens, values
# have no control characters but tab. uvicorn refuses the rest, after it has marked the
# answer started, when nothing else could be answered any more.
_TOKEN = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BAD_HEADER_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
HELD_SHOWN_SECONDS = 1.0  # a held request stays on /load at least this long
WATCH_AFTER = 0.05  # seconds into forwarding when the client's disconnect is listened for
MODEL_LOGGED = 100  # characters of a requested model name the access log keeps
ZEROED_MOST = 5000  # keys x models over which the token counters are not made at 0


class UpstreamSaturatedError(Exception):
    """No slot of the backend's upstreams came free within the pool timeout."""


ATTEMPT_FAILURES = (
    UpstreamTimeoutError,
    UpstreamSaturatedError,
    UpstreamUnreachableError,
    UpstreamBadResponseError,
    UpstreamAuthError,
)


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


class AnswerAbortedError(Exception):
    """Raised out of the application once an answer began and cannot be completed:
    uvicorn then closes the connection without ending the answer (for a chunked one, no
    final empty chunk), so the client sees it cut. Logged by the gateway itself; the
    server's own "Exception in ASGI application" is left out (`QuietAborts`)."""


class QuietAborts(logging.Filter):
    """For uvicorn's error logger: drop its traceback of an AnswerAbortedError."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, AnswerAbortedError)


@dataclass
class Outcome:
    """What one request did, for the access log and the metrics."""

    model: str = NONE  # the metrics label: a routed model, UNKNOWN, or NONE
    asked: str | None = None  # the model the body named, for the log
    tenant: str = NONE
    backend: str = NONE
    status: int = 0
    ttfb: float | None = None
    tried: list[str] = field(default_factory=list)
    started: bool = False  # the answer's status and headers were sent
    body_unread: bool = False  # a request body the gateway has not read (all of)
    aborted: str | None = None  # why the answer was cut: client_disconnected, broken, ...
    held: float | None = None  # seconds held while the backend had no ready pod
    tokens: usage.Usage | None = None  # what the answer used, as its upstream said


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
    task: asyncio.Task[Any]  # the request's
    receive: Receive
    done: bool = False  # the answer ended (or failed): a disconnect no longer matters
    client_left: bool = False
    listening: asyncio.Future[Message] | None = None  # for the client's disconnect
    slot: SlotKey = ""  # of the upstream tried, while it is
    tenant: Tenant | None = None  # who asked: checked again after a hold
    key: str | None = None  # its bearer key, to look the tenant up again (never logged)
    answer_headers: list[tuple[bytes, bytes]] | None = None  # to pass on (`_unpassable`)
    stream: bool = False  # a streamed completion (`stream: true` on a path that streams)
    client_usage: bool = False  # the client asked for the usage chunk itself
    meter: usage.Meter | None = None  # reading the answer passed on, once there is one

    def listen(self) -> None:
        """With the body read, the server's next message is the client's disconnect,
        which cancels the request's task (and so the upstream request, wherever it is).
        Listening takes a task of its own, which would cost a tenth of a short
        request's time, so it starts only once a request has taken WATCH_AFTER: one
        answered sooner has had nothing worth cancelling."""
        if not self.done:
            self.listening = asyncio.ensure_future(self.receive())
            self.listening.add_done_callback(self._heard)

    def _heard(self, message: asyncio.Future[Message]) -> None:
        if self.done or message.cancelled() or message.exception() is not None:
            return
        if message.result().get("type") == "http.disconnect":
            self.client_left = True
            self.task.cancel()


@dataclass
class Settings:
    """Limits of the request path; `server.add_flags` has a flag for each.

    An LLM answer's first byte may be long in coming: a non-streaming answer's status
    line comes only once the whole answer is generated, and an engine may be loading
    the model. So the wait for the first byte is long where nothing else could answer
    (`first_byte_timeout`, 10 min as before, also `--timeout`), and short where another
    backend could (`fallback_timeout`): a hung backend with a fallback costs its
    requests 30 s, and one without keeps them no longer than the client would wait (the
    OpenAI clients' own default is 600 s). Once an answer began, `idle_timeout` bounds
    the silence between its chunks: tokens come every few ms, but a reasoning model may
    think for minutes between them. `max_per_upstream` is vLLM's usual `max_num_seqs`
    (256 sequences in flight per engine): more would mostly queue in the engine.
    """

    first_byte_timeout: float = 600.0  # when no other candidate remains
    fallback_timeout: float = 30.0  # when another could answer instead
    connect_timeout: float = 5.0
    idle_timeout: float = 300.0  # between chunks of an answer that began
    pool_timeout: float = 10.0  # waiting for a free slot of a saturated upstream
    max_per_upstream: int = 256  # requests in flight per upstream (replica URL)
    max_body: int = 32 * MIB
    # Held requests (at zero) of all backends together: each keeps its connection and its
    # body, and a team sets its own backends' caps (spec.autoscaling.maxHeldRequests).
    max_held: int = 1000
    max_held_bytes: int = 256 * MIB
    access_log: bool = True
    client: str = "aiohttp"  # or httpx: see fabric_operator.gateway.upstream

    def first_byte(self, last: bool) -> float:
        if last:
            return self.first_byte_timeout
        return min(self.fallback_timeout, self.first_byte_timeout)


class Gateway:
    def __init__(
        self,
        source: Source,
        metrics: GatewayMetrics,
        settings: Settings | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.source, self.metrics = source, metrics
        self.settings = settings or Settings()
        self.limits = limits or Limits()
        st = self.settings
        self.slots = Slots(st.max_per_upstream)
        self.load = Load()
        self._held_bytes = 0  # request bodies kept by held requests
        self._turn = itertools.count()  # least in flight's tie-break, across snapshots
        self.client: Client = CLIENTS[st.client](Timeouts(st.connect_timeout, st.idle_timeout))
        self._zeroed: frozenset[tuple[str, str, str]] = frozenset()
        source.watchers.append(self._zero_tokens)
        self._zero_tokens(source.snapshot)

    def _zero_tokens(self, snapshot: Snapshot) -> None:
        """Token counters at 0 for each key and model it is routed to (its first
        backend), so that a counter's first answer shows in Prometheus's increase()
        rather than being its first sample. Skipped where that would be many series."""
        tenants = set(snapshot.tenants.values())
        if not tenants or len(tenants) * len(snapshot.routes) > ZEROED_MOST:
            return
        try:
            routed = frozenset(
                (t.name, model, backend.id)
                for t in tenants
                for model, backend in snapshot.models_for(t)
            )
        except Exception as err:  # a bookkeeping nicety must never stop the gateway
            log.warning("token counters not set to 0: %s (message withheld)", type(err).__name__)
            return
        for labels in routed - self._zeroed:
            for kind in ("prompt", "completion"):
                self.metrics.tokens.labels(*labels, kind)
        self._zeroed |= routed

    async def aclose(self) -> None:
        await self.client.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        start = time.perf_counter()
        outcome = Outcome()
        try:
            if not await self._route(scope, receive, send, outcome, start):
                return
        except HTTPError as err:
            await self._refuse(send, outcome, err)
        except AnswerAbortedError:
            self._record(outcome, path, time.perf_counter() - start)
            raise
        except Exception as err:
            self._unexpected(err, outcome, path)
            if outcome.started:
                self._record(outcome, path, time.perf_counter() - start)
                raise AnswerAbortedError("unexpected error") from None
            failed = HTTPError(
                502,
                "the gateway failed on this request (the error is logged)",
                "server_error",
                "internal_error",
            )
            await self._refuse(send, outcome, failed)
        self._record(outcome, path, time.perf_counter() - start)

    async def _route(
        self, scope: Scope, receive: Receive, send: Send, outcome: Outcome, start: float
    ) -> bool:
        """Answer the request; False for what is neither logged nor counted (probes)."""
        path, method = scope["path"], scope["method"]
        if path in FORWARDED:
            if method != "POST":
                outcome.body_unread = _body_framing(scope)[1]
                raise HTTPError(405, f"{path} takes POST", "invalid_request_error", "405")
            await self._forward(scope, receive, send, outcome, start)
        elif path == "/v1/models" and method == "GET":
            await self._models(scope, send, outcome)
        elif path == "/healthz":
            await _json(send, 200, {"status": "ok", **self.source.status()})
            return False
        elif path == "/readyz":
            # Ready or not by the source alone: limits that fell back to per replica are
            # degraded (said here), never a reason to refuse traffic.
            ready = self.source.ready
            body = {"ready": ready, **self.source.status(), "limits": self.limits.status()}
            await _json(send, 200 if ready else 503, body)
            return False
        else:
            outcome.body_unread = _body_framing(scope)[1]
            raise HTTPError(404, f"no route {method} {path}", "invalid_request_error", "404")
        return True

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
        outcome.started = True
        await _json(send, 200, {"object": "list", "data": data})

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, outcome: Outcome, start: float
    ) -> None:
        st = self.settings
        length, outcome.body_unread = _body_framing(scope)
        # Refusals that need no body come before it is read.
        tenant = self._tenant(scope)
        outcome.tenant = tenant.name
        if length is not None and length > st.max_body:
            raise _too_large(st.max_body)
        if tenant.rpm is not None or tenant.tpm is not None:
            # The tokens it will take at least: its prompt, at 4 bytes a token (the body
            # is not read yet: its max_tokens is not known).
            refusal = await self.limits.admit(tenant, (length or 0) // 4)
            if refusal is not None:
                self.metrics.rate_limited.labels(tenant.name, refusal.kind).inc()
                raise _over_limit(tenant, refusal)
        body = await _read_body(receive, st.max_body)
        outcome.body_unread = False
        payload = _parse(body)
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise HTTPError(
                400, "'model' is required (a string)", "invalid_request_error", "missing_model"
            )
        outcome.asked, outcome.model = model[:MODEL_LOGGED], UNKNOWN
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
        outcome.model = model  # routed for this key: a label the snapshot bounds
        headers = [(k, v) for k, v in scope["headers"] if k in PASSED_REQUEST_HEADERS]
        headers.append((b"content-type", b"application/json"))
        task = asyncio.current_task()
        assert task is not None
        call = Call(
            model, payload, body, headers, scope["path"][3:], send, outcome, start, task, receive
        )
        call.tenant, call.key = tenant, _bearer(scope)
        stream = payload.get("stream")
        if stream is not None and not isinstance(stream, bool):
            # As OpenAI answers it. Engines coerce 1 or "true" to a stream: one the
            # gateway would neither ask usage of nor strip it from.
            raise HTTPError(
                400,
                f"Invalid type for 'stream': expected a boolean, but got "
                f"{type(stream).__name__} instead.",
                "invalid_request_error",
                "invalid_type",
            )
        if stream is True and call.suffix in usage.STREAMED_PATHS:
            call.stream, call.client_usage = True, usage.wants_usage(payload)
        try:
            await self._watching_the_client(candidates, call)
        finally:
            self._count(call)

    async def _watching_the_client(self, candidates: tuple[Backend, ...], call: Call) -> None:
        """Try the candidates while listening for the client (`Call.listen`)."""
        task = call.task
        timer = asyncio.get_running_loop().call_later(WATCH_AFTER, call.listen)
        try:
            await self._try(candidates, call)
        except asyncio.CancelledError:
            if not call.client_left:
                raise
            task.uncancel()
            outcome = call.outcome
            outcome.aborted = "client_disconnected"
            if not outcome.started:
                outcome.status = 499
            self.metrics.client_disconnects.labels(outcome.tried[-1]).inc()
        finally:
            call.done = True
            timer.cancel()
            if call.listening is not None:
                call.listening.cancel()

    async def _try(self, candidates: tuple[Backend, ...], call: Call) -> None:
        """Each candidate in turn until one answers with something other than 429/5xx; the
        last one's answer goes through whatever it is."""
        st = self.settings
        failure: HTTPError | None = None
        last = len(candidates) - 1  # the last candidate with an upstream to try (or hold)
        while last >= 0 and not (candidates[last].urls or candidates[last].hold):
            last -= 1
        outcome, model = call.outcome, call.model
        for i, candidate in enumerate(candidates):
            if outcome.tried:
                self.metrics.fallbacks.labels(model, outcome.tried[-1], candidate.id).inc()
            outcome.tried.append(candidate.id)
            backend: Backend | None = candidate
            if not candidate.urls:
                backend = await self._hold(candidate, call) if candidate.hold else None
            if backend is None:
                failure = self._unavailable(candidate)
                continue
            content, inject = _content(call, backend)
            headers = [*call.headers, *backend.header_bytes]
            wait = st.first_byte(i >= last)
            self.load.enter(backend.id)
            try:
                try:
                    response = await self._send(backend, call, content, headers, wait)
                except ATTEMPT_FAILURES as err:
                    failure = self._failed(backend, err, wait)
                    continue
                try:
                    why = _unpassable(response, call)
                    if why is not None:
                        await response.abort()
                        failure = self._failed(backend, UpstreamBadResponseError(why), wait)
                        continue
                    if response.status in RETRYABLE:
                        self.metrics.upstream_errors.labels(backend.id, str(response.status)).inc()
                        if i < last:
                            await response.close()
                            continue
                    await self._pass_through(response, backend, call, inject)
                    return
                finally:
                    self.slots.release(call.slot)
            finally:
                self.load.leave(backend.id)
        assert failure is not None
        raise failure

    def _unavailable(self, backend: Backend) -> HTTPError:
        """A backend with no ready pod (and none came while its request was held), or
        with a key it cannot use (`Backend.problem`)."""
        if backend.problem is not None:
            self.metrics.upstream_errors.labels(backend.id, "unusable_key").inc()
            return HTTPError(
                503,
                f"upstream {backend.id} is not usable: {backend.problem}",
                "service_unavailable",
                "upstream_unavailable",
            )
        self.metrics.upstream_errors.labels(backend.id, "no_ready_endpoint").inc()
        held = backend.hold is not None
        return HTTPError(
            503,
            f"upstream {backend.id} has no ready replica"
            + (" (the request was held while it scales up; try again)" if held else ""),
            "service_unavailable",
            "upstream_unavailable",
            [(b"retry-after", b"10")] if held else [],
        )

    def _failed(self, backend: Backend, err: Exception, wait: float) -> HTTPError:
        """Count an attempt that got no answer to pass on, and the error it would be."""
        st, which = self.settings, backend.id
        if isinstance(err, UpstreamTimeoutError):
            reason = "timeout"
            error = HTTPError(
                504,
                f"upstream {which} sent no answer within {wait:g}s",
                "upstream_error",
                "upstream_timeout",
            )
        elif isinstance(err, UpstreamSaturatedError):
            reason = "saturated"
            error = HTTPError(
                503,
                f"upstream {which} is saturated ({st.max_per_upstream} requests in flight; "
                f"none ended within {st.pool_timeout:g}s)",
                "service_unavailable",
                "upstream_saturated",
                [(b"retry-after", b"1")],
            )
        elif isinstance(err, UpstreamAuthError):
            reason = "auth"
            error = HTTPError(
                502,
                f"upstream {which} could not be authenticated: no access token ({err})",
                "upstream_error",
                "upstream_auth_failed",
            )
        elif isinstance(err, UpstreamBadResponseError):
            reason = "bad_response"
            error = HTTPError(
                502,
                f"upstream {which} answered with something that is not HTTP the gateway "
                f"can pass on ({err})",
                "upstream_error",
                "upstream_bad_response",
            )
        else:
            reason = "unreachable"
            error = HTTPError(
                502,
                f"upstream {which} is unreachable ({err})",
                "upstream_error",
                "upstream_unreachable",
            )
        self.metrics.upstream_errors.labels(which, reason).inc()
        return error

    async def _send(
        self,
        backend: Backend,
        call: Call,
        content: bytes,
        headers: list[tuple[bytes, bytes]],
        first_byte: float,
    ) -> Response:
        """`_post`, with the backend's access token if it sends tokens (Vertex AI): the
        one held (no wait but for the first, or after an outage), and once more with a
        new one if the provider refuses it (401), as when it was revoked."""
        tokens = backend.auth
        if tokens is None:
            return await self._post(backend, call, content, headers, first_byte)
        token = await tokens.token(self.client)
        response = await self._post(
            backend, call, content, [*headers, _bearer_of(token)], first_byte
        )
        if response.status != 401 or not tokens.refused(token):
            return response
        self.metrics.upstream_errors.labels(backend.id, "401").inc()
        await response.abort()
        self.slots.release(call.slot)
        token = await tokens.token(self.client)
        return await self._post(backend, call, content, [*headers, _bearer_of(token)], first_byte)

    async def _post(
        self,
        backend: Backend,
        call: Call,
        content: bytes,
        headers: list[tuple[bytes, bytes]],
        first_byte: float,
    ) -> Response:
        """One backend, with a slot of one of its upstreams held (`call.slot`, which the
        caller releases): the best by its routing (`_order`) with a free slot, else the
        best, waited for. A replica that refuses the connection (it died before the Endpoints
        said so) is skipped for the next one; nothing was sent yet."""
        slots, ident = self.slots, backend.id
        urls = self._order(backend, call)
        if len(urls) > 1:
            urls = [u for u in urls if slots.free(slot_key(ident, u))] or urls[:1]
        for attempt, url in enumerate(urls):
            slot = slot_key(ident, url)
            if not slots.take(slot) and not await slots.wait(slot, self.settings.pool_timeout):
                raise UpstreamSaturatedError
            try:
                response = await self.client.post(url + call.suffix, content, headers, first_byte)
            except UpstreamUnreachableError:
                slots.release(slot)
                if attempt == len(urls) - 1:
                    raise
                self.metrics.upstream_errors.labels(ident, "unreachable").inc()
                continue
            except BaseException:
                slots.release(slot)
                raise
            call.slot = slot
            return response
        raise AssertionError("unreachable: a backend without URLs is skipped before")

    def _order(self, backend: Backend, call: Call) -> list[str]:
        """The backend's ready URLs, best first: by prefix affinity if it asks for it,
        else fewest in flight (this replica's count, the slots held)."""
        urls, ident = backend.urls, backend.id
        if len(urls) == 1:
            return list(urls)

        def in_flight(url: str) -> int:
            return self.slots.in_flight(slot_key(ident, url))

        if backend.affinity is not None:
            key = balance.prefix_key(call.payload, backend.affinity)
            order, own = balance.by_prefix(urls, key, in_flight)
            self.metrics.routing.labels(ident, "affinity" if own else "affinity_spilled").inc()
            return order
        self.metrics.routing.labels(ident, "least_in_flight").inc()
        return balance.least_in_flight(urls, in_flight, next(self._turn))

    async def _hold(self, backend: Backend, call: Call) -> Backend | None:
        """Wait for a ready pod of an autoscaled backend that has none; the backend as
        the snapshot then has it, or None when the hold ends without one (timed out,
        over its cap, the backend gone). Counted as held meanwhile: demand the
        autoscaler sees, which is what scales a backend at zero up."""
        hold, ident, st = backend.hold, backend.id, self.settings
        assert hold is not None
        size = len(call.body)
        if (
            self.load.held(ident) >= hold.most
            or self.load.held_total >= st.max_held
            or self._held_bytes + size > st.max_held_bytes
        ):
            self.metrics.held.labels(ident, "over_cap").inc()
            return None
        wait = hold.timeout
        if hold.fallback_after is not None:
            wait = min(wait, hold.fallback_after)
        loop = asyncio.get_running_loop()
        began = loop.time()
        self.load.hold(ident)
        self._held_bytes += size
        try:
            while True:
                fresh = self._still_routed(ident, call)
                if fresh is None:
                    self.metrics.held.labels(ident, "gone").inc()
                    return None
                if fresh.urls:
                    self.metrics.held.labels(ident, "served").inc()
                    call.outcome.held = loop.time() - began
                    return fresh
                changed = self.source.changed()
                try:
                    async with asyncio.timeout_at(began + wait):
                        await changed.wait()
                except TimeoutError:
                    self.metrics.held.labels(ident, "timeout").inc()
                    return None
        finally:
            self._held_bytes -= size
            # Shown on /load for a second at least, so that the autoscaler sees it even
            # when it went to a fallback at once (fallbackAfterSeconds 0): the backend
            # still needs a pod.
            self.load.unhold(ident, linger=max(0.0, HELD_SHOWN_SECONDS - (loop.time() - began)))

    def _still_routed(self, ident: str, call: Call) -> Backend | None:
        """The backend as the current snapshot has it, if the caller may still reach it
        there: a hold lasts long enough for its key to be revoked, or the backend to
        change its model or go."""
        snapshot = self.source.snapshot
        tenant = snapshot.tenant(call.key)
        if tenant is None or call.tenant is None or tenant.id != call.tenant.id:
            return None
        if not tenant.may_use(call.model):
            return None
        return next((b for b in snapshot.candidates(tenant, call.model) if b.id == ident), None)

    async def _pass_through(
        self, response: Response, backend: Backend, call: Call, injected: bool = False
    ) -> None:
        """The upstream's status, headers and body, chunk by chunk as they arrive; an
        answer that breaks off is cut off for the client too (AnswerAbortedError). Its
        usage is read on the way (`usage`), and the usage chunk taken out if the gateway
        asked for it."""
        send, outcome = call.send, call.outcome
        outcome.backend, outcome.status = backend.id, response.status
        outcome.ttfb = time.perf_counter() - call.start
        headers = call.answer_headers or []
        meter = call.meter = _meter(response, call, backend, headers, injected)
        headers.append((BACKEND_HEADER, backend.id.encode()))
        complete = False
        try:
            outcome.started = True
            await send(
                {"type": "http.response.start", "status": response.status, "headers": headers}
            )
            if meter is None:
                async for chunk in response.body():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            else:
                async for chunk in response.body():
                    passed = meter.feed(chunk)
                    if passed:
                        await send(
                            {"type": "http.response.body", "body": passed, "more_body": True}
                        )
                rest = meter.end()
                if rest:
                    await send({"type": "http.response.body", "body": rest, "more_body": True})
                self._metered(meter, backend, call)
            complete = True
        except BrokenAnswerError as err:
            reason = "idle_timeout" if err.idle else "broken"
            self.metrics.upstream_errors.labels(backend.id, reason).inc()
            outcome.aborted = reason
            log.warning(
                "upstream %s broke off its answer (%s): the client's connection is closed",
                backend.id,
                err,
            )
            raise AnswerAbortedError(reason) from None
        finally:
            if complete:
                await response.close()
            else:
                await response.abort()  # the upstream sees its request cancelled
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _metered(self, meter: usage.Meter, backend: Backend, call: Call) -> None:
        """An answer passed on whole: what it used, and for a stream how fast it came."""
        used = meter.usage()
        if used is not None:
            used = _clamped(used, meter, call)
        call.outcome.tokens = used
        if used is None or not meter.stream or meter.first_token is None:
            return
        m, ident = self.metrics, backend.id
        m.ttft.labels(ident).observe(meter.first_token - call.start)
        after = time.perf_counter() - meter.first_token
        if used.completion > 1 and after > 0:
            m.token_rate.labels(ident).observe((used.completion - 1) / after)

    def _count(self, call: Call) -> None:
        """Tokens to the metrics and the key's tokens per minute. An answer that began
        with 200 but gave no usage (it was cut, its client left, or its upstream sends
        none) is counted as missing and charged an estimate, counted apart."""
        outcome = call.outcome
        if outcome.status != 200 or not outcome.started or outcome.backend == NONE:
            return
        if call.suffix not in usage.COUNTED_PATHS:
            return
        meter = call.meter
        used = outcome.tokens
        if used is None and meter is not None and (found := meter.usage()) is not None:
            used = outcome.tokens = _clamped(found, meter, call)  # came before a cut
        tokens = self.metrics.tokens
        if used is None:
            self.metrics.usage_missing.labels(outcome.backend).inc()
            used = usage.estimate(len(call.body), meter, usage.max_tokens_of(call.payload))
            tokens = self.metrics.tokens_estimated
        labels = (outcome.tenant, outcome.model, outcome.backend)
        if used.prompt:
            tokens.labels(*labels, "prompt").inc(used.prompt)
        if used.completion:
            tokens.labels(*labels, "completion").inc(used.completion)
        if call.tenant is not None:
            self.limits.charge(call.tenant, used.total)

    async def _refuse(self, send: Send, outcome: Outcome, err: HTTPError) -> None:
        """An error of the gateway's own; with a body left unread, the connection is
        closed after it (uvicorn does on `connection: close`) rather than read on."""
        if outcome.started:
            raise AnswerAbortedError(err.code) from err
        outcome.status = err.status
        body = err.body()
        headers = [*JSON, (b"content-length", b"%d" % len(body)), *err.headers]
        if outcome.body_unread:
            headers.append(CLOSE)
        outcome.started = True
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _unexpected(self, err: Exception, outcome: Outcome, path: str) -> None:
        """Log and count an error nobody expected: its type and where it was raised,
        never its message, which may quote a key or the request."""
        stage = "mid_answer" if outcome.started else "before_answer"
        self.metrics.unexpected_errors.labels(stage).inc()
        where = [
            f"{frame.filename}:{frame.lineno} in {frame.name}"
            for frame in traceback.extract_tb(err.__traceback__)
        ]
        log.error(
            "unexpected %s on %s (%s)",
            type(err).__name__,
            path,
            "the connection is closed" if outcome.started else "answered 502",
            extra={
                "fields": {
                    "path": path,
                    "error": type(err).__qualname__,
                    "where": where,
                    "stage": stage,
                    "tenant": outcome.tenant,
                    "tried": outcome.tried,
                }
            },
        )

    def _record(self, outcome: Outcome, path: str, elapsed: float) -> None:
        m = self.metrics
        m.requests.labels(outcome.model, outcome.tenant, outcome.backend, str(outcome.status)).inc()
        if outcome.model not in (NONE, UNKNOWN):
            m.latency.labels(outcome.model, outcome.tenant).observe(elapsed)
            if outcome.ttfb is not None:
                m.ttfb.labels(outcome.model, outcome.tenant).observe(outcome.ttfb)
        if self.settings.access_log:
            fields: dict[str, Any] = {
                "path": path,
                "status": outcome.status,
                "model": outcome.asked or NONE,
                "tenant": outcome.tenant,
                "backend": outcome.backend,
                "tried": outcome.tried,
                "ms": round(elapsed * 1000, 2),
                "ttfb_ms": round(outcome.ttfb * 1000, 2) if outcome.ttfb else None,
            }
            if outcome.aborted:
                fields["aborted"] = outcome.aborted
            if outcome.held is not None:
                fields["held_ms"] = round(outcome.held * 1000, 2)
            log.info("%s %s", path, outcome.status, extra={"fields": fields})


def _unpassable(response: Response, call: Call) -> str | None:
    """Why an upstream's answer cannot be passed on as it is (None: it can, and its
    headers to pass on are in `call.answer_headers`)."""
    if not 200 <= response.status <= 599:
        return f"status {response.status}"
    passed: list[tuple[bytes, bytes]] = []
    call.answer_headers = passed
    for name, value in response.headers:
        if not name or name.translate(None, _TOKEN):  # what is left is not a token
            return "a header name that is not a token"
        if _BAD_HEADER_VALUE.search(value):
            return "a control character in a header value"
        if name.lower() not in HOP_BY_HOP:
            passed.append((name, value))
    return None


def _content(call: Call, backend: Backend) -> tuple[bytes, bool]:
    """The body for this backend (the client's, unless the backend's own model name goes
    in, or the usage chunk is asked for), and whether the usage chunk was asked for."""
    inject = (
        call.stream and not call.client_usage and usage.injectable(backend.remote, backend.provider)
    )
    rename = bool(backend.upstream_model) and backend.upstream_model != call.model
    if not (inject or rename):
        return call.body, False
    if inject and not _utf8_object(call.body):
        # UTF-16 or -32 (json.loads takes them): the option is not put into bytes of
        # another encoding; the body goes as it came and what comes is counted.
        inject = False
        if not rename:
            return call.body, False
    if inject and not rename and "stream_options" not in call.payload:
        # The client's bytes with the option put first: nothing else re-encoded.
        return usage.ask_usage(call.body), True
    sent = usage.with_usage(call.payload) if inject else call.payload
    if rename:
        sent = {**sent, "model": backend.upstream_model}
    return json.dumps(sent).encode(), inject


def _utf8_object(body: bytes) -> bool:
    """A JSON object in UTF-8 (a BOM allowed): NUL is in no UTF-8 JSON text, and in every
    UTF-16 or -32 one."""
    if b"\x00" in body:
        return False
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        return False
    return text.lstrip(" \t\r\n")[:1] == "{"


def _meter(
    response: Response,
    call: Call,
    backend: Backend,
    headers: list[tuple[bytes, bytes]],
    injected: bool,
) -> usage.Meter | None:
    """What reads the answer's usage: none for an error, an encoded body, or a path
    that has none; with a Content-Length, a stream's bytes are never edited."""
    if response.status != 200 or call.suffix not in usage.COUNTED_PATHS:
        return None
    length = events = False
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-encoding" and value.strip().lower() != b"identity":
            return None
        if lower == b"content-length":
            length = True
        elif lower == b"content-type":
            events = value.lower().startswith(b"text/event-stream")
    if events:  # whatever the request said: what comes is a stream
        strip = injected and not length
        null = strip and backend.provider in usage.NULL_USAGE_PROVIDERS
        return usage.StreamMeter(strip=strip, strip_null=null)
    return usage.BodyMeter()


def _clamped(used: usage.Usage, meter: usage.Meter, call: Call) -> usage.Usage:
    return usage.clamped(used, len(call.body), meter.bytes, usage.max_tokens_of(call.payload))


def _over_limit(tenant: Tenant, refusal: Refusal) -> HTTPError:
    """As OpenAI answers it: type `requests` or `tokens`, code rate_limit_exceeded."""
    per = "requests per min (RPM)" if refusal.kind == "requests" else "tokens per min (TPM)"
    wait = ceil_seconds(refusal.retry_after)
    return HTTPError(
        429,
        f"Rate limit reached for tenant '{tenant.name}' on {per}: Limit {refusal.limit}, "
        f"Used {refusal.used}. Please try again in {wait}s.",
        refusal.kind,
        "rate_limit_exceeded",
        [(b"retry-after", str(wait).encode())],
    )


def _bearer_of(token: str) -> tuple[bytes, bytes]:
    return (b"authorization", b"Bearer " + token.encode())


def _too_large(limit: int) -> HTTPError:
    return HTTPError(
        413,
        f"request body over {limit / MIB:g} MiB",
        "invalid_request_error",
        "body_too_large",
    )


def _body_framing(scope: Scope) -> tuple[int | None, bool]:
    """(Content-Length if given, whether a body is coming)."""
    length: int | None = None
    chunked = False
    for name, value in scope["headers"]:
        if name == b"content-length":
            length = int(value)  # the HTTP parser took digits only
        elif name == b"transfer-encoding":
            chunked = True
    return length, chunked or bool(length)


def _bearer(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            text: str = value.decode("latin-1")
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise HTTPError(499, "client went away", "invalid_request_error", "disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
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
    body = json.dumps(data).encode()
    headers = [*JSON, (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
