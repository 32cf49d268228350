"""Two operator replicas with --leader-elect on a cluster of their own: one acts, the
other waits with a warm cache, and takes over when the leader is killed."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.fixtures import OperatorProcess, local_cluster
from tests.support.kube import Cluster, wait_for

pytestmark = pytest.mark.integration


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


def applies(op: OperatorProcess) -> float:
    return sum(v for k, v in op.api_requests().items() if 'verb="apply"' in k)


def test_one_replica_acts_and_the_other_takes_over(
    own_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> None:
    flags = ("--leader-elect", "--leader-election-namespace=default")
    a = OperatorProcess(own_cluster.kubeconfig, tmp_path_factory.mktemp("a"), *flags)
    b = OperatorProcess(own_cluster.kubeconfig, tmp_path_factory.mktemp("b"), *flags)
    a.start()
    wait_for("a to lead", lambda: a.health()["leading"], 30)
    b.start()
    try:
        own_cluster.apply(backend("first"))
        wait_for("children of first", lambda: own_cluster.deployment("default", "first"), 30)
        time.sleep(2)
        assert a.health()["leading"] and not b.health()["leading"]
        assert applies(a) >= 2 and applies(b) == 0, (a.api_requests(), b.api_requests())
        print(f"leader a applied {applies(a):.0f} children; follower b applied 0")

        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_for("b to take over", lambda: b.health()["leading"], 40, interval=0.5)
        took = time.monotonic() - killed
        own_cluster.apply(backend("second"))
        wait_for("children of second", lambda: own_cluster.deployment("default", "second"), 30)
        lease = own_cluster.kubectl(
            "get",
            "lease",
            "fabric-operator",
            "-n",
            "default",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ).stdout
        print(f"b took over {took:.1f}s after a was killed; lease holder {lease}")
        assert took < 30
        # b's restart-style resync re-applied nothing of first (unchanged).
        assert applies(b) == 2, b.api_requests()
    finally:
        a.stop()
        b.stop()
