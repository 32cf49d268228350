"""Requests-per-minute per tenant: a token bucket per gateway process.

A bucket holds at most `rpm` tokens and refills `rpm` per minute, so a tenant may burst
up to its minute's allowance and then proceeds at the steady rate. Limits are per
replica: with N gateway replicas a tenant gets up to N x rpm.

Buckets are keyed by the key's identity (its Secret's uid), and a team may make and drop
key Secrets at will; a bucket untouched for a minute is full again, the same as none, so
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
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, when)
        self._sweep_at = 64  # bucket count that triggers the next sweep

    def take(self, tenant: str, rpm: int) -> float:
        """0 if the request may go now, else the seconds until it may (Retry-After)."""
        now = self.clock()
        tokens, when = self._buckets.get(tenant, (float(rpm), now))
        tokens = min(float(rpm), tokens + (now - when) * rpm / REFILL_SECONDS)
        if tokens >= 1.0:
            self._buckets[tenant] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[tenant] = (tokens, now)
            wait = (1.0 - tokens) * REFILL_SECONDS / rpm
        if len(self._buckets) >= self._sweep_at:
            self._sweep(now)
        return wait

    def _sweep(self, now: float) -> None:
        self._buckets = {
            t: (tokens, when)
            for t, (tokens, when) in self._buckets.items()
            if now - when < REFILL_SECONDS
        }
        self._sweep_at = max(64, 2 * len(self._buckets))

    def __len__(self) -> int:
        return len(self._buckets)
