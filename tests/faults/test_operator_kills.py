"""The operator SIGKILLed again and again while LLMBackends are created, changed and deleted:
after its last restart everything converges, nothing is lost, duplicated, orphaned or stuck.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from tests.faults.conftest import start_operator
from tests.support.faults import (
    Churn,
    Killer,
    assert_alive,
    check_converged,
    list_backends,
    say,
    tracebacks,
    wait_converged,
)
from tests.support.kube import Cluster

pytestmark = pytest.mark.integration

BACKENDS = int(os.environ.get("FABRIC_CHURN_BACKENDS", "200"))
CHURN_SECONDS = float(os.environ.get("FABRIC_CHURN_SECONDS", "30"))
SEED = int(os.environ.get("FABRIC_FAULTS_SEED", "20261125"))
MIN_KILLS = 5


def test_sigkill_during_churn_converges(
    cluster: Cluster, namespace: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if not cluster.garbage_collector:
        pytest.skip(
            "needs kube-controller-manager's garbage collector to remove the children of "
            "deleted LLMBackends; this cluster has none"
        )
    rng = random.Random(SEED)
    op = start_operator(cluster, namespace, tmp_path)
    request.addfinalizer(op.stop)  # a failed assertion must not leave it running
    names = [f"churn-{i:03d}" for i in range(BACKENDS)]
    churn = Churn(cluster, namespace, random.Random(SEED + 1), names, invalid_share=0.05)
    killer = Killer(op, rng, 1.0, 3.0)
    say(
        "INJECTED: SIGKILL of the operator every 1-3 s (seed %d) while %d LLMBackends are "
        "created, then %.0fs of random create/update/delete (5%% invalid specs)",
        SEED,
        BACKENDS,
        CHURN_SECONDS,
    )
    started = time.monotonic()
    killer.start()
    try:
        for name in names:
            churn.op(name)
        say("created %d LLMBackends in %.1fs", churn.done["create"], time.monotonic() - started)
        churn.start()
        time.sleep(CHURN_SECONDS)
        churn.stop()
        while len(killer.kills) < MIN_KILLS and time.monotonic() - started < 120:
            time.sleep(0.5)
    finally:
        killer.stop()  # the operator is running again after its last restart
    last_restart = time.monotonic()
    say(
        "INJECTED %d SIGKILLs at %s s; churn did %s (API errors %s)",
        len(killer.kills),
        [t for t, _ in killer.kills],
        dict(churn.done),
        dict(churn.errors),
    )
    assert len(killer.kills) >= MIN_KILLS

    # Lists of named entries are compared by name here: their order after an engine
    # switch is a separate, known bug (test_drift.py::test_engine_switch_keeps_env_order).
    report, took = wait_converged(cluster, namespace, 120, ordered=False)
    say("SAW %.1fs after the last restart: %s", took, report.summary())
    strict = check_converged(cluster, namespace)
    say(
        "SAW %d children whose named lists (env, volumes...) are in another order than "
        "rendered (known bug, compared by name above)",
        len(strict.problems) - len(report.problems),
    )
    assert report.ok, report.summary()

    live = {b["metadata"]["name"] for b in list_backends(cluster, namespace)}
    lost, resurrected = churn.exists - live, live - churn.exists
    say(
        "SAW %d live LLMBackends (the churn expects %d), lost %s, unexpected %s; operator "
        "restarted %d times, up %.0fs since the last one",
        len(live),
        len(churn.exists),
        sorted(lost),
        sorted(resurrected),
        op.starts - 1,
        time.monotonic() - last_restart,
    )
    assert not lost and not resurrected
    assert report.backends == len(live)
    assert report.children_checked > 0
    assert_alive(op)
    crashes = tracebacks(op)
    say("SAW %d tracebacks in %d operator logs", len(crashes), op.starts)
    assert not crashes, crashes[:3]
    op.stop()
