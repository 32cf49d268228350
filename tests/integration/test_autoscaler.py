"""The autoscaler loop against a real API server, fed by a stub gateway load endpoint.

One operator (on a cluster of its own: it must be the only one acting on these backends)
with `--gateway-load-url` pointing at the stub. The phases run in order on one backend:
scale from zero within a second of a held request, follow load to the maximum, win
against `kubectl scale`, keep the replicas across an operator restart, and scale to zero
after the delay. Discovery (which pods count as gateways) is checked against pods listed
and watched from the same API server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fabric_operator.autoscaler.discovery import GATEWAY_LABELS, GatewayPods
from fabric_operator.gateway.kubewatch import ApiClient
from tests.support.fixtures import OperatorProcess, local_cluster, temporary_namespace
from tests.support.kube import Cluster, wait_for
from tests.support.loadserver import LoadServer

pytestmark = pytest.mark.integration

NAME = "scaled"


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with local_cluster(tmp_path_factory) as c:
        yield c


@pytest.fixture(scope="module")
def stub() -> Iterator[LoadServer]:
    server = LoadServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def scaling_operator(
    own_cluster: Cluster, stub: LoadServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    op = OperatorProcess(
        own_cluster.kubeconfig,
        tmp_path_factory.mktemp("operator"),
        f"--gateway-load-url={stub.url}",
    )
    op.start()
    yield op
    op.stop()


@pytest.fixture(scope="module")
def ns(own_cluster: Cluster) -> Iterator[str]:
    with temporary_namespace(own_cluster) as name:
        yield name


def manifest(namespace: str, name: str, autoscaling: dict[str, Any] | None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "engine": "llamacpp",
        "model": {"url": "https://example.invalid/tiny.gguf"},
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
        "replicas": 0,
    }
    if autoscaling is not None:
        spec["autoscaling"] = autoscaling
    return {
        "apiVersion": "llm.fabric.dev/v1alpha1",
        "kind": "LLMBackend",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def replicas(cluster: Cluster, ns: str) -> int:
    return int(cluster.backend(ns, NAME)["spec"].get("replicas", 1))


def autoscaling(cluster: Cluster, ns: str) -> dict[str, Any]:
    status = cluster.backend(ns, NAME).get("status") or {}
    found: dict[str, Any] = status.get("autoscaling") or {}
    return found


def events(cluster: Cluster, ns: str, reason: str) -> list[dict[str, Any]]:
    return [e for e in cluster.events(ns, NAME) if e["reason"] == reason]


def deployment_replicas(cluster: Cluster, ns: str) -> int | None:
    dep = cluster.deployment(ns, NAME)
    return None if dep is None else int(dep["spec"]["replicas"])


def test_no_stream_without_an_autoscaled_backend_then_one(
    own_cluster: Cluster, scaling_operator: OperatorProcess, stub: LoadServer, ns: str
) -> None:
    own_cluster.apply(manifest(ns, "plain", None))
    wait_for("the plain backend's status", lambda: own_cluster.backend(ns, "plain").get("status"))
    assert stub.connects == 0  # reconciled, and no gateway asked for its load
    own_cluster.apply(
        manifest(
            ns,
            NAME,
            {"minReplicas": 0, "maxReplicas": 4, "targetRequests": 2, "scaleDownDelaySeconds": 3},
        )
    )
    wait_for("the operator's load stream", lambda: stub.connects >= 1, 10)
    # (A decision before the first report may say gateways 0: no reading yet.)
    wait_for(
        "a decision on the gateway's report: at zero, no demand",
        lambda: autoscaling(own_cluster, ns).get("gateways") == 1,
        10,
    )
    status = autoscaling(own_cluster, ns)
    assert status["reason"] == "ScaledToZero" and status["desiredReplicas"] == 0
    assert replicas(own_cluster, ns) == 0


def test_a_held_request_scales_from_zero_within_a_second(
    own_cluster: Cluster, scaling_operator: OperatorProcess, stub: LoadServer, ns: str
) -> None:
    started = time.monotonic()
    stub.set(f"{ns}/{NAME}", held=1)
    wait_for("spec.replicas 1", lambda: replicas(own_cluster, ns) == 1, 5, interval=0.01)
    took = time.monotonic() - started
    print(f"\nheld=1 at zero -> spec.replicas 1 written and read back in {took:.3f}s")
    assert took < 1.0, took
    wait_for("the Deployment at 1", lambda: deployment_replicas(own_cluster, ns) == 1, 10)
    [event] = wait_for("a ScaledUp event", lambda: events(own_cluster, ns, "ScaledUp"), 5)
    assert event["type"] == "Normal"
    assert event["message"] == "0 -> 1 replicas: 1 request held, scaling from zero"


def test_requests_the_engine_reports_scale_it_too(
    own_cluster: Cluster, scaling_operator: OperatorProcess, stub: LoadServer, ns: str
) -> None:
    # Six requests at the engine pods, two of them through the gateway, four straight to
    # the Service: demand 6 (not 8: the gateway's are at the engine too), target 2 per
    # replica -> 3 replicas. (From 1 replica the panic window asks for 3 within ~3 s.)
    stub.set(f"{ns}/{NAME}", in_flight=2, engine=6)
    wait_for("spec.replicas 3", lambda: replicas(own_cluster, ns) == 3, 15)
    wait_for("status.autoscaling.demand 6", lambda: autoscaling(own_cluster, ns)["demand"] == 6, 5)
    assert replicas(own_cluster, ns) == 3  # never 4, as a sum would have it


def test_load_scales_up_to_the_maximum(
    own_cluster: Cluster, scaling_operator: OperatorProcess, stub: LoadServer, ns: str
) -> None:
    stub.set(f"{ns}/{NAME}", in_flight=8)
    wait_for("spec.replicas 4", lambda: replicas(own_cluster, ns) == 4, 5)
    wait_for("the Deployment at 4", lambda: deployment_replicas(own_cluster, ns) == 4, 10)
    stub.set(f"{ns}/{NAME}", in_flight=12)
    wait_for(
        "reason AtMaximum",
        lambda: autoscaling(own_cluster, ns).get("reason") == "AtMaximum",
        10,
    )
    assert replicas(own_cluster, ns) == 4
    assert "maximum 4" in autoscaling(own_cluster, ns)["message"]


def test_kubectl_scale_is_overridden_with_a_warning(
    own_cluster: Cluster, scaling_operator: OperatorProcess, ns: str
) -> None:
    own_cluster.kubectl("scale", "llmbackend", NAME, "-n", ns, "--replicas=2")
    [warning] = wait_for(
        "a ReplicasOverridden warning",
        lambda: events(own_cluster, ns, "ReplicasOverridden"),
        5,
    )
    assert warning["type"] == "Warning"
    assert "owned by spec.autoscaling" in warning["message"]
    wait_for("spec.replicas back to 4", lambda: replicas(own_cluster, ns) == 4, 5)
    wait_for("the Deployment at 4", lambda: deployment_replicas(own_cluster, ns) == 4, 10)


def test_a_restart_under_load_does_not_scale_down(
    own_cluster: Cluster, scaling_operator: OperatorProcess, stub: LoadServer, ns: str
) -> None:
    stub.set(f"{ns}/{NAME}", in_flight=2)  # a fresh state would want 1 replica for this
    connects = stub.connects
    scaling_operator.restart()
    wait_for("the restarted operator's stream", lambda: stub.connects > connects, 15)
    lines = stub.lines
    # Reports keep coming (a heartbeat every 0.5 s); the loop decides on each.
    wait_for("three seconds of reports", lambda: stub.lines >= lines + 6, 10)
    series = f'fabric_operator_autoscaler_desired_replicas{{namespace="{ns}",name="{NAME}"}}'
    wait_for("the new process's decision", lambda: scaling_operator.metric(series) == 4, 5)
    assert replicas(own_cluster, ns) == 4
    down = 'fabric_operator_autoscaler_scale_events_total{direction="down"}'
    assert scaling_operator.metric(down) == 0


def test_no_demand_scales_to_zero_after_the_delay(
    own_cluster: Cluster, scaling_operator: OperatorProcess, stub: LoadServer, ns: str
) -> None:
    stub.set(f"{ns}/{NAME}")
    started = time.monotonic()
    # The delay is 3 s, but a state younger than the stable window (60 s, the restart
    # above) and a panic (60 s) never scale down: at most about a minute and a half.
    wait_for("spec.replicas 0", lambda: replicas(own_cluster, ns) == 0, 120, interval=0.5)
    print(f"\ndemand 0 -> spec.replicas 0 after {time.monotonic() - started:.1f}s")
    [event] = wait_for("a ScaledToZero event", lambda: events(own_cluster, ns, "ScaledToZero"), 5)
    assert event["message"].startswith("4 -> 0 replicas: no requests for 3s")
    wait_for(
        "reason ScaledToZero",
        lambda: autoscaling(own_cluster, ns).get("reason") == "ScaledToZero",
        10,
    )
    wait_for("the Deployment at 0", lambda: deployment_replicas(own_cluster, ns) == 0, 10)


def gateway_pod(namespace: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(GATEWAY_LABELS)},
        "spec": {
            "nodeName": "sim-cpu-0",
            "containers": [
                {
                    "name": "gateway",
                    "image": "fabric-operator:test",
                    "ports": [
                        {"name": "http", "containerPort": 8000},
                        {"name": "metrics", "containerPort": 9090},
                    ],
                }
            ],
        },
    }


def make_ready(cluster: Cluster, namespace: str, name: str, ip: str) -> None:
    cluster.core.patch_namespaced_pod_status(
        name,
        namespace,
        {
            "status": {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": "True"}],
            }
        },
    )


def test_only_gateway_pods_of_the_gateway_namespace_are_used(
    own_cluster: Cluster, tmp_path: Path
) -> None:
    if not own_cluster.local:
        pytest.skip("needs the local control plane's simulated node (pods made Ready by hand)")
    with temporary_namespace(own_cluster) as gateways, temporary_namespace(own_cluster) as team:
        for namespace, name, ip in (
            (gateways, "gateway-0", "10.9.0.1"),
            (team, "fake-gateway", "10.9.0.66"),  # a tenant's pod with the gateway's labels
        ):
            own_cluster.core.create_namespaced_pod(namespace, gateway_pod(namespace, name))
            make_ready(own_cluster, namespace, name, ip)
        own_cluster.core.create_namespaced_pod(gateways, gateway_pod(gateways, "starting"))

        async def discover() -> list[set[str]]:
            seen: list[set[str]] = []
            api = ApiClient(str(own_cluster.kubeconfig))
            pods = GatewayPods(api, gateways, seen.append)
            task = asyncio.create_task(pods.run())
            try:
                for _ in range(200):
                    if seen and "http://10.9.0.1:9090/load" in seen[-1]:
                        break
                    await asyncio.sleep(0.05)
                make_ready(own_cluster, gateways, "starting", "10.9.0.2")  # a watch event
                for _ in range(200):
                    if "http://10.9.0.2:9090/load" in seen[-1]:
                        break
                    await asyncio.sleep(0.05)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await api.close()
            return seen

        seen = asyncio.run(discover())
        assert seen[-1] == {"http://10.9.0.1:9090/load", "http://10.9.0.2:9090/load"}, seen
        assert not any("10.9.0.66" in url for urls in seen for url in urls)
