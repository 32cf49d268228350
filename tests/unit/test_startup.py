"""status.lastStart: where the newest pod's start went, from its own report."""

from __future__ import annotations

from typing import Any

from fabric_operator.controller.startup import last_start


def pod(
    name: str,
    created: str,
    *,
    scheduled: str | None = None,
    initialized: str | None = None,
    started: str | None = None,
    ready: str | None = None,
    deleting: bool = False,
) -> dict[str, Any]:
    conditions = [
        {"type": t, "status": "True", "lastTransitionTime": at}
        for t, at in (("PodScheduled", scheduled), ("Initialized", initialized), ("Ready", ready))
        if at
    ]
    if not ready:
        conditions.append({"type": "Ready", "status": "False", "lastTransitionTime": created})
    state = {"running": {"startedAt": started}} if started else {"waiting": {"reason": "x"}}
    meta: dict[str, Any] = {"name": name, "creationTimestamp": created}
    if deleting:
        meta["deletionTimestamp"] = created
    return {
        "metadata": meta,
        "status": {
            "conditions": conditions,
            "containerStatuses": [{"name": "engine", "state": state}],
        },
    }


T0 = "2026-12-06T10:00:00Z"


def test_each_step_of_a_served_start() -> None:
    p = pod(
        "a",
        T0,
        scheduled="2026-12-06T10:00:04Z",  # waited for a GPU node
        initialized="2026-12-06T10:02:04Z",  # preload: 2 minutes of download
        started="2026-12-06T10:02:34Z",  # image pull
        ready="2026-12-06T10:03:34Z",  # loading
    )
    assert last_start([p]) == {
        "pod": "a",
        "created": T0,
        "scheduledSeconds": 4,
        "initSeconds": 120,
        "startedSeconds": 30,
        "readySeconds": 60,
        "totalSeconds": 214,
    }


def test_a_start_under_way_says_what_is_known_and_no_total() -> None:
    p = pod("a", T0, scheduled="2026-12-06T10:00:01Z", initialized="2026-12-06T10:00:01Z")
    assert last_start([p]) == {
        "pod": "a",
        "created": T0,
        "scheduledSeconds": 1,
        "initSeconds": 0,
    }
    assert last_start([pod("b", T0)]) == {"pod": "b", "created": T0}  # pending


def test_the_newest_live_pod_is_measured() -> None:
    old = pod("old", T0, scheduled=T0, initialized=T0, started=T0, ready=T0)
    new = pod("new", "2026-12-06T11:00:00Z", scheduled="2026-12-06T11:00:02Z")
    going = pod("going", "2026-12-06T12:00:00Z", deleting=True)
    assert last_start([old, new, going])["pod"] == "new"  # type: ignore[index]
    assert last_start([going]) is None and last_start([]) is None


def test_garbage_times_are_skipped_not_fatal() -> None:
    p = pod("a", T0, scheduled="yesterday", started="2026-12-06T10:00:09Z")
    p["status"]["containerStatuses"].append({"name": "sidecar", "state": {}})
    out = last_start([p, {"metadata": {"name": "x"}}])
    assert out == {"pod": "a", "created": T0}  # Ready is False: no ready/total either
    assert last_start([{"metadata": {"name": "x", "creationTimestamp": "nope"}}]) is None


def test_a_start_measured_to_the_end_is_kept_through_flaps_and_restarts() -> None:
    done = pod(
        "a",
        T0,
        scheduled="2026-12-06T10:00:01Z",
        initialized="2026-12-06T10:00:01Z",
        started="2026-12-06T10:00:05Z",
        ready="2026-12-06T10:00:35Z",
    )
    first = last_start([done])
    assert first is not None and first["totalSeconds"] == 35
    # Hours later the readiness probe flapped: Ready's time moved; the start did not.
    flapped = pod(
        "a",
        T0,
        scheduled="2026-12-06T10:00:01Z",
        initialized="2026-12-06T10:00:01Z",
        started="2026-12-06T10:00:05Z",
        ready="2026-12-06T15:00:00Z",
    )
    assert last_start([flapped]) != first  # what the pod alone now says...
    assert last_start([flapped], previous=first) == first  # ...is not taken
    # Another pod: measured afresh.
    other = pod("b", "2026-12-06T16:00:00Z", scheduled="2026-12-06T16:00:02Z")
    assert last_start([flapped, other], previous=first) == {
        "pod": "b",
        "created": "2026-12-06T16:00:00Z",
        "scheduledSeconds": 2,
    }


def test_a_restarted_engine_does_not_pass_its_restart_off_as_the_start() -> None:
    p = pod(
        "a",
        T0,
        scheduled="2026-12-06T10:00:01Z",
        initialized="2026-12-06T10:00:01Z",
        started="2026-12-07T09:00:00Z",  # the restart, a day later
        ready="2026-12-07T09:00:30Z",
    )
    p["status"]["containerStatuses"][0]["restartCount"] = 1
    out = last_start([p])
    assert out == {"pod": "a", "created": T0, "scheduledSeconds": 1, "initSeconds": 0}
