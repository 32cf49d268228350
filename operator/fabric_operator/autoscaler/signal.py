"""Demand as the gateways see it: one `/load?watch=1` stream per gateway replica, summed.

Each gateway replica streams NDJSON reports of its own in-flight and held requests per
backend (`{"gateway": id, "backends": {"ns/name": {"inFlight": n, "held": n}}}`, with
`"engine": n` where the engine's pods report their queue): the
first at once, then one on every change and at least one a second. A replica whose
stream closed or went silent for STALE_SECONDS is dropped from the sum, so a gateway
that died cannot hold its last numbers (and the replicas they asked for) forever. Every
change is told to the loop at once (`on_change`): a request held at zero replicas is
acted on within a second, not at the next tick.

`Signal` (the sum) is pure, with an injected clock; `streams.Streams` does the HTTP
(imported only once a backend is autoscaled: an operator without one loads no httpx).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

STALE_SECONDS = 3.0
MAX_COUNT = 10_000_000  # more is no count a gateway can hold: a broken report


class Demand(NamedTuple):
    """Requests of one backend: in flight and held at the gateways, and what its engine
    pods report running or waiting (where the engine has queue gauges)."""

    in_flight: int = 0
    held: int = 0
    engine: int = 0

    @property
    def total(self) -> int:
        """Held requests wait at a gateway, not at an engine; those in flight are at the
        engine too, so the larger of the two counts them once, and counts the requests
        that bypassed the gateways (straight to the Service) as well."""
        return self.held + max(self.in_flight, self.engine)


@dataclass(frozen=True)
class Report:
    """One gateway replica's counts (backends absent: zero)."""

    gateway: str
    backends: Mapping[str, Demand] = field(default_factory=dict)


def _count(value: Any, limit: int | None = MAX_COUNT) -> int:
    too_big = limit is not None and value > limit if isinstance(value, int) else False
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or too_big:
        raise ValueError(f"not a count: {str(value)[:40]!r}")
    return value


def parse_report(line: str | bytes) -> Report:
    """One NDJSON line (or /load body) as a Report; ValueError for anything else."""
    data = json.loads(line)
    if not isinstance(data, dict) or not isinstance(data.get("gateway"), str):
        raise ValueError("no gateway id")
    backends = data.get("backends", {})
    if not isinstance(backends, dict):
        raise ValueError("backends is not an object")
    out: dict[str, Demand] = {}
    for key, counts in backends.items():
        if not isinstance(counts, dict) or key.count("/") != 1:
            raise ValueError(f"bad entry {str(key)[:80]!r}")
        out[key] = Demand(
            _count(counts.get("inFlight", 0)),
            _count(counts.get("held", 0)),
            # What a team's pods say, relayed: clamped, never a reason to refuse the line
            # (and with it every other team's counts).
            min(_count(counts.get("engine", 0), limit=None), MAX_COUNT),
        )
    return Report(data["gateway"][:253], out)


class Signal:
    """The latest report of each source (a gateway's URL), and their sum per backend;
    `on_change` gets the backends whose sum changed (None: all, the gateways changed).

    Reports are grouped by the gateway id they carry, the newest winning: one replica
    reached by two URLs counts once."""

    def __init__(
        self,
        on_change: Callable[[set[str] | None], None] = lambda _keys: None,
        *,
        stale_after: float = STALE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.on_change, self.stale_after, self.clock = on_change, stale_after, clock
        self._latest: dict[str, tuple[float, Report]] = {}  # source -> (when, report)
        self._sum: dict[str, Demand] = {}
        self._gateways = 0
        self._expected: frozenset[str] = frozenset()  # sources that should be reporting

    def expect(self, sources: set[str] | frozenset[str]) -> None:
        """The sources there are now (the gateway pods found, the URLs given): one of
        them without a current report makes the sum `partial`."""
        self._expected = frozenset(sources)

    @property
    def partial(self) -> bool:
        """Some gateway replica is known but not counted (its stream failed, was refused
        or went silent): the sum then misses its requests, so it is a lower bound, good
        for scaling up but not down (held requests there would be scaled away)."""
        return bool(self._expected - self._latest.keys())

    @property
    def gateways(self) -> int:
        """Gateway replicas whose reports count now."""
        return self._gateways

    def demand(self, key: str) -> Demand:
        """The summed demand of backend `key` ("namespace/name")."""
        return self._sum.get(key, Demand())

    def totals(self) -> dict[str, Demand]:
        return dict(self._sum)

    def update(self, source: str, report: Report) -> None:
        self._latest[source] = (self.clock(), report)
        self._recount()

    def drop(self, source: str) -> None:
        """A source's stream closed or failed: its numbers no longer count."""
        if self._latest.pop(source, None) is not None:
            self._recount()

    def expire(self) -> None:
        """Drop the sources silent for longer than `stale_after` (their heartbeat is 1 s)."""
        now = self.clock()
        stale = [s for s, (t, _r) in self._latest.items() if now - t > self.stale_after]
        for source in stale:
            silent = now - self._latest.pop(source)[0]
            log.info("gateway load %s silent for %.1fs: no longer counted", source, silent)
        if stale:
            self._recount()

    def _recount(self) -> None:
        newest: dict[str, tuple[float, Report]] = {}
        for when, report in self._latest.values():
            if report.gateway not in newest or when >= newest[report.gateway][0]:
                newest[report.gateway] = (when, report)
        total: dict[str, Demand] = {}
        for _when, report in newest.values():
            for key, d in report.backends.items():
                if d.total or key in total:
                    t = total.get(key, Demand())
                    # Every gateway reads the same pods: their engine figures are one
                    # reading each, not parts of a sum.
                    total[key] = Demand(
                        t.in_flight + d.in_flight, t.held + d.held, max(t.engine, d.engine)
                    )
        total = {k: v for k, v in total.items() if v.total}
        changed = {k for k in total.keys() | self._sum.keys() if total.get(k) != self._sum.get(k)}
        gateways_changed = len(newest) != self._gateways
        self._sum, self._gateways = total, len(newest)
        if changed or gateways_changed:
            # A gateway more or less changes every backend's reading (None: all of them).
            self.on_change(None if gateways_changed else changed)
