"""kube-apiserver stopped for 30 s in the middle of a churn, then started again: the operator
process stays up (same pid, no restart), reconnects by itself and converges; its /healthz
keeps answering and says that the API server is unreachable while it is.

One outage serves both tests (it costs 30 s): the module fixture runs it and records what
it saw.
"""

from __future__ import annotations

import json
import os
import random
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from fabric_operator.localcluster import LocalControlPlane
from tests.faults.conftest import start_operator
from tests.support.faults import (
    Churn,
    Convergence,
    api_up,
    say,
    tracebacks,
    wait_converged,
)
from tests.support.fixtures import OperatorProcess, temporary_namespace
from tests.support.kube import Cluster, wait_for

pytestmark = pytest.mark.integration

OUTAGE_SECONDS = float(os.environ.get("FABRIC_OUTAGE_SECONDS", "30"))
BACKENDS = 60


@dataclass
class Probe:
    at: float  # seconds since the API server was stopped (negative: before)
    alive: bool  # the operator process had not exited
    status: int | None  # HTTP status of /healthz, None if it did not answer
    body: dict[str, Any] | None


@dataclass
class Outage:
    pid_before: int
    pid_after: int
    starts: int  # OperatorProcess.start() calls (1: never restarted)
    during: list[Probe] = field(default_factory=list)
    after: list[Probe] = field(default_factory=list)
    converged: Convergence | None = None
    converge_seconds: float = 0.0
    churn: dict[str, int] = field(default_factory=dict)
    churn_errors: dict[str, int] = field(default_factory=dict)
    tracebacks: list[str] = field(default_factory=list)


def probe(op: OperatorProcess, at: float) -> Probe:
    alive = op.proc is not None and op.proc.poll() is None
    try:
        url = f"http://127.0.0.1:{op.port}/healthz"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return Probe(at, alive, resp.status, json.loads(resp.read()))
    except OSError:
        return Probe(at, alive, None, None)


@pytest.fixture(scope="module")
def outage(
    cluster: Cluster,
    fault_plane: tuple[Cluster, LocalControlPlane | None],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Outage]:
    plane = fault_plane[1]
    if plane is None:
        pytest.skip(
            "needs the local control plane to stop and start its kube-apiserver; "
            "FABRIC_TEST_KUBECONFIG points at a cluster the tests do not run"
        )
    with temporary_namespace(cluster) as ns:
        op = start_operator(cluster, ns, tmp_path_factory.mktemp("outage-operator"))
        try:
            yield run_outage(cluster, plane, ns, op)
        finally:
            op.stop()


def run_outage(cluster: Cluster, plane: LocalControlPlane, ns: str, op: OperatorProcess) -> Outage:
    assert op.proc is not None
    names = [f"out-{i:02d}" for i in range(BACKENDS)]
    churn = Churn(cluster, ns, random.Random(7), names, invalid_share=0.05, pause=0.02)
    for name in names:
        churn.op(name)
    churn.start()
    time.sleep(5)
    result = Outage(pid_before=op.proc.pid, pid_after=0, starts=0)
    result.during.append(probe(op, -0.1))
    stopped = time.monotonic()
    plane.stop_apiserver(kill=True)
    say(
        "INJECTED: kube-apiserver SIGKILLed (etcd, controller-manager, scheduler keep running) "
        "during a churn of %d LLMBackends; restart in %.0fs",
        BACKENDS,
        OUTAGE_SECONDS,
    )
    while time.monotonic() - stopped < OUTAGE_SECONDS:
        result.during.append(probe(op, time.monotonic() - stopped))
        time.sleep(1.0)
    plane.start_apiserver()
    back = time.monotonic()
    say("INJECTED: kube-apiserver started again after %.1fs down", back - stopped)
    wait_for("the API server to answer", lambda: api_up(cluster), 60)
    time.sleep(5)  # the churn goes on a little after the outage
    churn.stop()
    result.churn, result.churn_errors = dict(churn.done), dict(churn.errors)
    result.converged, _ = wait_converged(cluster, ns, 150, ordered=False)
    result.converge_seconds = time.monotonic() - back
    # kopf caches /healthz for 10 s: look for 15 s after converging.
    until = time.monotonic() + 15
    while time.monotonic() < until:
        result.after.append(probe(op, time.monotonic() - stopped))
        time.sleep(1.0)
    assert op.proc is not None
    result.pid_after, result.starts = op.proc.pid, op.starts
    result.tracebacks = tracebacks(op)
    say(
        "SAW churn %s with API errors %s; converged %.1fs after the API server came back: %s",
        result.churn,
        result.churn_errors,
        result.converge_seconds,
        result.converged.summary(),
    )
    for p in result.during[::5] + result.after[-1:]:
        say(
            "SAW at %+.0fs: operator %s, /healthz %s %s",
            p.at,
            "alive" if p.alive else "EXITED",
            p.status,
            json.dumps((p.body or {}).get("controller"))[:300],
        )
    return result


def test_operator_survives_outage_and_converges(outage: Outage) -> None:
    assert all(p.alive for p in outage.during + outage.after), "the operator process exited"
    assert outage.starts == 1 and outage.pid_after == outage.pid_before, "it was restarted"
    # /healthz is the liveness probe: failing it during an outage would have the kubelet
    # restart a healthy operator over and over.
    silent = [p.at for p in outage.during + outage.after if p.status != 200]
    assert not silent, f"/healthz did not answer 200 at {silent}"
    assert outage.converged is not None and outage.converged.ok, outage.converged
    assert outage.converged.children_checked > 0
    assert not outage.tracebacks, outage.tracebacks[:3]


def _reachable(p: Probe) -> Any:
    api = ((p.body or {}).get("controller") or {}).get("apiServer")
    return api.get("reachable") if isinstance(api, dict) else None


def test_healthz_reports_the_outage(outage: Outage) -> None:
    during = [_reachable(p) for p in outage.during if p.at > 12]  # after kopf's 10 s cache
    after = [_reachable(p) for p in outage.after]
    say("SAW controller.apiServer.reachable during the outage %s, after %s", during, after[-3:])
    assert False in during, "/healthz never said the API server was unreachable"
    assert after and after[-1] is True, "/healthz did not say it was reachable again"
