"""Demand samples of the last minute and their time-weighted averages.

Averages are over what was observed only: time before the first sample counts for
nothing, rather than as zero demand, so an autoscaler that has just started (or taken over
as leader) sees a load step at once instead of diluting it with zeros it never measured.
"""

from __future__ import annotations

from collections import deque


class Window:
    """Samples (time, value) of the last `length` seconds, oldest first.

    A sample is a gauge reading (requests in flight and held at that moment); it stands
    for the time since the sample before it, and the newest also for the time after it
    up to `now`. So a reading counts as soon as it is taken, and a gap in the readings
    keeps the last known value rather than inventing zeros.
    """

    def __init__(self, length: float) -> None:
        self.length = length
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, t: float, value: float) -> None:
        """Record a reading; one older than the newest is dropped (readings only go forward)."""
        if self._samples and t < self._samples[-1][0]:
            return
        if self._samples and t == self._samples[-1][0]:
            self._samples[-1] = (t, value)
        else:
            self._samples.append((t, value))
        # Keep one sample at or before the window's start: it bounds the first one inside.
        while len(self._samples) >= 2 and self._samples[1][0] <= t - self.length:
            self._samples.popleft()

    @property
    def latest(self) -> float | None:
        return self._samples[-1][1] if self._samples else None

    def __len__(self) -> int:
        return len(self._samples)

    def average(self, now: float, span: float) -> float:
        """Time-weighted mean over the last `span` seconds (at most `length`) of what was
        observed; the newest reading if no time has passed; 0 with no readings."""
        start = now - min(span, self.length)
        total = covered = 0.0
        previous: float | None = None
        last: float | None = None
        for t, value in self._samples:
            if t > now:
                break
            if previous is not None and t > start:
                lo = max(previous, start)
                total += value * (t - lo)
                covered += t - lo
            previous, last = t, value
        if previous is None or last is None:
            return 0.0
        lo = max(previous, start)
        if now > lo:
            total += last * (now - lo)
            covered += now - lo
        return total / covered if covered > 0 else last
