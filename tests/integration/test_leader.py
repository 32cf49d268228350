"""Two operator replicas with --leader-elect on a cluster of their own: one acts, the
other waits with a warm cache; it takes over a lease duration after the leader is killed,
and at once when the leader is stopped (SIGTERM: the Lease is released).

The cut-off case (a leader that can no longer renew stops before the follower starts) is
tests/faults/test_leader_cutoff.py."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.fixtures import OperatorProcess, local_cluster
from tests.support.kube import Cluster, wait_for
from tests.support.loadserver import LoadServer

pytestmark = pytest.mark.integration

FLAGS = ("--leader-elect", "--leader-election-namespace=default")


def backend(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "llm.fabric.dev/v1alpha1",
        "kind": "LLMBackend",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"engine": "llamacpp", "model": {"url": "https://example.invalid/m.gguf"}},
    }


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with local_cluster(tmp_path_factory) as c:
        yield c


def child_writes(op: OperatorProcess) -> float:
    """Children created or applied, from the operator's live counters."""
    return sum(
        v
        for k, v in op.api_requests().items()
        if ('verb="apply"' in k or 'verb="create"' in k) and "events" not in k
    )


def leading(op: OperatorProcess) -> bool:
    """Live, from /metrics (kopf caches /healthz for 10 s)."""
    return op.metric("fabric_operator_leading") == 1.0


def lease(cluster: Cluster) -> dict[str, Any]:
    out = cluster.kubectl("get", "lease", "fabric-operator", "-n", "default", "-o", "json")
    spec: dict[str, Any] = json.loads(out.stdout)["spec"]
    return spec


def pair(cluster: Cluster, tmp: Path) -> tuple[OperatorProcess, OperatorProcess]:
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    a = OperatorProcess(cluster.kubeconfig, tmp / "a", *FLAGS)
    b = OperatorProcess(cluster.kubeconfig, tmp / "b", *FLAGS)
    a.start()
    wait_for("a to lead", lambda: leading(a), 30)
    b.start()
    return a, b


def test_one_replica_acts_and_the_other_takes_over(
    own_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    a, b = pair(own_cluster, tmp_path_factory.mktemp("killed"))
    try:
        own_cluster.apply(backend("first"))
        wait_for("children of first", lambda: own_cluster.deployment("default", "first"), 30)
        wait_for("a's writes counted", lambda: child_writes(a) >= 2, 5)
        assert leading(a) and not leading(b)
        assert child_writes(b) == 0, (a.api_requests(), b.api_requests())
        print(f"leader a wrote {child_writes(a):.0f} children; follower b wrote 0")

        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_for("b to take over", lambda: leading(b), 40, interval=0.2)
        took = time.monotonic() - killed
        own_cluster.apply(backend("second"))
        wait_for("children of second", lambda: own_cluster.deployment("default", "second"), 30)
        print(f"b took over {took:.1f}s after a was killed; lease holder {lease(own_cluster)}")
        # Killed, a could not release: b waited out the lease (15 s after its last renewal).
        assert 13 < took < 30
        # b's restart-style resync wrote nothing of first (unchanged); second's children.
        wait_for("b's writes counted", lambda: child_writes(b) >= 2, 5)
        assert child_writes(b) == 2, b.api_requests()
    finally:
        a.stop()
        b.stop()


def test_a_stopped_leader_releases_the_lease_and_the_follower_takes_over_at_once(
    own_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """SIGTERM (a pod deleted, a rolling update): the leader stops its workers, waits for
    the writes in flight, then clears the Lease's holder (duration 1 s), as client-go's
    ReleaseOnCancel does; the follower takes it at its next look, not a lease later."""
    a, b = pair(own_cluster, tmp_path_factory.mktemp("stopped"))
    try:
        before = lease(own_cluster)
        assert a.proc is not None
        assert before["holderIdentity"].endswith(f"-{a.proc.pid}")
        stopped = time.monotonic()
        a.proc.send_signal(signal.SIGTERM)
        a.proc.wait(timeout=30)
        exited = time.monotonic() - stopped
        wait_for("b to take over", lambda: leading(b), 20, interval=0.1)
        took = time.monotonic() - stopped
        after = lease(own_cluster)
        print(
            f"a exited {exited:.1f}s after SIGTERM (code {a.proc.returncode}); b led "
            f"{took:.1f}s after SIGTERM (a lease is {before['leaseDurationSeconds']}s); "
            f"Lease {before['holderIdentity']} -> {after['holderIdentity']}"
        )
        assert "released the Lease" in a.logs()
        assert b.proc is not None and after["holderIdentity"].endswith(f"-{b.proc.pid}")
        assert after["leaseTransitions"] == before["leaseTransitions"] + 1
        assert after["leaseDurationSeconds"] == 15
        assert took - exited < 5.0  # at b's next look (every 2 to 4.4 s)
        assert took < before["leaseDurationSeconds"]
    finally:
        a.stop()
        b.stop()


def test_the_autoscaler_runs_on_the_leader_only_and_survives_a_handover(
    own_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Under load, the leader scales and the follower neither streams nor writes; the
    leader stopped, the new one resumes from status.autoscaling: no scale-down, no
    flapping, and it follows the next change of load."""
    stub = LoadServer().start()
    tmp = tmp_path_factory.mktemp("autoscaler")
    flags = (*FLAGS, f"--gateway-load-url={stub.url}")
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    a = OperatorProcess(own_cluster.kubeconfig, tmp / "a", *flags)
    b = OperatorProcess(own_cluster.kubeconfig, tmp / "b", *flags)
    up = 'fabric_operator_autoscaler_scale_events_total{direction="up"}'
    down = 'fabric_operator_autoscaler_scale_events_total{direction="down"}'
    try:
        a.start()
        wait_for("a to lead", lambda: leading(a), 30)
        b.start()
        manifest = backend("auto")
        manifest["spec"]["autoscaling"] = {
            "minReplicas": 0,
            "maxReplicas": 4,
            "targetRequests": 2,
            "scaleDownDelaySeconds": 300,
        }
        manifest["spec"]["replicas"] = 0
        stub.set("default/auto", in_flight=6)
        own_cluster.apply(manifest)
        spec = lambda: int(own_cluster.backend("default", "auto")["spec"].get("replicas", 1))  # noqa: E731
        wait_for("the leader to scale to 3", lambda: spec() == 3, 20, interval=0.05)
        wait_for("b's metrics", lambda: b.metric("fabric_operator_leading") == 0.0, 10)
        assert a.metric(up) >= 1 and b.metric(up) == 0 and b.metric(down) == 0
        assert stub.streaming == 1  # the leader's stream alone
        wait_for(
            "status.autoscaling written",
            lambda: (own_cluster.backend("default", "auto").get("status") or {}).get("autoscaling"),
            10,
        )

        # Demand drops: a fresh decision would want 1 replica; within the scale-down delay
        # the leader keeps 3, and so must the next one.
        stub.set("default/auto", in_flight=2)
        lines = stub.lines
        wait_for("a's reports of the drop", lambda: stub.lines >= lines + 4, 10)
        assert spec() == 3
        connects = stub.connects
        assert a.proc is not None
        a.proc.send_signal(signal.SIGTERM)
        a.proc.wait(timeout=30)
        wait_for("b to take over", lambda: leading(b), 20, interval=0.1)
        wait_for("b's stream", lambda: stub.connects > connects, 15)
        lines = stub.lines
        wait_for("three seconds of reports to b", lambda: stub.lines >= lines + 6, 10)
        # Resumed from status.autoscaling (lastScaleTime), not from scratch: still 3.
        assert spec() == 3 and b.metric(down) == 0
        stub.set("default/auto", in_flight=8)
        wait_for("b to follow the load to 4", lambda: spec() == 4, 20, interval=0.05)
        assert b.metric(up) >= 1 and b.metric(down) == 0
        print(
            "autoscaler handover: b resumed at 3 replicas, followed to 4; "
            f"lease {lease(own_cluster)}"
        )
    finally:
        a.stop()
        b.stop()
        stub.stop()
