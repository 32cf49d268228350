"""The gateway's second port, for the platform and not for tenants: Prometheus
`/metrics` and the autoscaler's `/load` (`?watch=1` streams it). On the event loop of
the proxy, because `/load` reads the proxy's own counters."""

from __future__ import annotations

import contextlib

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fabric_operator.gateway.load import Load

MAX_WATCHERS = 64
MAX_PER_PEER = 4


def app(load: Load) -> web.Application:
    peers: dict[str, int] = {}  # open streams per client address

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"content-type": CONTENT_TYPE_LATEST})

    async def load_report(request: web.Request) -> web.StreamResponse:
        if request.query.get("watch") not in ("1", "true"):
            return web.json_response(load.report())
        peer = request.remote or "?"
        if load.watchers >= MAX_WATCHERS or peers.get(peer, 0) >= MAX_PER_PEER:
            # Every change wakes every stream: whoever reaches this port cannot make
            # that cost grow without bound, and one peer cannot take every place (the
            # operator's leader needs one).
            return web.json_response(
                {"error": "too many load streams open"}, status=503, headers={"retry-after": "5"}
            )
        peers[peer] = peers.get(peer, 0) + 1
        try:
            response = web.StreamResponse(headers={"content-type": "application/x-ndjson"})
            await response.prepare(request)
            # Closed at once when the reader goes (the write fails), not when collected:
            # each open stream is woken by every change.
            async with contextlib.aclosing(load.watch()) as lines:
                with contextlib.suppress(ConnectionResetError):
                    async for line in lines:
                        await response.write(line)
            return response
        finally:
            peers[peer] -= 1
            if not peers[peer]:
                del peers[peer]

    application = web.Application()
    application.router.add_get("/metrics", metrics)
    application.router.add_get("/load", load_report)
    return application


async def start(load: Load, host: str, port: int) -> web.AppRunner:
    """Serving until the returned runner's `cleanup()`."""
    runner = web.AppRunner(app(load), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
