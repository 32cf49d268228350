"""Per-key limits shared by every gateway replica through Redis, falling back to each
replica's own (`ratelimit`) whenever Redis does not answer in time.

Each tenant has, per minute, a request counter and a token counter in Redis, named
`fabric:limits:{H}:r:<minute>` / `:t:<minute>` where H is a hash of the tenant's id (its
key Secret's uid): never the key. A limit holds over a sliding minute, estimated from
this minute's count and the last one's, weighted by how much of it is still inside the
window (Cloudflare's "sliding window counter"). The minute comes from Redis's clock
(`TIME` in the script), so replicas agree on it.

The request path makes one round trip at most: one script checks the token counter,
checks and counts the request, and says by how much a refused one was over. Tokens are
added once the answer ended, off the request path: summed per tenant and sent every
CHARGE_SECONDS (one pipelined round trip then, not one per answer), so a limit sees
another replica's answers at most that much later. A round trip that takes longer than
`timeout` (50 ms), or fails, or answers something the script never returns, falls back
to the per-replica limits for that request; FAILURES_TO_OPEN such round trips in a row
open the circuit: from then on every request uses the per-replica limits at once,
without trying Redis, and a probe (the admit script itself, a second apart, with no
limit, so it counts nothing) closes it again when Redis answers. A charge Redis refuses
(an error reply) is counted and dropped: it says nothing about Redis's health. Each
transition is logged once and shown in `fabric_gateway_limiter_shared` and `/readyz`;
readiness never depends on Redis.
Redis Cluster is not supported (a tenant's keys are made inside the script).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

log = logging.getLogger(__name__)

WINDOW = 60.0
PREFIX = "fabric:limits"
PROBE_SECONDS = 1.0
CONNECT_SECONDS = 1.0  # to (re)connect, apart from the round trip's timeout
FAILURES_TO_OPEN = 3  # failed round trips in a row that open the circuit
CHARGE_SECONDS = 0.05

# KEYS[1]: the tenant's prefix. ARGV: rpm, tpm (0: no such limit), the tokens the
# request is estimated to take (at least 1; absent: 1). Returns {0} when the
# request may go (and counts it), else {1 (requests) or 2 (tokens), this minute's count,
# the last minute's, seconds into this minute}, the numbers as strings (Lua's floats).
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local w = math.floor(now / 60)
local into = now - w * 60
local weight = (60 - into) / 60
local p = KEYS[1]
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local need = tonumber(ARGV[3] or '1')
if tpm > 0 then
  local cur = tonumber(redis.call('GET', p .. ':t:' .. w) or '0')
  local prev = tonumber(redis.call('GET', p .. ':t:' .. (w - 1)) or '0')
  if prev * weight + cur + need > tpm then
    return {2, tostring(cur), tostring(prev), tostring(into)}
  end
end
if rpm > 0 then
  local key = p .. ':r:' .. w
  local cur = tonumber(redis.call('GET', key) or '0')
  local prev = tonumber(redis.call('GET', p .. ':r:' .. (w - 1)) or '0')
  if prev * weight + cur + 1 > rpm then
    return {1, tostring(cur), tostring(prev), tostring(into)}
  end
  redis.call('INCR', key)
  redis.call('EXPIRE', key, 150)
end
return {0}
"""

# KEYS[1]: the tenant's prefix; ARGV[1]: tokens used.
CHARGE = """
local t = redis.call('TIME')
local key = KEYS[1] .. ':t:' .. math.floor(tonumber(t[1]) / 60)
redis.call('INCRBY', key, ARGV[1])
redis.call('EXPIRE', key, 150)
return 1
"""


@dataclass(frozen=True)
class Refusal:
    kind: str  # "requests" or "tokens"
    limit: int
    used: int  # the estimate over the sliding minute
    retry_after: float


def tenant_prefix(tenant_id: str) -> str:
    digest = hashlib.sha256(tenant_id.encode()).hexdigest()[:24]
    return f"{PREFIX}:{{{digest}}}"


def window_wait(cur: float, prev: float, into: float, limit: int) -> float:
    """Seconds until `prev * weight + cur + 1 <= limit` holds, the weight falling from 1
    to 0 over the minute: later this minute if this minute's count leaves room, else
    after it (when this minute's count becomes the last one's)."""
    room = limit - 1 - cur
    if room >= 0:
        if prev <= room:
            return 0.0
        return max(0.0, WINDOW * (1 - room / prev) - into)
    room = limit - 1
    later = 0.0 if cur <= room else WINDOW * (1 - room / cur)
    return WINDOW - into + later


def where(url: str) -> str:
    """host:port of a Redis URL, for logs: never its password."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    return f"{parts.hostname or '?'}:{port or 6379}"


class SharedLimits:
    """The Redis side; `admit` and `charge` return None / do nothing while the circuit
    is open, and the caller uses the per-replica limits."""

    def __init__(
        self,
        url: str,
        password: str | None = None,
        timeout: float = 0.05,
        on_change: Any = None,
    ) -> None:
        self.where, self.timeout = where(url), timeout
        self.client = aioredis.Redis.from_url(
            url,
            password=password or None,
            socket_timeout=timeout,
            socket_connect_timeout=max(timeout, CONNECT_SECONDS),
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._admit = self.client.register_script(ADMIT)
        self._charge = self.client.register_script(CHARGE)
        self.up = False
        self.why = "not connected yet"
        self.errors = 0  # failed round trips (a metric reads it)
        self._failures = 0  # failed round trips in a row
        self._on_change = on_change  # called with (up: bool) on each transition
        self._probe: asyncio.Task[None] | None = None
        self._charges: set[asyncio.Task[None]] = set()
        self._owed: dict[str, int] = {}  # tenant prefix -> tokens not sent yet

    async def start(self) -> None:
        """Probe until Redis answers (until then the limits are per replica)."""
        self._open("not connected yet", first=True)

    async def close(self) -> None:
        tasks = [t for t in (self._probe, *self._charges) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.client.aclose()

    async def admit(
        self, prefix: str, rpm: int | None, tpm: int | None, need: int = 1
    ) -> Refusal | bool | None:
        """True: admitted (and counted); a Refusal; None: Redis did not answer (the
        caller decides with its own limits)."""
        if not self.up:
            return None
        try:
            async with asyncio.timeout(self.timeout):
                got = await self._admit(keys=[prefix], args=[rpm or 0, tpm or 0, need])
            refusal = _refusal(got, rpm, tpm, need)  # a reply that is no answer fails too
        except Exception as err:  # whatever it is, the limits go local
            self._failed(err)
            return None
        self._failures = 0
        return True if refusal is None else refusal

    def charge(self, prefix: str, tokens: int) -> None:
        """Add an answer's tokens, in the background (within CHARGE_SECONDS)."""
        if not self.up or tokens <= 0:
            return
        if not self._owed:
            task = asyncio.get_running_loop().create_task(self._send_owed())
            self._charges.add(task)
            task.add_done_callback(self._charges.discard)
        self._owed[prefix] = self._owed.get(prefix, 0) + tokens

    async def _send_owed(self) -> None:
        await asyncio.sleep(CHARGE_SECONDS)
        owed, self._owed = self._owed, {}
        try:
            async with asyncio.timeout(self.timeout * 4):
                async with self.client.pipeline(transaction=False) as pipe:
                    for prefix, tokens in owed.items():
                        await self._charge(keys=[prefix], args=[tokens], client=pipe)
                    await pipe.execute()
        except aioredis.ResponseError as err:
            # Redis answered, refusing a charge (a count over its integers, a key of
            # another type): the tokens are lost, the limits stay shared.
            self.errors += 1
            log.warning("redis %s refused a charge (%s)", self.where, type(err).__name__)
        except Exception as err:
            self._failed(err)
        else:
            self._failures = 0

    def _failed(self, err: BaseException) -> None:
        self.errors += 1
        self._failures += 1
        if self.up and self._failures < FAILURES_TO_OPEN:
            return
        why = (
            "timed out"
            if isinstance(err, TimeoutError | aioredis.TimeoutError)
            else (type(err).__name__)
        )
        self._open(why)

    def _open(self, why: str, *, first: bool = False) -> None:
        was = self.up
        self.up, self.why = False, why
        if was:
            log.warning(
                "shared rate limits off: redis %s %s; limits are per replica until it answers",
                self.where,
                why,
            )
        elif first:
            log.info("shared rate limits: connecting to redis %s", self.where)
        if was and self._on_change is not None:
            self._on_change(False)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probing())

    async def _probing(self) -> None:
        said = False
        while True:
            try:
                async with asyncio.timeout(max(self.timeout, CONNECT_SECONDS)):
                    _refusal(await self._admit(keys=[PREFIX + ":probe"], args=[0, 0]), 0, 0)
            except Exception as err:
                if not said:
                    log.warning(
                        "redis %s does not answer (%s): limits are per replica",
                        self.where,
                        type(err).__name__,
                    )
                    said = True
                await asyncio.sleep(PROBE_SECONDS)
                continue
            self.up, self.why, self._failures = True, "", 0
            log.info("shared rate limits on: redis %s answers", self.where)
            if self._on_change is not None:
                self._on_change(True)
            return

    def status(self) -> dict[str, Any]:
        return {
            "shared": self.up,
            "redis": self.where,
            **({} if self.up else {"degraded": f"per-replica limits: redis {self.why}"}),
        }


def _refusal(got: Any, rpm: int | None, tpm: int | None, need: int = 1) -> Refusal | None:
    """The admit script's reply: None (admitted) or a Refusal; ValueError if it is not
    one the script returns (nil, a short list, no numbers)."""
    try:
        kind = int(got[0])
        if kind == 0:
            return None
        cur, prev, into = float(got[1]), float(got[2]), float(got[3])
    except (TypeError, IndexError, KeyError, ValueError) as err:
        raise ValueError("not a reply of the admit script") from err
    limit = rpm if kind == 1 else tpm if kind == 2 else None
    if not limit or not (0 <= into <= WINDOW) or min(cur, prev) < 0:
        raise ValueError("not a reply of the admit script")
    weight = (WINDOW - into) / WINDOW
    return Refusal(
        "requests" if kind == 1 else "tokens",
        limit,
        int(prev * weight + cur),
        # `need` tokens fit where one does in a limit `need - 1` lower
        max(1.0, window_wait(cur, prev, into, limit - (need - 1 if kind == 2 else 0))),
    )


def ceil_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds))
