"""kopf's index gate, made linear: wake its waiters only when the gate opens or closes.

At startup kopf holds every handler until all index handlers have run: each watched object
gets a toggle in one `ToggleSet(all)`, and each object's worker waits on the set's
condition. `make_toggle` and `drop_toggle` call `notify_all` on every change, so every
toggle added or dropped wakes every waiting worker, which looks again and goes back to
sleep: N objects cost N² wake-ups (py-spy: most of a restart's CPU; ~15 s of resync with
1,005 backends and their children). The waiters' predicate is the set's state
(`is_on() == wanted`), so a change that leaves the state as it was wakes nobody who could
proceed: notifying only on a change of state is the same behaviour at linear cost.

This replaces three methods of a private kopf class (kopf 1.45, `kopfcheck`); `install`
checks their shape first and refuses to start the operator if it has changed (a silent
fallback would leave restarts quadratic unnoticed). tests/unit/test_indexgate.py pins both.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any

from kopf._cogs.aiokits import aiotoggles

from fabric_operator.machinery.kopfcheck import KopfChangedError

log = logging.getLogger(__name__)


async def _change(self: aiotoggles.ToggleSet, change: Callable[[], None]) -> None:
    """Change the set's toggles; wake the waiters only if that opened or closed it."""
    async with self._condition:
        before = self.is_on()
        change()
        if self.is_on() != before:
            self._condition.notify_all()


async def make_toggle(
    self: aiotoggles.ToggleSet, __val: bool = False, *, name: str | None = None
) -> aiotoggles.Toggle:
    toggle = aiotoggles.Toggle(__val, name=name, condition=self._condition)
    await _change(self, lambda: self._toggles.add(toggle))
    return toggle


async def drop_toggle(self: aiotoggles.ToggleSet, toggle: aiotoggles.Toggle) -> None:
    await _change(self, lambda: self._toggles.discard(toggle))


async def drop_toggles(self: aiotoggles.ToggleSet, toggles: Iterable[aiotoggles.Toggle]) -> None:
    await _change(self, lambda: self._toggles.difference_update(toggles))


_FIXED = {"make_toggle": make_toggle, "drop_toggle": drop_toggle, "drop_toggles": drop_toggles}
_ORIGINAL = {name: getattr(aiotoggles.ToggleSet, name, None) for name in _FIXED}


def _shape_known() -> bool:
    """kopf's ToggleSet as this module was written against: the three methods, and the
    private fields they use."""
    probe: Any = aiotoggles.ToggleSet(all)
    if not all(inspect.iscoroutinefunction(fn) for fn in _ORIGINAL.values()):
        return False
    return isinstance(getattr(probe, "_toggles", None), set) and hasattr(probe, "_condition")


def install() -> None:
    """Replace the methods (idempotent). Raises KopfChangedError, kopf untouched, if
    kopf's ToggleSet has changed."""
    if not _shape_known():
        raise KopfChangedError(
            "kopf._cogs.aiokits.aiotoggles.ToggleSet (make_toggle, drop_toggle, "
            "drop_toggles, _toggles, _condition) has changed"
        )
    for name, fn in _FIXED.items():
        setattr(aiotoggles.ToggleSet, name, fn)
