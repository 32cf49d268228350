"""Leader election's timing, against an in-memory Lease: a leader cut off stops at its
renew deadline, before a follower may take over; a hung request does not hold the
deadline back; a released Lease is taken at the follower's next look.

Durations are client-go's scaled down (15/10/2 s -> 2/1/0.2 s); the real ones, with
operator processes and a real API server, are in tests/faults/test_leader_cutoff.py."""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from fabric_operator.machinery import leader
from fabric_operator.machinery.leader import LeaderElector, check_durations, leader_client

LEASE, DEADLINE, RETRY = 2.0, 1.0, 0.2


class LeaseServer:
    """One Lease, with resourceVersions and optimistic concurrency, as the API has it."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.version = 0
        self.lock = threading.Lock()
        self.writes: list[tuple[float, str, str]] = []  # (when, identity, holder written)

    def call(self, who: str, method: str, body: Any) -> dict[str, Any]:
        with self.lock:
            if method == "GET":
                if self.lease is None:
                    raise ApiException(status=404, reason="Not Found")
                return copy.deepcopy(self.lease)
            if method == "POST" and self.lease is not None:
                raise ApiException(status=409, reason="AlreadyExists")
            if method == "PUT":
                assert self.lease is not None
                sent = body["metadata"].get("resourceVersion")
                if sent != self.lease["metadata"]["resourceVersion"]:
                    raise ApiException(status=409, reason="Conflict")
            self.version += 1
            self.lease = copy.deepcopy(body)
            self.lease["metadata"]["resourceVersion"] = str(self.version)
            self.writes.append((time.monotonic(), who, body["spec"]["holderIdentity"]))
            return copy.deepcopy(self.lease)


class Elector(LeaderElector):
    """An elector whose requests go to the LeaseServer; `cut` makes them hang, as on a
    dead connection, until the test ends."""

    def __init__(self, server: LeaseServer, identity: str, **kwargs: Any) -> None:
        kwargs = {
            "lease_seconds": LEASE,
            "renew_deadline": DEADLINE,
            "retry_period": RETRY,
            **kwargs,
        }
        super().__init__(
            client.ApiClient(client.Configuration(host="https://api.invalid")),
            "ns",
            identity=identity,
            on_lost=self._lost,
            **kwargs,
        )
        self.server = server
        self.cut = False
        self.healed = threading.Event()
        self.lost_at: float | None = None
        self.renewed: list[float] = []  # when each successful attempt started

    def _lost(self) -> None:
        self.lost_at = time.monotonic()

    def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        if self.cut:
            self.healed.wait(30)
            raise OSError("timed out")
        return self.server.call(self.identity, method, body)

    def _try(self) -> bool:
        started = time.monotonic()
        held = super()._try()
        if held:
            self.renewed.append(started)
        return held


def until(what: str, probe: Any, timeout: float = 10.0) -> None:
    async def wait() -> None:
        deadline = time.monotonic() + timeout
        while not probe():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.01)

    return wait()  # type: ignore[return-value]


def test_a_leader_cut_off_stops_at_its_deadline_before_the_follower_takes_over() -> None:
    server = LeaseServer()
    a, b = Elector(server, "a"), Elector(server, "b")

    async def scenario() -> tuple[float, float, float]:
        ta = asyncio.create_task(a.run())
        await until("a to lead", a.leading.is_set)
        tb = asyncio.create_task(b.run())
        await asyncio.sleep(3 * RETRY)
        assert not b.leading.is_set()
        a.cut = True  # every request of a hangs from now on
        cut_at = time.monotonic()
        await until("b to lead", b.leading.is_set, 10)
        took_over = time.monotonic()
        await asyncio.wait_for(ta, 2)  # a's run returned when it lost
        a.healed.set()
        tb.cancel()
        await asyncio.gather(tb, return_exceptions=True)
        return cut_at, took_over, a.renewed[-1]

    cut_at, took_over, last_renewal = asyncio.run(scenario())
    assert a.lost_at is not None and not a.leading.is_set()
    stopped = a.lost_at - last_renewal
    gap = took_over - a.lost_at
    print(
        f"a renewed last {cut_at - last_renewal:.2f}s before the cut, stopped "
        f"{stopped:.2f}s after it (deadline {DEADLINE}s); b led {gap:.2f}s after a stopped"
    )
    # The deadline holds although every attempt hangs (waits are cut short, not awaited).
    assert DEADLINE - 0.05 <= stopped <= DEADLINE + 0.15
    # b may only take over a lease duration after it saw the last renewal.
    assert gap >= LEASE - DEADLINE - 0.1
    holders = [holder for _, _, holder in server.writes]
    assert holders[-1] == "b" and set(holders) == {"a", "b"}
    # Nothing of a's was written after b took over.
    assert max(t for t, who, _ in server.writes if who == "a") < took_over


def test_a_released_lease_is_taken_at_the_next_look() -> None:
    server = LeaseServer()
    a, b = Elector(server, "a"), Elector(server, "b")

    async def scenario() -> float:
        ta = asyncio.create_task(a.run())
        await until("a to lead", a.leading.is_set)
        tb = asyncio.create_task(b.run())
        await asyncio.sleep(2 * RETRY)
        ta.cancel()
        await asyncio.gather(ta, return_exceptions=True)
        released_at = time.monotonic()
        assert await a.release()
        await until("b to lead", b.leading.is_set, 5)
        tb.cancel()
        await asyncio.gather(tb, return_exceptions=True)
        return time.monotonic() - released_at

    took = asyncio.run(scenario())
    assert server.lease is not None
    released = [w for w in server.writes if w[1] == "a" and w[2] == ""]
    assert len(released) == 1 and a.lost_at is None  # released, not lost
    print(f"b took the released Lease after {took:.2f}s (a lease is {LEASE}s)")
    assert took < RETRY * (1 + leader.JITTER) + 0.3
    assert not a.leading.is_set()


def test_the_release_body_is_client_gos_and_only_ours_is_released() -> None:
    server = LeaseServer()
    a = Elector(server, "a")

    async def scenario() -> None:
        ta = asyncio.create_task(a.run())
        await until("a to lead", a.leading.is_set)
        ta.cancel()
        await asyncio.gather(ta, return_exceptions=True)

    asyncio.run(scenario())
    transitions = server.lease["spec"]["leaseTransitions"] if server.lease else None
    assert asyncio.run(a.release())
    assert server.lease is not None
    spec = server.lease["spec"]
    assert spec["holderIdentity"] == "" and spec["leaseDurationSeconds"] == 1
    assert spec["leaseTransitions"] == transitions
    assert not asyncio.run(a.release())  # not leading any more: nothing sent
    # Someone else holds it by now: left alone.
    a.leading.set()
    server.lease["spec"]["holderIdentity"] = "c"
    writes = len(server.writes)
    assert not asyncio.run(a.release()) and len(server.writes) == writes


def test_a_leader_that_sees_another_holder_stops_at_once() -> None:
    server = LeaseServer()
    a = Elector(server, "a")

    async def scenario() -> None:
        ta = asyncio.create_task(a.run())
        await until("a to lead", a.leading.is_set)
        with server.lock:
            assert server.lease is not None
            server.lease["spec"]["holderIdentity"] = "intruder"
            server.version += 1
            server.lease["metadata"]["resourceVersion"] = str(server.version)
        await asyncio.wait_for(ta, 2 * RETRY + 0.5)

    started = time.monotonic()
    asyncio.run(scenario())
    assert a.lost_at is not None and a.lost_at - started < DEADLINE


def test_a_follower_waits_a_lease_from_when_it_saw_the_last_change() -> None:
    server = LeaseServer()
    now = [100.0]
    b = Elector(server, "b", clock=lambda: now[0])
    server.lease = {
        "metadata": {"resourceVersion": "7"},
        "spec": {"holderIdentity": "gone", "leaseDurationSeconds": 15, "leaseTransitions": 3},
    }
    server.version = 7
    assert not b._try()  # first seen now
    now[0] += 15.0
    assert not b._try()  # not yet more than a lease since
    now[0] += 0.1
    assert b._try()
    assert server.lease["spec"]["holderIdentity"] == "b"
    assert server.lease["spec"]["leaseTransitions"] == 4
    assert server.lease["spec"]["leaseDurationSeconds"] == int(LEASE)


def test_each_request_is_bounded_and_never_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[Any] = []

    def fake_request(api_client: Any, method: str, path: str, **kwargs: Any) -> Any:
        sent.append((method, path, kwargs["timeout"]))
        raise ApiException(status=404)

    monkeypatch.setattr(leader, "request", fake_request)
    elector = LeaderElector(client.ApiClient(), "ns", identity="x")
    with pytest.raises(ApiException):
        elector._call("GET", "/x")
    assert sent == [("GET", "/x", (2.5, 2.5))]  # a quarter of the 10 s renew deadline
    config = client.Configuration(host="https://api.invalid")
    config.retries = 3
    api = leader_client(config)
    assert api.configuration.retries is False and config.retries == 3
    assert api.configuration.host == "https://api.invalid"


@pytest.mark.parametrize(
    ("durations", "error"),
    [
        ((10.0, 10.0, 2.0), "lease duration must be longer than the renew deadline"),
        ((15.0, 2.0, 2.0), "renew deadline must be longer than 1.2 x the retry period"),
        ((15.0, 10.0, 0.0), "retry period must be positive"),
    ],
)
def test_durations_follow_client_gos_rules(
    durations: tuple[float, float, float], error: str
) -> None:
    with pytest.raises(ValueError, match=error):
        check_durations(*durations)
    check_durations(15.0, 10.0, 2.0)


def test_the_cli_refuses_durations_that_could_overlap(capsys: pytest.CaptureFixture[str]) -> None:
    from fabric_operator import cli  # noqa: PLC0415

    with pytest.raises(SystemExit):
        cli.main(["run", "--leader-elect", "--leader-election-renew-deadline=20"])
    assert "lease duration must be longer than the renew deadline" in capsys.readouterr().err
