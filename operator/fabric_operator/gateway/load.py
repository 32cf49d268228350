"""Requests in flight and held per backend: what this gateway replica tells the
operator's autoscaler (`GET /load` on the metrics port).

The one demand signal every engine has (Ollama exports no queue metric) is the gateway's
own count, and a held request is demand too: at zero replicas it is all there is. Where
the engine has queue gauges, what its pods report is added as `engine` (enginequeue):
requests that bypassed the gateway count too. The operator sums the replicas' counts; a
watch stream gets a line as soon as anything changes, so a request held at zero scales
its backend up within a second, not a tick.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncGenerator

HEARTBEAT_SECONDS = 1.0
MIN_GAP_SECONDS = 0.05  # lines of a watch stream at most 20 a second under load


class Load:
    def __init__(self, gateway: str | None = None) -> None:
        self.gateway = gateway or socket.gethostname()
        self._in_flight: dict[str, int] = {}
        self._held: dict[str, int] = {}
        self._lingering: dict[str, int] = {}  # holds that ended less than a second ago
        self._engine: dict[str, int] = {}  # requests the engines report (enginequeue)
        self.held_total = 0
        self._watchers: set[asyncio.Event] = set()

    def enter(self, backend: str) -> None:
        self._in_flight[backend] = self._in_flight.get(backend, 0) + 1
        self._changed()

    def leave(self, backend: str) -> None:
        _down(self._in_flight, backend)
        self._changed()

    def hold(self, backend: str) -> None:
        self._held[backend] = self._held.get(backend, 0) + 1
        self.held_total += 1
        self._changed()

    def unhold(self, backend: str, linger: float = 0.0) -> None:
        """No longer held; still reported (not counted against caps) for `linger`
        seconds, so that a hold shorter than a report's gap is seen all the same."""
        _down(self._held, backend)
        self.held_total -= 1
        if linger > 0:
            self._lingering[backend] = self._lingering.get(backend, 0) + 1
            asyncio.get_running_loop().call_later(linger, self._unlinger, backend)
        self._changed()

    def _unlinger(self, backend: str) -> None:
        _down(self._lingering, backend)
        self._changed()

    def set_engine(self, backend: str, depth: int | None) -> None:
        """What the backend's pods report running and waiting (None: nothing read)."""
        if depth is None:
            if self._engine.pop(backend, None) is not None:
                self._changed()
        elif self._engine.get(backend) != depth:
            self._engine[backend] = depth
            self._changed()

    def engine_backends(self) -> set[str]:
        return set(self._engine)

    def in_flight(self, backend: str) -> int:
        return self._in_flight.get(backend, 0)

    def held(self, backend: str) -> int:
        return self._held.get(backend, 0)

    def report(self) -> dict[str, object]:
        """The /load document: backends with nothing in flight, held or at the engine
        are left out; `engine` only where the engine's gauges were read."""
        engine = {n: d for n, d in self._engine.items() if d}
        names = sorted(
            self._in_flight.keys() | self._held.keys() | self._lingering.keys() | engine.keys()
        )
        backends: dict[str, dict[str, int]] = {}
        for n in names:
            backends[n] = {
                "inFlight": self._in_flight.get(n, 0),
                "held": self._held.get(n, 0) + self._lingering.get(n, 0),
            }
            if n in engine:
                backends[n]["engine"] = engine[n]
        return {"gateway": self.gateway, "backends": backends}

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    def _changed(self) -> None:
        for event in self._watchers:
            event.set()

    async def watch(self) -> AsyncGenerator[bytes, None]:
        """NDJSON lines: the report at once, then on each change (no more often than
        MIN_GAP_SECONDS) and at least every HEARTBEAT_SECONDS, so a reader knows a
        silent stream from a quiet gateway."""
        event = asyncio.Event()
        self._watchers.add(event)
        try:
            while True:
                event.clear()
                yield json.dumps(self.report()).encode() + b"\n"
                await asyncio.sleep(MIN_GAP_SECONDS)
                try:
                    async with asyncio.timeout(HEARTBEAT_SECONDS):
                        await event.wait()
                except TimeoutError:
                    pass
        finally:
            self._watchers.discard(event)


def _down(counts: dict[str, int], backend: str) -> None:
    left = counts.get(backend, 0) - 1
    if left > 0:
        counts[backend] = left
    else:
        counts.pop(backend, None)
