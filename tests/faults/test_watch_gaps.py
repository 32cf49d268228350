"""A gap in the watches: every watch of the operator is cut and held while objects change,
then answered 410 Gone (its resourceVersion "too old"), as after an outage or a compaction.
kopf lists again and delivers what exists; what was deleted during the gap comes with no
event at all. The operator must still end right: a Deployment deleted by hand is
recreated, a deleted LLMBackend is forgotten (not its children recreated), a Service
edited by hand is restored.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from fabric_operator.localcluster import LocalControlPlane
from tests.support.faults import (
    FaultProxy,
    assert_alive,
    cpu_spec,
    create,
    delete,
    say,
    tracebacks,
    wait_converged,
)
from tests.support.fixtures import OperatorProcess
from tests.support.kube import Cluster, wait_for

pytestmark = pytest.mark.integration


def backends_held(op: OperatorProcess) -> int:
    """How many LLMBackends the operator holds (its /healthz, cached up to 10 s by kopf)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{op.port}/healthz", timeout=5) as resp:
        return int(json.loads(resp.read())["controller"]["backends"])


def test_what_changed_during_a_watch_gap_is_seen_after_the_relisting(
    cluster: Cluster, plane: LocalControlPlane, namespace: str, tmp_path: Path
) -> None:
    if not cluster.garbage_collector:
        pytest.skip("needs kube-controller-manager's garbage collector; this cluster has none")
    proxy = FaultProxy(plane, tmp_path / "proxy").start()
    op = OperatorProcess(proxy.kubeconfig(), tmp_path, f"--namespace={namespace}")
    try:
        op.start()
        for name in ("kept", "doomed", "edited"):
            create(cluster, namespace, name, cpu_spec())
        assert wait_converged(cluster, namespace, 30)[0].ok
        wait_for("the operator to hold 3 backends", lambda: backends_held(op) == 3, 20)
        old_uid = (cluster.deployment(namespace, "kept") or {})["metadata"]["uid"]

        cut = proxy.hold_watches(f"/namespaces/{namespace}/")
        say("INJECTED: %d watches of the operator cut and held (a gap it cannot see)", cut)
        cluster.apps.delete_namespaced_deployment("kept", namespace)
        delete(cluster, namespace, "doomed")
        cluster.core.patch_namespaced_service(
            "edited", namespace, {"spec": {"selector": {"llm.fabric.dev/backend": "kept"}}}
        )
        wait_for(
            "the garbage collector to delete doomed's children",
            lambda: cluster.children_gone(namespace, "doomed"),
            90,  # it finds a new CRD's objects on its next discovery (every 30 s)
        )
        wait_for(
            "kept's Deployment gone", lambda: cluster.deployment(namespace, "kept") is None, 10
        )
        time.sleep(2)
        proxy.release_watches()
        released = time.monotonic()
        say(
            "INJECTED during the gap: Deployment kept deleted, LLMBackend doomed deleted "
            "(its children by the garbage collector), Service edited's selector pointed at "
            "kept's pods; then every held watch answered 410 Gone"
        )

        report, took = wait_converged(cluster, namespace, 60)
        recreated = cluster.deployment(namespace, "kept")
        wait_for("the operator to forget doomed", lambda: backends_held(op) == 2, 30)
        time.sleep(3)  # nothing of doomed comes back
        logs = op.logs()
        say(
            "SAW after %.1fs: %s; %d watches answered 410; kept's Deployment %s; "
            "doomed's children %s; 'deleted while the watch was down' logged %d times",
            took,
            report.summary(),
            sum(proxy.expired.values()),
            "recreated" if recreated else "MISSING",
            "recreated" if cluster.deployment(namespace, "doomed") else "gone",
            logs.count("deleted while the watch was down"),
        )
        assert report.ok, report
        assert recreated is not None and recreated["metadata"]["uid"] != old_uid
        assert cluster.deployment(namespace, "doomed") is None
        assert cluster.service(namespace, "doomed") is None
        assert proxy.expired[f"/namespaces/{namespace}/"] >= 1
        assert "Deployment" in logs and "deleted while the watch was down" in logs
        assert time.monotonic() - released < 90
        assert_alive(op)
        assert not tracebacks(op)
    finally:
        op.stop()
        proxy.stop()
