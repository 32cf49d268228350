"""Requests-per-minute per tenant: a token bucket per gateway process.

A bucket holds at most `rpm` tokens and refills `rpm` per minute, so a tenant may burst
up to its minute's allowance and then proceeds at the steady rate. Limits are per
replica: with N gateway replicas a tenant gets up to N x rpm.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, when)

    def take(self, tenant: str, rpm: int) -> float:
        """0 if the request may go now, else the seconds until it may (Retry-After)."""
        now = self.clock()
        tokens, when = self._buckets.get(tenant, (float(rpm), now))
        tokens = min(float(rpm), tokens + (now - when) * rpm / 60.0)
        if tokens >= 1.0:
            self._buckets[tenant] = (tokens - 1.0, now)
            return 0.0
        self._buckets[tenant] = (tokens, now)
        return (1.0 - tokens) * 60.0 / rpm
