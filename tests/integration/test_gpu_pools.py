"""Placement on simulated GPU node pools, rollouts that need no spare GPU, and diagnostics,
with the real scheduler deciding where pods go."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.fixtures import OperatorProcess, settle
from tests.support.kube import Cluster, add_node, wait_for
from tests.support.simulator import NodeSimulator

pytestmark = pytest.mark.integration

GPU_TAINT = [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]


@pytest.fixture(scope="module")
def pools(cluster: Cluster) -> Iterator[NodeSimulator]:
    if not cluster.local:
        pytest.skip("needs the local control plane (it adds simulated GPU nodes)")
    add_node(
        cluster,
        "sim-h100-0",
        labels={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        capacity={"nvidia.com/gpu": "8"},
        taints=GPU_TAINT,
    )
    add_node(
        cluster,
        "sim-l4-0",
        labels={"nvidia.com/gpu.product": "NVIDIA-L4"},
        capacity={"nvidia.com/gpu": "1"},
        taints=GPU_TAINT,
    )
    # The same GPU type as a PCIe board (one GPU: the 2-GPU backends stay on sim-h100-0),
    # and an AMD node known by its PCI device id alone.
    add_node(
        cluster,
        "sim-h100pcie-0",
        labels={"nvidia.com/gpu.product": "NVIDIA-H100-PCIe"},
        capacity={"nvidia.com/gpu": "1"},
        taints=GPU_TAINT,
    )
    # A decoy: free GPUs of another type (the 94 GB H100-NVL) that no H100-80GB pod may take.
    add_node(
        cluster,
        "sim-h100nvl-0",
        labels={"nvidia.com/gpu.product": "NVIDIA-H100-NVL"},
        capacity={"nvidia.com/gpu": "8"},
        taints=GPU_TAINT,
    )
    add_node(
        cluster,
        "sim-mi300x-0",
        labels={"amd.com/gpu.device-id": "74a1"},
        capacity={"amd.com/gpu": "8"},
        taints=[{"key": "amd.com/gpu", "value": "present", "effect": "NoSchedule"}],
    )
    sim = NodeSimulator(cluster).start()
    yield sim
    sim.stop()


def apply(cluster: Cluster, namespace: str, name: str, **spec: Any) -> None:
    manifest = {
        "apiVersion": "llm.fabric.dev/v1alpha1",
        "kind": "LLMBackend",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "engine": "vllm",
            "model": {"huggingface": {"repo": "Qwen/Qwen2.5-7B-Instruct"}},
            **spec,
        },
    }
    result = cluster.apply(manifest)
    assert result.returncode == 0, result.stderr


def pods(cluster: Cluster, namespace: str, name: str) -> list[Any]:
    return [
        p
        for p in cluster.core.list_namespaced_pod(
            namespace, label_selector=f"llm.fabric.dev/backend={name}"
        ).items
        if not p.metadata.deletion_timestamp
    ]


def phase(cluster: Cluster, namespace: str, name: str) -> str | None:
    return (cluster.backend(namespace, name).get("status") or {}).get("phase")


def test_h100_backend_lands_on_the_h100_pool(
    cluster: Cluster, operator: OperatorProcess, pools: NodeSimulator, namespace: str
) -> None:
    apply(cluster, namespace, "big", resources={"gpu": {"count": 2, "type": "H100-80GB"}})
    wait_for("Ready", lambda: phase(cluster, namespace, "big") == "Ready", 20)
    [pod] = pods(cluster, namespace, "big")
    # Not the H100-NVL node beside it, whose 8 GPUs are free: the pool's affinity holds.
    assert pod.spec.node_name == "sim-h100-0"
    assert pod.spec.containers[0].resources.limits == {"nvidia.com/gpu": "2"}
    args = pod.spec.containers[0].args
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    status = cluster.backend(namespace, "big")["status"]
    assert (status["readyReplicas"], status["ready"]) == (1, "1/1")


@pytest.mark.parametrize(
    ("name", "resources", "selector", "node"),
    [
        # The H100-80GB pool is both product strings: narrowed to PCIe, it is that node.
        (
            "pcie",
            {"gpu": {"count": 1, "type": "H100-80GB"}},
            {"nvidia.com/gpu.product": "NVIDIA-H100-PCIe"},
            "sim-h100pcie-0",
        ),
        # MI300X by product name or by device id: this node has the id only.
        ("mi300x", {"gpu": {"count": 4, "type": "MI300X", "vendor": "amd"}}, None, "sim-mi300x-0"),
    ],
)
def test_a_gpu_type_with_several_labels_is_placed_by_node_affinity(
    cluster: Cluster,
    operator: OperatorProcess,
    pools: NodeSimulator,
    namespace: str,
    name: str,
    resources: dict[str, Any],
    selector: dict[str, str] | None,
    node: str,
) -> None:
    extra = {"nodeSelector": selector} if selector else {}
    apply(cluster, namespace, name, resources=resources, **extra)
    wait_for("Ready", lambda: phase(cluster, namespace, name) == "Ready", 20)
    [pod] = pods(cluster, namespace, name)
    assert pod.spec.node_name == node
    terms = pod.spec.affinity.node_affinity.required_during_scheduling_ignored_during_execution
    assert all(t.match_expressions[-1].operator == "In" for t in terms.node_selector_terms)
    assert pods(cluster, namespace, name)[0].spec.node_name != "sim-h100nvl-0"


def test_cpu_backend_stays_off_the_gpu_pools(
    cluster: Cluster, operator: OperatorProcess, pools: NodeSimulator, namespace: str
) -> None:
    apply(cluster, namespace, "small", engine="llamacpp", model={"url": "https://h.invalid/m.gguf"})
    wait_for("Ready", lambda: phase(cluster, namespace, "small") == "Ready", 20)
    [pod] = pods(cluster, namespace, "small")
    assert pod.spec.node_name == "sim-cpu-0"
    assert "nvidia.com/gpu" not in (pod.spec.containers[0].resources.limits or {})


def test_more_gpus_than_any_node_is_unschedulable_with_the_schedulers_words(
    cluster: Cluster, operator: OperatorProcess, pools: NodeSimulator, namespace: str
) -> None:
    apply(cluster, namespace, "huge", resources={"gpu": {"count": 16, "type": "H100-80GB"}})
    wait_for("Unschedulable", lambda: phase(cluster, namespace, "huge") == "Unschedulable", 30)
    degraded = cluster.condition(namespace, "huge", "Degraded")
    assert degraded["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in degraded["message"]
    row = cluster.kubectl("get", "llmb", "huge", "-n", namespace, "--no-headers").stdout
    assert "Unschedulable" in row.split()
    settle(3)
    warnings = [e for e in cluster.events(namespace, "huge") if e["type"] == "Warning"]
    assert [e["reason"] for e in warnings] == ["Unschedulable"]


@pytest.mark.parametrize(
    ("mode", "reason"),
    [("crash", "CrashLoopBackOff"), ("image", "ImagePullBackOff"), ("loading", "Loading")],
)
def test_pod_failures_are_reported_by_name(
    cluster: Cluster,
    operator: OperatorProcess,
    pools: NodeSimulator,
    namespace: str,
    mode: str,
    reason: str,
) -> None:
    name = f"sick-{mode}"
    pools.fail[name] = mode
    apply(cluster, namespace, name, engine="llamacpp", model={"url": "https://h.invalid/m"})
    wait_for(reason, lambda: phase(cluster, namespace, name) == reason, 20)
    ready = cluster.condition(namespace, name, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", reason)
    degraded = cluster.condition(namespace, name, "Degraded")
    assert degraded["status"] == ("False" if mode == "loading" else "True")
    # Fixed on the node: back to Ready.
    pools.fail.pop(name)
    wait_for("Ready again", lambda: phase(cluster, namespace, name) == "Ready", 20)


def test_spec_change_on_a_full_gpu_pool_rolls_without_deadlock(
    cluster: Cluster, operator: OperatorProcess, pools: NodeSimulator, namespace: str
) -> None:
    # The L4 pool has exactly one GPU, and this backend takes it.
    apply(cluster, namespace, "l4", resources={"gpu": {"count": 1, "type": "L4"}})
    wait_for("Ready", lambda: phase(cluster, namespace, "l4") == "Ready", 20)
    [before] = pods(cluster, namespace, "l4")
    assert before.spec.node_name == "sim-l4-0"
    apply(
        cluster,
        namespace,
        "l4",
        resources={"gpu": {"count": 1, "type": "L4"}},
        engineOptions={"contextLength": 4096},
    )

    def rolled() -> bool:
        current = pods(cluster, namespace, "l4")
        return (
            len(current) == 1
            and current[0].metadata.uid != before.metadata.uid
            and "4096" in current[0].spec.containers[0].args
            and phase(cluster, namespace, "l4") == "Ready"
        )

    wait_for("the new pod Ready on the same single GPU", rolled, 40)
