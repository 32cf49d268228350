"""The gateway learning backends and keys from a real API server: created -> routable,
deleted -> 404, key Secret added -> accepted, removed -> refused; pods reached at the
addresses the real Endpoints controller publishes. (Tenancy: test_tenancy.py.)"""

from __future__ import annotations

import time
from collections.abc import Iterator
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

CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def gw(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    workdir = tmp_path_factory.mktemp("gateway")
    # The test's fake provider listens on 127.0.0.1: allowed over http here, by the flag
    # an admin would use for a trusted in-cluster server.
    with gateway(
        f"--kubeconfig={cluster.kubeconfig}",
        "--remote-http-hosts=127.0.0.1",
        workdir=workdir,
        ready_path="/readyz",
    ) as g:
        yield g


def key_secret(ns: str, name: str, key: str, **data: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": ns, "labels": {KEY_LABEL: "true"}},
        "stringData": {"key": key, "models": "*", **data},
    }


def chat(gw: Process, key: str, model: str) -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/chat/completions",
        json={"model": model, **CHAT},
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )


def until(what: str, check: Any, timeout: float = 10.0) -> float:
    """Seconds until check() held."""
    start = time.monotonic()
    wait_for(what, check, timeout, interval=0.02)
    return time.monotonic() - start


def test_remote_backend_and_keys_follow_the_api(
    cluster: Cluster, gw: Process, namespace: str
) -> None:
    """The gateway alone: a remote backend is routed from its spec (the operator's status
    for it is the operator's tests' concern: 127.0.0.1 is not on its default list)."""
    with upstream("provider", "--key", "sk-provider-9d1e") as provider:
        cluster.core.create_namespaced_secret(
            namespace,
            {"metadata": {"name": "provider"}, "stringData": {"api-key": "sk-provider-9d1e"}},
        )
        cluster.core.create_namespaced_secret(namespace, key_secret(namespace, "team", "sk-t1"))
        until("the key to be accepted", lambda: chat(gw, "sk-t1", "x").status_code == 404)
        cluster.apply(
            {
                "apiVersion": "llm.fabric.dev/v1alpha1",
                "kind": "LLMBackend",
                "metadata": {"name": "cloud", "namespace": namespace},
                "spec": {
                    "engine": "remote",
                    "servedModelName": "smart",
                    "remote": {"baseURL": provider.url, "model": "gpt-4o", "provider": "openai"},
                    "apiKeySecretRef": {"name": "provider", "key": "api-key"},
                },
            }
        )
        routable = until(
            "the remote backend to be routable",
            lambda: chat(gw, "sk-t1", "smart").status_code == 200,
        )
        print(f"LLMBackend created -> routable in {routable:.2f}s")
        assert routable < 2.0
        resp = chat(gw, "sk-t1", "smart")
        assert resp.headers["x-fabric-backend"] == f"{namespace}/cloud"
        assert resp.json()["model"] == "gpt-4o"  # the provider's name went upstream
        assert resp.headers["x-seen-authorization"] == "Bearer sk-provider-9d1e"

        # Rotated in place: the old key stops working, the new one works, at once.
        cluster.core.patch_namespaced_secret(
            "team", namespace, {"stringData": {"key": "sk-t1-rotated"}}
        )
        rotated = until(
            "the rotated key", lambda: chat(gw, "sk-t1-rotated", "smart").status_code == 200
        )
        assert chat(gw, "sk-t1", "smart").status_code == 401
        print(f"key Secret rotated -> new key accepted in {rotated:.2f}s")
        cluster.core.delete_namespaced_secret("team", namespace)
        refused = until(
            "the removed key to be refused",
            lambda: chat(gw, "sk-t1-rotated", "smart").status_code == 401,
        )
        print(f"key Secret deleted -> refused in {refused:.2f}s")
        cluster.core.create_namespaced_secret(
            namespace, key_secret(namespace, "team2", "sk-t2", models="other")
        )
        until("the new key", lambda: chat(gw, "sk-t2", "smart").status_code == 403)

        cluster.custom.delete_namespaced_custom_object(
            "llm.fabric.dev", "v1alpha1", namespace, "llmbackends", "cloud"
        )
        gone = until(
            "the deleted backend to be unknown",
            lambda: chat(gw, "sk-t2", "smart").status_code == 404,
        )
        print(f"LLMBackend deleted -> 404 in {gone:.2f}s")


def test_local_backend_is_reached_at_its_ready_pod_addresses(
    cluster: Cluster, operator: OperatorProcess, gw: Process, namespace: str, tmp_path: Path
) -> None:
    with (
        netns_host(tmp_path) as host,
        upstream("pod", "--key", "sk-engine-77", host=host.ip, port=8080, enter=host.enter) as pod,
    ):
        ip = host.ip
        cluster.core.create_namespaced_secret(namespace, key_secret(namespace, "team", "sk-l1"))
        cluster.core.create_namespaced_secret(
            namespace, {"metadata": {"name": "engine"}, "stringData": {"k": "sk-engine-77"}}
        )
        cluster.apply(
            {
                "apiVersion": "llm.fabric.dev/v1alpha1",
                "kind": "LLMBackend",
                "metadata": {"name": "tiny", "namespace": namespace},
                "spec": {
                    "engine": "llamacpp",
                    "model": {"url": "https://example.invalid/tiny.gguf"},
                    "apiKeySecretRef": {"name": "engine", "key": "k"},
                },
            }
        )
        until("no ready replica yet", lambda: chat(gw, "sk-l1", "tiny").status_code == 503)
        error = chat(gw, "sk-l1", "tiny").json()["error"]
        assert error["code"] == "upstream_unavailable" and f"{namespace}/tiny" in error["message"]
        wait_for(
            "the pod to run",
            lambda: run_pods(cluster, namespace, "llm.fabric.dev/backend=tiny", [ip]),
            30,
        )
        until("the ready pod to answer", lambda: chat(gw, "sk-l1", "tiny").status_code == 200)
        resp = chat(gw, "sk-l1", "tiny")
        assert resp.headers["x-upstream"] == "pod"
        assert resp.headers["x-seen-authorization"] == "Bearer sk-engine-77"
        assert pod.url == f"http://{ip}:8080/v1"
