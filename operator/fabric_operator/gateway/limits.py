"""A key's limits as the request path sees them: requests and tokens per minute, shared
between the gateway replicas when Redis is configured and answers (`sharedlimit`),
else this replica's own (`ratelimit`). The replica's buckets are kept current while
the limits are shared, so a fallback starts from what this replica has seen."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fabric_operator.gateway.ratelimit import RateLimiter
from fabric_operator.gateway.routes import Tenant
from fabric_operator.gateway.sharedlimit import Refusal, SharedLimits, tenant_prefix

TOKENS = "\x00tpm"  # suffix of a tenant's tokens bucket in the local limiter


@functools.lru_cache(maxsize=4096)
def _prefix(tenant_id: str) -> str:
    return tenant_prefix(tenant_id)


class Limits:
    def __init__(
        self, shared: SharedLimits | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.local = RateLimiter(clock)
        self.shared = shared

    async def admit(self, tenant: Tenant, need: int = 1) -> Refusal | None:
        """None if the request may go (it is counted), else why not and for how long.
        `need`: the tokens the request is estimated to take, which must fit the key's
        tpm (capped at the tpm, so that any request fits an unused minute)."""
        rpm, tpm = tenant.rpm, tenant.tpm
        if rpm is None and tpm is None:
            return None
        need = max(1, min(need, tpm or 1))
        shared = self.shared
        if shared is not None and shared.up:
            got = await shared.admit(_prefix(tenant.id), rpm, tpm, need)
            if got is True:
                if rpm is not None:
                    self.local.take(tenant.id, rpm)
                return None
            if isinstance(got, Refusal):
                return got
        if tpm is not None:
            wait = self.local.waiting(tenant.id + TOKENS, tpm, need)
            if wait > 0:
                return Refusal("tokens", tpm, tpm, wait)
        if rpm is not None:
            wait = self.local.take(tenant.id, rpm)
            if wait > 0:
                return Refusal("requests", rpm, rpm, wait)
        return None

    def charge(self, tenant: Tenant, tokens: int) -> None:
        """The tokens an answer used, against the key's tokens per minute."""
        if tenant.tpm is None or tokens <= 0:
            return
        self.local.spend(tenant.id + TOKENS, tenant.tpm, tokens)
        if self.shared is not None:
            self.shared.charge(_prefix(tenant.id), tokens)

    def status(self) -> dict[str, Any]:
        if self.shared is None:
            return {"shared": False, "redis": None}
        return self.shared.status()


class LimitsCollector(Collector):
    """Read at scrape time: nothing on the request path."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        shared = self.limits.shared
        gauge = GaugeMetricFamily(
            "fabric_gateway_limiter_shared",
            "1 while the per-key limits are shared through Redis, 0 while they are per "
            "replica (Redis not configured, or not answering in time).",
        )
        gauge.add_metric([], 1.0 if shared is not None and shared.up else 0.0)
        yield gauge
        errors = CounterMetricFamily(
            "fabric_gateway_limiter_redis_errors",
            "Round trips to Redis that failed or timed out (each one switches the limits "
            "to per replica until a probe gets an answer).",
        )
        errors.add_metric([], float(shared.errors if shared is not None else 0))
        yield errors
