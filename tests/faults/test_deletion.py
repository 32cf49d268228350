"""Deletion never waits for the operator: with it killed (as after an uninstall or a crash),
LLMBackends and whole namespaces are deleted in seconds, whatever the propagation policy, and
the garbage collector removes their children."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from fabric_operator.api.v1alpha1 import GROUP, PLURAL, VERSION
from fabric_operator.localcluster import LocalControlPlane
from tests.support.faults import (
    cpu_spec,
    create,
    list_backends,
    list_children,
    say,
    sigkill,
    tracebacks,
)
from tests.support.fixtures import OperatorProcess
from tests.support.kube import Cluster, wait_for
from tests.support.simulator import NodeSimulator

pytestmark = pytest.mark.integration

SPECS: dict[str, dict[str, Any]] = {
    "background": cpu_spec(),
    "foreground": cpu_spec(replicas=1),
    "orphan": cpu_spec(),
    "kubectl": cpu_spec(servedModelName="k"),
    "invalid": {"engine": "ollama", "model": {"url": "https://models.invalid/x.gguf"}},
}


def _delete(cluster: Cluster, ns: str, name: str, policy: str | None) -> None:
    body = {"propagationPolicy": policy} if policy else None
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, body=body)


def _gone(cluster: Cluster, ns: str, name: str) -> bool:
    try:
        cluster.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
    except ApiException as err:
        if err.status == 404:
            return True
        raise
    return False


def test_deletion_without_the_operator(cluster: Cluster, tmp_path: Path) -> None:
    if not cluster.garbage_collector:
        pytest.skip("needs kube-controller-manager's garbage collector; this cluster has none")
    ns, doomed = f"t-{uuid.uuid4().hex[:8]}", f"t-{uuid.uuid4().hex[:8]}"
    for name in (ns, doomed):
        cluster.core.create_namespace({"metadata": {"name": name}})
        wait_for(
            "the default ServiceAccount",
            lambda n=name: cluster.core.list_namespaced_service_account(n).items,
            30,
        )
    op = OperatorProcess(cluster.kubeconfig, tmp_path, f"--namespace={ns},{doomed}")
    op.start()
    try:
        for name, spec in SPECS.items():
            create(cluster, ns, name, spec)
        for i in range(3):
            create(cluster, doomed, f"b{i}", cpu_spec())
        for name in (n for n in SPECS if n != "invalid"):
            wait_for(f"{name}'s children", lambda n=name: cluster.service(ns, n), 15)
        wait_for("doomed's children", lambda: len(list_children(cluster, doomed)[1]) == 3, 15)
        wait_for(
            "InvalidSpec",
            lambda: (cluster.backend(ns, "invalid").get("status") or {}).get("phase") == "Invalid",
            15,
        )
        objects = list_backends(cluster, ns) + list_backends(cluster, doomed)
        deployments, services = list_children(cluster, ns)
        finalizers = {
            o["metadata"]["name"]: o["metadata"].get("finalizers")
            for o in objects + deployments + services
            if o["metadata"].get("finalizers")
        }
        say("SAW finalizers on LLMBackends and children: %s", finalizers or "none")
        assert not finalizers
        pid = sigkill(op)
        say("INJECTED: operator (pid %d) SIGKILLed; it stays down for this test", pid)
    finally:
        op.stop()

    # A kubelet stand-in confirms pod deletions (foreground deletion waits for the pods).
    kubelet = NodeSimulator(cluster).start()
    try:
        _delete_all(cluster, ns, doomed)
    finally:
        kubelet.stop()
    cluster.core.delete_namespace(ns)


def _delete_all(cluster: Cluster, ns: str, doomed: str) -> None:
    started = time.monotonic()
    _delete(cluster, ns, "background", "Background")
    _delete(cluster, ns, "foreground", "Foreground")
    _delete(cluster, ns, "orphan", "Orphan")
    _delete(cluster, ns, "invalid", None)
    kubectl = cluster.kubectl(
        "delete", "llmb/kubectl", "-n", ns, "--wait=true", "--timeout=30s", check=False
    )
    cluster.core.delete_namespace(doomed)
    say(
        "INJECTED: deleted LLMBackends background, foreground, orphan (propagation policies), "
        "invalid, kubectl (kubectl delete --wait) and namespace %s with 3 backends",
        doomed,
    )
    assert kubectl.returncode == 0, kubectl.stderr
    took: dict[str, float] = {}
    deadline = started + 90
    while len(took) < len(SPECS) and time.monotonic() < deadline:
        for name in SPECS:
            if name not in took and _gone(cluster, ns, name):
                took[name] = round(time.monotonic() - started, 1)
        time.sleep(0.2)
    assert len(took) == len(SPECS), f"still there after 90s: {set(SPECS) - set(took)}"
    for name in ("background", "foreground", "kubectl"):
        wait_for(
            f"{name}'s children to be garbage-collected",
            lambda n=name: cluster.children_gone(ns, n),
            60,
        )
    took["children"] = round(time.monotonic() - started, 1)
    wait_for(
        f"namespace {doomed} to be gone",
        lambda: doomed not in [n.metadata.name for n in cluster.core.list_namespace().items],
        90,
        interval=0.5,
    )
    took["namespace"] = round(time.monotonic() - started, 1)
    # Orphan propagation: the user asked to keep the children; they lose their owner.
    kept = cluster.deployment(ns, "orphan")
    assert kept is not None and not kept["metadata"].get("ownerReferences")
    say("SAW everything deleted without the operator; seconds after the first delete: %s", took)


def test_children_the_garbage_collector_misses_are_deleted_by_the_operator(
    cluster: Cluster, plane: LocalControlPlane, namespace: str, tmp_path: Path
) -> None:
    """The garbage collector frozen (kube-controller-manager SIGSTOPped), as one whose
    watches lost a deletion: the children of a deleted LLMBackend would run forever. The
    operator deletes them once the grace period is over; children orphaned on purpose
    (propagation Orphan) and those of a backend re-created under the same name are kept."""
    manager = plane.processes.get("kube-controller-manager")
    if manager is None:
        pytest.skip("needs kube-controller-manager (to freeze its garbage collector)")
    op = OperatorProcess(
        cluster.kubeconfig, tmp_path, f"--namespace={namespace}", "--orphan-grace=3"
    )
    op.start()
    try:
        for name in ("missed", "recreated", "orphaned"):
            create(cluster, namespace, name, cpu_spec())
        for name in ("missed", "recreated", "orphaned"):
            wait_for(f"{name}'s children", lambda n=name: cluster.service(namespace, n), 15)
        # Orphaned on purpose, while the garbage collector still works: it drops the owner.
        _delete(cluster, namespace, "orphaned", "Orphan")
        wait_for(  # the collector finds a new CRD's objects on its next discovery (30 s)
            "orphaned to be gone", lambda: _gone(cluster, namespace, "orphaned"), 90
        )
        os.kill(manager.pid, signal.SIGSTOP)
        try:
            old = (cluster.deployment(namespace, "recreated") or {})["metadata"]["uid"]
            _delete(cluster, namespace, "missed", "Background")
            _delete(cluster, namespace, "recreated", "Background")
            create(cluster, namespace, "recreated", cpu_spec(servedModelName="again"))
            say(
                "INJECTED: garbage collector frozen (kube-controller-manager SIGSTOPped); "
                "LLMBackend missed deleted, recreated deleted and created again"
            )
            wait_for(
                "missed's children deleted by the operator",
                lambda: cluster.children_gone(namespace, "missed"),
                30,
            )
            time.sleep(4)  # past the grace period of recreated's old uid
        finally:
            os.kill(manager.pid, signal.SIGCONT)
        dep = cluster.deployment(namespace, "recreated")
        kept = cluster.deployment(namespace, "orphaned")
        logs = op.logs()
        say(
            "SAW missed's children deleted by the operator; recreated's Deployment %s (uid %s); "
            "orphaned's kept %s",
            "kept" if dep else "MISSING",
            "unchanged" if dep and dep["metadata"]["uid"] == old else "new",
            bool(kept),
        )
        assert "the garbage collector missed them" in logs
        assert dep is not None and dep["metadata"]["uid"] == old  # taken over, not replaced
        owners = [r["name"] for r in dep["metadata"]["ownerReferences"]]
        assert owners == ["recreated"]
        assert kept is not None and not kept["metadata"].get("ownerReferences")
        assert cluster.service(namespace, "orphaned") is not None
        assert not tracebacks(op)
    finally:
        op.stop()
