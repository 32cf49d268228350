"""Paced upgrades on a real API server: an operator that renders ten running backends
differently (an image mirror in its config, as a new pinned image would) rolls at most
`maxUpgradeRollouts` of them at a time, all converge, and a user's spec change made
meanwhile is applied at once. Pods run on a simulated node whose pods take a while to
become Ready, as a model takes to load."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fabric_operator.controller.pacing import rolling
from tests.support.fixtures import OperatorProcess, local_cluster, temporary_namespace
from tests.support.kube import Cluster, add_node, wait_for
from tests.support.simulator import NodeSimulator

pytestmark = pytest.mark.integration

BACKENDS = 10
LIMIT = 2
PINNED = "ghcr.io/ggml-org/llama.cpp:server-b10290"
MIRROR = "mirror.invalid/llama.cpp:server-b10290"
LOAD_SECONDS = 2.0
NAMES = [f"b{i}" for i in range(BACKENDS)]


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with local_cluster(tmp_path_factory) as c:
        if not c.local:
            pytest.skip("needs the local control plane (it adds a simulated node)")
        add_node(c, "sim-cpu-0", capacity={"cpu": "64", "memory": "256Gi", "pods": "110"})
        sim = NodeSimulator(c, ready_after=LOAD_SECONDS).start()
        yield c
        sim.stop()


def manifest(ns: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "llm.fabric.dev/v1alpha1",
        "kind": "LLMBackend",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "engine": "llamacpp",
            "model": {"url": "https://models.invalid/tiny.gguf"},
            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
        },
    }


def image(dep: dict[str, Any]) -> str:
    return str(dep["spec"]["template"]["spec"]["containers"][0]["image"])


def deployments(cluster: Cluster, ns: str) -> dict[str, dict[str, Any]]:
    listed = cluster.apps.list_namespaced_deployment(ns, _preload_content=False)
    return {d["metadata"]["name"]: d for d in json.loads(listed.data)["items"]}


def all_ready(cluster: Cluster, ns: str) -> bool:
    return all((cluster.backend(ns, n).get("status") or {}).get("phase") == "Ready" for n in NAMES)


@pytest.fixture
def ten_running(own_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A namespace with ten Ready backends, rendered by the operator before the upgrade."""
    with temporary_namespace(own_cluster) as ns:
        old = OperatorProcess(
            own_cluster.kubeconfig,
            tmp_path_factory.mktemp("op-old"),
            config={"maxUpgradeRollouts": LIMIT},
        )
        old.start()
        try:
            for name in NAMES:
                assert own_cluster.apply(manifest(ns, name)).returncode == 0
            wait_for("all ten Ready", lambda: all_ready(own_cluster, ns), 120)
        finally:
            old.stop()
        yield ns


class Sampler(threading.Thread):
    """Every Deployment and status, every 50 ms: which roll onto the mirror image at
    once, and which say their upgrade is queued."""

    def __init__(self, cluster: Cluster, ns: str) -> None:
        super().__init__(daemon=True)
        self.cluster, self.ns = cluster, ns
        self.upgrading: list[set[str]] = []
        self.queued: set[str] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            deps = deployments(self.cluster, self.ns)
            self.upgrading.append({n for n, d in deps.items() if image(d) == MIRROR and rolling(d)})
            for n in NAMES:
                status = self.cluster.backend(self.ns, n).get("status") or {}
                for cond in status.get("conditions") or []:
                    if cond["type"] == "Progressing" and cond["reason"] == "UpgradeQueued":
                        self.queued.add(n)
            time.sleep(0.05)


def test_an_operator_upgrade_rolls_at_most_the_limit_at_once_and_user_changes_go_first(
    own_cluster: Cluster, ten_running: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cluster, ns = own_cluster, ten_running
    new = OperatorProcess(
        cluster.kubeconfig,
        tmp_path_factory.mktemp("op-new"),
        config={"maxUpgradeRollouts": LIMIT, "images": {PINNED: MIRROR}},
    )
    sampler = Sampler(cluster, ns)
    sampler.start()
    new.start()
    try:
        # One that waits gets a change from its user: applied at once, not queued.
        def still_queued() -> str | None:
            deps = deployments(cluster, ns)
            old = [n for n in sorted(sampler.queued) if image(deps[n]) != MIRROR]
            return old[-1] if old else None

        user = wait_for("a backend queued", still_queued, 60)
        changed_at = time.monotonic()
        patch = '{"spec":{"engineOptions":{"contextLength":2048}}}'
        done = cluster.kubectl("patch", "llmb", user, "-n", ns, "--type=merge", "-p", patch)
        assert done.returncode == 0, done.stderr

        def applied() -> bool:
            args = deployments(cluster, ns)[user]["spec"]["template"]["spec"]["containers"][0]
            return "2048" in args["args"]

        wait_for(f"{user}'s own change applied", applied, 10)
        took = time.monotonic() - changed_at
        # Not behind the queue: others had not had their turn yet when it went through.
        behind = [n for n, d in deployments(cluster, ns).items() if image(d) != MIRROR]
        wait_for(
            "every backend on the mirror image, rolled and Ready",
            lambda: (
                all(
                    image(d) == MIRROR and not rolling(d) for d in deployments(cluster, ns).values()
                )
                and all_ready(cluster, ns)
            ),
            240,
        )
    finally:
        sampler.stop.set()
        sampler.join(timeout=5)
        new.stop()
    # The user's own rollout is not the operator's: it does not count against the limit.
    peak = max(len(s - {user}) for s in sampler.upgrading)
    print(
        f"\npaced upgrade: peak {peak} rolling (limit {LIMIT}), {len(sampler.queued)} queued, "
        f"a user's change applied in {took:.2f}s, {len(sampler.upgrading)} samples"
    )
    assert len(sampler.upgrading) > 20
    assert peak <= LIMIT, peak
    assert peak == LIMIT  # the limit was used: not one at a time
    assert len(sampler.queued) >= BACKENDS - LIMIT - 1
    assert behind, "every other backend had rolled before the user's change was applied"
    queued_events = [
        e for n in NAMES for e in cluster.events(ns, n) if e["reason"] == "UpgradeQueued"
    ]
    assert queued_events and all(e["type"] == "Normal" for e in queued_events)
