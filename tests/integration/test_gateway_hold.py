"""Requests for an autoscaled backend without a ready pod: held by the gateway (counted on
its /load, which the autoscaler reads) and answered when a pod becomes ready (woken by
the Endpoints change, not by polling); past the hold timeout a 503 with Retry-After, or
the fallback; over the cap at once. The gateway watches a real API server; the pod is a
test host in a network namespace this run creates, made Ready as a kubelet would."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from fabric_operator.gateway.routes import KEY_LABEL
from tests.support.fixtures import OperatorProcess
from tests.support.gateway import gateway
from tests.support.kube import Cluster, run_pods, wait_for
from tests.support.testhost import netns_host
from tests.support.upstream import Process, upstream

pytestmark = pytest.mark.integration

KEY = "sk-hold-4e1"
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def gw(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    with gateway(
        f"--kubeconfig={cluster.kubeconfig}",
        "--remote-http-hosts=127.0.0.1",
        workdir=tmp_path_factory.mktemp("gateway"),
        ready_path="/readyz",
    ) as g:
        yield g


def chat(gw: Process, model: str, timeout: float = 30.0) -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": model, **CHAT},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=timeout,
    )


def held(gw: Process, ident: str) -> int:
    report = httpx.get(gw.load_url, timeout=5).json()  # type: ignore[attr-defined]
    return int(report["backends"].get(ident, {}).get("held", 0))


def backend(cluster: Cluster, ns: str, name: str, **spec: Any) -> None:
    cluster.apply(
        {
            "apiVersion": "llm.fabric.dev/v1alpha1",
            "kind": "LLMBackend",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "engine": "llamacpp",
                "model": {"url": "https://example.invalid/tiny.gguf"},
                "replicas": 0,
                **spec,
            },
        }
    )


def models(gw: Process) -> set[str]:
    resp = httpx.get(gw.url + "/v1/models", headers={"authorization": f"Bearer {KEY}"}, timeout=5)
    return {m["id"] for m in resp.json().get("data", [])} if resp.status_code == 200 else set()


def routable(gw: Process, model: str) -> None:
    wait_for(f"{model} to be routed", lambda: model in models(gw), 20, interval=0.05)


@pytest.fixture
def team(cluster: Cluster, namespace: str) -> str:
    cluster.core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "team", "labels": {KEY_LABEL: "true"}},
            "stringData": {"key": KEY, "models": "*"},
        },
    )
    return namespace


def test_a_request_while_no_pod_is_ready_is_held_then_answered_when_one_is(
    cluster: Cluster, operator: OperatorProcess, gw: Process, team: str, tmp_path: Path
) -> None:
    """One replica, its pod scheduled but not Ready yet (a model loading): the request
    waits for it. (Scaling from zero to that pod: tests/e2e/test_in_cluster.py, on a real
    node; here the session's operator and its autoscaler run too, and min = max = 1 keeps
    the autoscaler out of the way.)"""
    ns, ident = team, f"{team}/lazy"
    backend(cluster, ns, "lazy", replicas=1, autoscaling={"minReplicas": 1, "maxReplicas": 1})
    routable(gw, "lazy")
    with (
        netns_host(tmp_path) as host,
        upstream("pod", host=host.ip, port=8080, enter=host.enter),
        ThreadPoolExecutor(1) as pool,
    ):
        waiting = pool.submit(chat, gw, "lazy")
        wait_for("the request to be held", lambda: held(gw, ident) == 1, 10, interval=0.05)
        assert not waiting.done()
        selector = "llm.fabric.dev/backend=lazy"
        wait_for("the pod to be scheduled", lambda: run_pods(cluster, ns, selector, [host.ip]), 30)
        ready = time.monotonic()
        resp = waiting.result(timeout=20)
        answered = time.monotonic() - ready
        print(f"pod Ready -> held request answered in {answered:.2f}s")
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-fabric-backend"] == ident
        assert resp.headers["x-upstream"] == "pod"
        assert answered < 3.0  # woken by the Endpoints change (a poll would be the hold)
    # Still reported for a second after it ended (so the autoscaler cannot miss it).
    wait_for("the hold to leave /load", lambda: held(gw, ident) == 0, 3, interval=0.05)


def test_past_the_hold_timeout_a_503_with_retry_after(
    cluster: Cluster, gw: Process, team: str
) -> None:
    backend(
        cluster,
        team,
        "cold",
        autoscaling={"minReplicas": 0, "maxReplicas": 1, "holdTimeoutSeconds": 1},
    )
    routable(gw, "cold")
    start = time.monotonic()
    resp = chat(gw, "cold")
    took = time.monotonic() - start
    assert resp.status_code == 503, resp.text
    assert resp.headers["retry-after"] == "10"
    error = resp.json()["error"]
    assert error["code"] == "upstream_unavailable" and f"{team}/cold" in error["message"]
    assert 0.9 <= took < 3.0, took
    assert held(gw, f"{team}/cold") == 0


def test_held_past_fallback_after_goes_to_the_fallback_which_names_itself(
    cluster: Cluster, gw: Process, team: str
) -> None:
    with upstream("provider", "--key", "sk-provider-31") as provider:
        cluster.core.create_namespaced_secret(
            team, {"metadata": {"name": "provider"}, "stringData": {"k": "sk-provider-31"}}
        )
        cluster.apply(
            {
                "apiVersion": "llm.fabric.dev/v1alpha1",
                "kind": "LLMBackend",
                "metadata": {"name": "cloud", "namespace": team},
                "spec": {
                    "engine": "remote",
                    "remote": {"baseURL": provider.url, "model": "gpt-4o", "provider": "openai"},
                    "apiKeySecretRef": {"name": "provider", "key": "k"},
                },
            }
        )
        backend(
            cluster,
            team,
            "warm",
            fallback=["cloud"],
            autoscaling={"minReplicas": 0, "maxReplicas": 1, "fallbackAfterSeconds": 1},
        )
        routable(gw, "warm")
        wait_for("the fallback to be routed", lambda: chat(gw, "cloud").status_code == 200, 20)
        start = time.monotonic()
        resp = chat(gw, "warm")
        took = time.monotonic() - start
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-fabric-backend"] == f"{team}/cloud"
        assert resp.headers["x-upstream"] == "provider"
        assert 0.9 <= took < 3.0, took


def test_over_the_held_cap_refused_at_once_and_a_client_that_leaves_is_no_longer_held(
    cluster: Cluster, gw: Process, team: str
) -> None:
    backend(
        cluster,
        team,
        "capped",
        autoscaling={"minReplicas": 0, "maxReplicas": 1, "maxHeldRequests": 1},
    )
    routable(gw, "capped")
    ident = f"{team}/capped"
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(chat, gw, "capped", 2.0)  # gives up after 2 s
        wait_for("one request held", lambda: held(gw, ident) == 1, 10, interval=0.05)
        start = time.monotonic()
        second = chat(gw, "capped")
        assert second.status_code == 503 and second.headers["retry-after"] == "10"
        assert time.monotonic() - start < 1.0  # not held: over the cap
        with pytest.raises(httpx.ReadTimeout):
            first.result(timeout=10)
    wait_for("the departed client's request to be let go", lambda: held(gw, ident) == 0, 5)
