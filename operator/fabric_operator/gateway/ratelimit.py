"""Requests and tokens per minute per tenant: token buckets in one gateway process.

A bucket holds at most `rpm` tokens and refills `rpm` per minute, so a tenant may burst
up to its minute's allowance and then proceeds at the steady rate. A tokens-per-minute
bucket is the same with `tpm`, charged after an answer with the tokens it used (it may
go below zero, down to a minute's allowance of debt) and checked before a request (none
goes while it is below one). These are the per-replica limits: with N gateway replicas a
tenant gets up to N x rpm, unless the limits are shared (`sharedlimit`), which falls back
to these when Redis cannot be reached.

Buckets are keyed by the key's identity (its Secret's uid), and a team may make and drop
key Secrets at will; a bucket that has filled up again is the same as none, so
such buckets are dropped once there are twice as many as after the last sweep: memory
follows the keys in use, not every key there ever was.
"""

from __future__ import annotations

import time
from collections.abc import Callable

REFILL_SECONDS = 60.0


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        # tenant -> (tokens, when, when it is full again)
        self._buckets: dict[str, tuple[float, float, float]] = {}
        self._sweep_at = 64  # bucket count that triggers the next sweep

    def take(self, tenant: str, rpm: int) -> float:
        """0 if the request may go now, else the seconds until it may (Retry-After)."""
        now = self.clock()
        tokens = self._level(tenant, rpm, now)
        if tokens >= 1.0:
            tokens -= 1.0
            wait = 0.0
        else:
            wait = (1.0 - tokens) * REFILL_SECONDS / rpm
        self._buckets[tenant] = (tokens, now, now + (rpm - tokens) * REFILL_SECONDS / rpm)
        if len(self._buckets) >= self._sweep_at:
            self._sweep(now)
        return wait

    def waiting(self, tenant: str, rate: int, need: float = 1.0) -> float:
        """0 if the bucket holds `need` tokens now, else the seconds until it will."""
        tokens = self._level(tenant, rate, self.clock())
        return 0.0 if tokens >= need else (need - tokens) * REFILL_SECONDS / rate

    def spend(self, tenant: str, rate: int, amount: float) -> None:
        """Take `amount` (tokens an answer used), down to -rate at most."""
        now = self.clock()
        tokens = max(-float(rate), self._level(tenant, rate, now) - amount)
        self._buckets[tenant] = (tokens, now, now + (rate - tokens) * REFILL_SECONDS / rate)
        if len(self._buckets) >= self._sweep_at:
            self._sweep(now)

    def _level(self, tenant: str, rate: int, now: float) -> float:
        tokens, when, _ = self._buckets.get(tenant, (float(rate), now, now))
        return min(float(rate), tokens + (now - when) * rate / REFILL_SECONDS)

    def _sweep(self, now: float) -> None:
        self._buckets = {t: b for t, b in self._buckets.items() if now < b[2]}
        self._sweep_at = max(64, 2 * len(self._buckets))

    def __len__(self) -> int:
        return len(self._buckets)
