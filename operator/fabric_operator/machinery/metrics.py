"""Prometheus metrics of the controller, served by a small aiohttp server of our own.

kopf's /healthz caches probe results for 10 s; these figures are read live, so tests and
benchmarks can count requests exactly. They are read from the controller's `health()`
(the figures /healthz reports), so this module imports nothing of the controller; only
the metric names and help texts are the operator's.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

from aiohttp import web


class Sample(NamedTuple):
    """One sample of a metric family a component of the controller adds (the autoscaler)."""

    name: str
    type: str  # gauge or counter
    help: str
    labels: tuple[tuple[str, str], ...]
    value: float


class Healthy(Protocol):
    """What the metrics are read from: the controller's health report, and the samples
    of its other parts."""

    def health(self) -> dict[str, Any]: ...

    def samples(self) -> list[Sample]: ...


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def sample_lines(samples: list[Sample]) -> list[str]:
    """Samples in the text format, HELP and TYPE once per family, families in order."""
    lines: list[str] = []
    told: set[str] = set()
    for sample in samples:
        if sample.name not in told:
            told.add(sample.name)
            lines += [
                f"# HELP {sample.name} {sample.help}",
                f"# TYPE {sample.name} {sample.type}",
            ]
        labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sample.labels)
        lines.append(
            f"{sample.name}{{{labels}}} {sample.value:g}"
            if labels
            else f"{sample.name} {sample.value:g}"
        )
    return lines


def exposition(controller: Healthy) -> str:
    """The Prometheus text format (version 0.0.4)."""
    health = controller.health()
    lines = [
        "# HELP fabric_operator_backends LLMBackends the operator watches.",
        "# TYPE fabric_operator_backends gauge",
        f"fabric_operator_backends {health['backends']}",
        "# HELP fabric_operator_queue_depth LLMBackends waiting for a reconcile.",
        "# TYPE fabric_operator_queue_depth gauge",
        f"fabric_operator_queue_depth {health['queued']}",
        "# HELP fabric_operator_apiserver_reachable 1 while the API server answers GET /version.",
        "# TYPE fabric_operator_apiserver_reachable gauge",
        f"fabric_operator_apiserver_reachable {int(bool(health['apiServer']['reachable']))}",
        "# HELP fabric_operator_leading 1 while this replica holds the Lease (or runs alone).",
        "# TYPE fabric_operator_leading gauge",
        f"fabric_operator_leading {int(health['leading'])}",
        "# HELP fabric_operator_reconciles_total Reconciles run.",
        "# TYPE fabric_operator_reconciles_total counter",
        f"fabric_operator_reconciles_total {health['reconciles']}",
        "# HELP fabric_operator_reconcile_errors_total Reconciles that failed and were retried.",
        "# TYPE fabric_operator_reconcile_errors_total counter",
        f"fabric_operator_reconcile_errors_total {health['errors']}",
        "# HELP fabric_operator_api_requests_total API requests the operator made.",
        "# TYPE fabric_operator_api_requests_total counter",
    ]
    for key, count in sorted(health["apiRequests"].items()):
        verb, resource = key.split(" ", 1)
        lines.append(
            f'fabric_operator_api_requests_total{{verb="{verb}",resource="{resource}"}} {count}'
        )
    lines += sample_lines(controller.samples())
    return "\n".join(lines) + "\n"


async def serve(controller: Healthy, host: str, port: int) -> web.AppRunner:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            text=exposition(controller),
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Content-Type-Options": "nosniff"},
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def parse(text: str) -> dict[str, float]:
    """Samples of an exposition by full name with labels: for tests and benchmarks."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def api_requests(text: str) -> int:
    return int(
        sum(v for k, v in parse(text).items() if k.startswith("fabric_operator_api_requests_total"))
    )
