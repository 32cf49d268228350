"""The gateway's Prometheus metrics, by model and tenant (never by key).

No label takes a value a client writes, so no client can make series without end:

- `model`: a model that routed for the caller's key (its candidates exist and its key may
  use it); `unknown` for any other name a request carried, `-` when none was read (a
  refusal before the body, /v1/models). Models are the LLMBackends' (or the file's).
- `tenant`: the key's name, `namespace/secret-name` (or the file's name), `-` without a
  known key; `backend`, `from_backend`, `to_backend`: backend ids of the snapshot.
- `code`: the status answered; an upstream's passes through only if it is 200 to 599.
- `reason`, `stage`, `kind`, `limit`: fixed sets, listed with each metric.

Token counts are the upstreams' own (`usage` of each answer: see `usage`), by tenant,
model and backend, so "tokens per team per model over a period" is one PromQL query
(README "Usage and limits").
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from fabric_operator.gateway.load import Load

# Buckets from 1 ms (a cached answer) to 10 min (a long generation).
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 600)
# Tokens per second of a stream after its first token: a CPU engine's few to a GPU's
# hundreds.
RATE_BUCKETS = (1, 2.5, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 500, 1000, 2500)
UNKNOWN = "unknown"  # the model label of a request whose model did not route for its key
NONE = "-"  # no model, tenant or backend (yet)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        kw = {"registry": registry} if registry is not None else {}
        self.requests = Counter(
            "fabric_gateway_requests",
            "Requests answered, by model (routed ones only, else 'unknown' or '-'), tenant, "
            "backend that answered and HTTP status.",
            ["model", "tenant", "backend", "code"],
            **kw,  # type: ignore[arg-type]
        )
        self.latency = Histogram(
            "fabric_gateway_request_duration_seconds",
            "Time from the request to the last byte of the answer (routed requests).",
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
            "Upstream attempts that failed: unreachable, timeout (no first byte in time), "
            "saturated (no free connection in time), bad_response (not HTTP we can pass "
            "on), no_ready_endpoint, unusable_key (a Vertex key that is none), auth (no "
            "access token), the HTTP status (429, 5xx; 401: a token refused, retried with a "
            "new one); and answers that broke "
            "after they began: broken, idle_timeout.",
            ["backend", "reason"],
            **kw,  # type: ignore[arg-type]
        )
        self.fallbacks = Counter(
            "fabric_gateway_fallbacks",
            "Requests passed on from one backend to the next.",
            ["model", "from_backend", "to_backend"],
            **kw,  # type: ignore[arg-type]
        )
        self.client_disconnects = Counter(
            "fabric_gateway_client_disconnects",
            "Clients that went away before their answer ended; the upstream request was "
            "cancelled (its connection closed).",
            ["backend"],
            **kw,  # type: ignore[arg-type]
        )
        self.routing = Counter(
            "fabric_gateway_routing_decisions",
            "Pods picked for a backend with more than one ready pod, by how: "
            "least_in_flight, affinity (the prefix's own pod), affinity_spilled (its own "
            "pod was over the load bound).",
            ["backend", "decision"],
            **kw,  # type: ignore[arg-type]
        )
        self.held = Counter(
            "fabric_gateway_held_requests",
            "Requests held for an autoscaled backend without a ready pod, by how the hold "
            "ended: served, timeout (then a fallback or 503), over_cap (not held: 503 or a "
            "fallback at once), gone (the backend was deleted).",
            ["backend", "outcome"],
            **kw,  # type: ignore[arg-type]
        )
        self.tokens = Counter(
            "fabric_gateway_tokens",
            "Tokens of answers as the upstream's usage counts them, by tenant, model, "
            "backend that answered and kind (prompt, completion). Streams included (the "
            "gateway asks for the usage chunk when the client did not).",
            ["tenant", "model", "backend", "kind"],
            **kw,  # type: ignore[arg-type]
        )
        self.tokens_estimated = Counter(
            "fabric_gateway_tokens_estimated",
            "Tokens charged for answers without usage (cut off, left by the client, or "
            "from an upstream that sends none): the prompt at 4 bytes a token, the "
            "completion as the events with tokens seen (4 bytes a token if not a stream), "
            "at most max_tokens. Not in fabric_gateway_tokens_total.",
            ["tenant", "model", "backend", "kind"],
            **kw,  # type: ignore[arg-type]
        )
        self.usage_missing = Counter(
            "fabric_gateway_usage_missing",
            "Answers (200) whose tokens could not be counted: the upstream sent no usage, "
            "or the answer broke off or the client left before it.",
            ["backend"],
            **kw,  # type: ignore[arg-type]
        )
        self.ttft = Histogram(
            "fabric_gateway_time_to_first_token_seconds",
            "Streams: time from the request to the first chunk with a token (content, "
            "a tool call or reasoning), by backend.",
            ["backend"],
            buckets=BUCKETS,
            **kw,  # type: ignore[arg-type]
        )
        self.token_rate = Histogram(
            "fabric_gateway_tokens_per_second",
            "Streams: completion tokens per second after the first token, by backend.",
            ["backend"],
            buckets=RATE_BUCKETS,
            **kw,  # type: ignore[arg-type]
        )
        self.rate_limited = Counter(
            "fabric_gateway_rate_limited",
            "Requests refused with 429 by a key's limit: limit=requests (rpm) or tokens (tpm).",
            ["tenant", "limit"],
            **kw,  # type: ignore[arg-type]
        )
        self.unexpected_errors = Counter(
            "fabric_gateway_unexpected_errors",
            "Errors the gateway did not expect (a bug): answered with a 502 "
            "(stage=before_answer) or by closing the connection (stage=mid_answer).",
            ["stage"],
            **kw,  # type: ignore[arg-type]
        )


class LoadCollector(Collector):
    """In flight and held per backend, read from the proxy's counters at scrape time
    (nothing more on the request path)."""

    def __init__(self, load: Load) -> None:
        self.load = load

    def collect(self) -> Iterator[GaugeMetricFamily]:
        in_flight = GaugeMetricFamily(
            "fabric_gateway_in_flight_requests",
            "Requests this replica has in flight to each backend.",
            labels=["backend"],
        )
        held = GaugeMetricFamily(
            "fabric_gateway_held_requests_now",
            "Requests this replica holds for each backend without a ready pod.",
            labels=["backend"],
        )
        backends = self.load.report()["backends"]
        assert isinstance(backends, dict)
        for ident, counts in backends.items():
            in_flight.add_metric([ident], counts["inFlight"])
            held.add_metric([ident], counts["held"])
        yield in_flight
        yield held
