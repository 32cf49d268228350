"""The gateway's Prometheus metrics, by model and tenant (never by key)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

# Buckets from 1 ms (a cached answer) to 10 min (a long generation).
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 600)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kw = {"registry": registry} if registry is not None else {}
        self.requests = Counter(
            "fabric_gateway_requests",
            "Requests answered, by model, tenant, backend that answered and HTTP status.",
            ["model", "tenant", "backend", "code"],
            **kw,  # type: ignore[arg-type]
        )
        self.latency = Histogram(
            "fabric_gateway_request_duration_seconds",
            "Time from the request to the last byte of the answer.",
            ["model", "tenant"],
            buckets=BUCKETS,
            **kw,  # type: ignore[arg-type]
        )
        self.ttfb = Histogram(
            "fabric_gateway_time_to_first_byte_seconds",
            "Time from the request to the first byte of the upstream's answer.",
            ["model", "tenant"],
            buckets=BUCKETS,
            **kw,  # type: ignore[arg-type]
        )
        self.upstream_errors = Counter(
            "fabric_gateway_upstream_errors",
            "Upstream attempts that failed: unreachable, timeout, no_ready_endpoint, or the "
            "HTTP status (429, 5xx).",
            ["backend", "reason"],
            **kw,  # type: ignore[arg-type]
        )
        self.fallbacks = Counter(
            "fabric_gateway_fallbacks",
            "Requests passed on from one backend to the next.",
            ["model", "from_backend", "to_backend"],
            **kw,  # type: ignore[arg-type]
        )
