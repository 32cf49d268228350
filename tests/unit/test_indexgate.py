"""The index gate fix: kopf's ToggleSet behaves as before, with linear wake-ups."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from kopf._cogs.aiokits import aiotoggles

from fabric_operator.machinery import indexgate
from fabric_operator.machinery.kopfcheck import KopfChangedError

ORIGINAL = indexgate._ORIGINAL


@pytest.fixture(params=["kopf", "fixed"])
def methods(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each behaviour test runs against kopf's own methods and against the fix."""
    for name, fn in ORIGINAL.items():
        monkeypatch.setattr(aiotoggles.ToggleSet, name, fn)
    if request.param == "fixed":
        indexgate.install()
    return str(request.param)


def run(coro: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(coro(), timeout=10))


def test_install_replaces_the_methods_of_the_kopf_it_knows(methods: str) -> None:
    fixed = aiotoggles.ToggleSet.make_toggle is indexgate.make_toggle
    assert fixed == (methods == "fixed")
    indexgate.install()
    assert aiotoggles.ToggleSet.drop_toggle is indexgate.drop_toggle


def test_the_gate_opens_only_when_every_toggle_is_dropped(methods: str) -> None:
    async def scenario() -> list[str]:
        gate = aiotoggles.ToggleSet(all)
        seen: list[str] = []
        toggles = [await gate.make_toggle(name=f"obj-{i}") for i in range(5)]
        assert gate.is_off()

        async def waiter(i: int) -> None:
            await gate.wait_for(True)
            seen.append(f"through-{i}")

        tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
        for toggle in toggles[:-1]:
            await gate.drop_toggle(toggle)
            await asyncio.sleep(0)
        seen.append("all but one dropped")
        await gate.drop_toggles(toggles[-1:])
        await asyncio.gather(*tasks)
        return seen

    seen = run(scenario)
    assert seen[0] == "all but one dropped"
    assert sorted(seen[1:]) == ["through-0", "through-1", "through-2"]


def test_waiters_for_closed_wake_when_a_toggle_closes_an_open_gate(methods: str) -> None:
    async def scenario() -> bool:
        gate = aiotoggles.ToggleSet(all)  # empty: open
        closed = asyncio.create_task(gate.wait_for(False))
        await asyncio.sleep(0)
        assert not closed.done()
        toggle = await gate.make_toggle(name="new")  # off: the gate closes
        await asyncio.wait_for(closed, 1)
        reopened = asyncio.create_task(gate.wait_for(True))
        await toggle.turn_to(True)  # Toggle.turn_to is kopf's own, unchanged
        await asyncio.wait_for(reopened, 1)
        return gate.is_on()

    assert run(scenario)


def test_any_sets_too(methods: str) -> None:
    """kopf's pause set is a ToggleSet(any): on once any toggle is on."""

    async def scenario() -> bool:
        paused = aiotoggles.ToggleSet(any)
        off = await paused.make_toggle(False, name="a")
        waiting = asyncio.create_task(paused.wait_for(True))
        await asyncio.sleep(0)
        on = await paused.make_toggle(True, name="b")
        await asyncio.wait_for(waiting, 1)
        resumed = asyncio.create_task(paused.wait_for(False))
        await paused.drop_toggles([on])
        await asyncio.wait_for(resumed, 1)
        await paused.drop_toggle(off)
        return paused.is_off()

    assert run(scenario)


def wakeups(n: int) -> int:
    """How often waiters look at the gate while n objects pass it, as at a restart."""

    async def scenario() -> int:
        gate = aiotoggles.ToggleSet(all)
        looks = 0
        is_on = gate.is_on

        def counted() -> bool:
            nonlocal looks
            looks += 1
            return is_on()

        toggles = [await gate.make_toggle(name=str(i)) for i in range(n)]
        gate.is_on = counted  # type: ignore[method-assign]
        tasks = [asyncio.create_task(gate.wait_for(True)) for _ in range(n)]
        await asyncio.sleep(0)
        for toggle in toggles:
            await gate.drop_toggle(toggle)
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        return looks

    result: int = run(scenario)
    return result


def test_wakeups_grow_linearly_with_the_fix_quadratically_without(methods: str) -> None:
    small, large = wakeups(50), wakeups(200)
    if methods == "fixed":
        assert large <= 6 * 200, large  # a few looks per object
        assert large / small < 5
    else:  # what the fix is for: kopf wakes every waiter on every drop
        assert large >= 200 * 200 / 2, large
        assert large / small > 10


def test_install_refuses_a_kopf_whose_toggle_set_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a warning and a silent fallback to the quadratic gate: the operator does not
    start, and says which kopf it wants."""
    for name, fn in ORIGINAL.items():
        monkeypatch.setattr(aiotoggles.ToggleSet, name, fn)

    def not_a_coroutine(self: Any, toggle: Any) -> None:
        pass

    monkeypatch.setitem(indexgate._ORIGINAL, "drop_toggle", not_a_coroutine)
    with pytest.raises(KopfChangedError, match=r"ToggleSet .* has changed.*kopf>=1\.45,<1\.46"):
        indexgate.install()
    assert aiotoggles.ToggleSet.make_toggle is ORIGINAL["make_toggle"]  # kopf untouched


def test_the_operator_does_not_start_on_a_changed_kopf(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fabric_operator import cli  # noqa: PLC0415

    def changed() -> None:
        raise KopfChangedError("kopf._cogs.aiokits.aiotoggles.ToggleSet has changed")

    monkeypatch.setattr(cli, "install_kopf_wraps", changed)
    assert cli.main(["run", "--kubeconfig=/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fabric-operator: kopf ") and "checked against" in err
