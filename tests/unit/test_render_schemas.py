"""Every engine's children are valid objects for a current Kubernetes release."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest

from fabric_operator.config import OperatorConfig
from fabric_operator.render import render
from fabric_operator.validation import validate

FULL: dict[str, Any] = {
    "replicas": 2,
    "imagePullPolicy": "Always",
    "imagePullSecrets": [{"name": "regcred"}],
    "extraArgs": ["--verbose"],
    "env": [
        {"name": "X", "value": "1"},
        {"name": "Y", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}},
    ],
    "nodeSelector": {"pool": "llm"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 1, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}
            ]
        }
    },
    "priorityClassName": "llm",
    "service": {"type": "LoadBalancer", "port": 80, "annotations": {"a.io/b": "c"}},
    "resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "16Gi"}},
    "networkPolicy": {
        "from": [
            {
                "namespaceSelector": {"matchLabels": {"team": "a"}},
                "podSelector": {"matchExpressions": [{"key": "tier", "operator": "Exists"}]},
            },
            {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
        ]
    },
}
SPECS = {
    "vllm": {
        "engine": "vllm",
        "model": {"pvc": {"claimName": "w", "path": "qwen"}},
        "resources": {"gpu": {"count": 2}},
        "apiKeySecretRef": {"name": "k", "key": "v"},
        "hfTokenSecretRef": {"name": "h", "key": "t"},
    },
    "tgi": {
        "engine": "tgi",
        "model": {"huggingface": {"repo": "a/b", "revision": "main"}},
        "resources": {"gpu": {"count": 1, "vendor": "amd"}},
        "apiKeySecretRef": {"name": "k", "key": "v"},
    },
    "llamacpp": {
        "engine": "llamacpp",
        "model": {"url": "https://h.invalid/m.gguf"},
        "apiKeySecretRef": {"name": "k", "key": "v"},
    },
    "ollama": {"engine": "ollama", "model": {"ollama": "llama3.2:1b"}},
    "sglang": {
        "engine": "sglang",
        "model": {"huggingface": {"repo": "a/b"}},
        "resources": {"gpu": {"count": 1}},
        "apiKeySecretRef": {"name": "k", "key": "v"},
        "cache": {"size": "100Gi", "persistentVolumeClaim": {"storageClassName": "fast"}},
    },
    "openai-compatible": {
        "engine": "openai-compatible",
        "image": "r/s:1",
        "model": {"huggingface": {"repo": "a/b"}},
        "server": {"port": 9000, "args": ["--model", "$(FABRIC_MODEL)"], "healthPath": "/h"},
        "cache": {"size": "10Gi", "preload": False},
    },
    "vllm-preload": {
        "engine": "vllm",
        "model": {"huggingface": {"repo": "a/b"}},
        "resources": {"gpu": {"count": 1}},
        "cache": {"size": "100Gi", "preload": True},
        "podSecurity": {"runAsUser": 1000},
    },
}


@pytest.mark.parametrize("engine", list(SPECS))
@pytest.mark.parametrize("full", [False, True], ids=["minimal", "every-field"])
def test_children_validate_against_kubernetes_schemas(engine: str, full: bool) -> None:
    spec = {**SPECS[engine]}
    if full:
        spec = {
            **FULL,
            **spec,
            "resources": {**FULL["resources"], **SPECS[engine].get("resources", {})},
        }
        if engine == "ollama":
            spec.pop("extraArgs")
    backend, problems = validate({"metadata": {"name": "m", "namespace": "ns"}, "spec": spec})
    assert backend is not None and problems == []
    for child in render(backend).all():
        kubernetes_validate.validate(child, "1.33", strict=True)


def test_a_disruption_budget_follows_the_replicas_and_the_servers_version() -> None:
    spec = {**SPECS["llamacpp"], "replicas": 2}
    backend, _ = validate({"metadata": {"name": "m", "namespace": "ns"}, "spec": spec})
    assert backend is not None
    pdb = render(backend).disruption_budget
    assert pdb is not None
    kubernetes_validate.validate(pdb, "1.33", strict=True)
    assert pdb["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": {"llm.fabric.dev/backend": "m"}},
    }
    assert render(backend, policy_version="v1beta1").disruption_budget["apiVersion"] == (  # type: ignore[index]
        "policy/v1beta1"
    )
    assert [m["kind"] for m in render(backend).all()][-1] == "PodDisruptionBudget"
    one, _ = validate({"metadata": {"name": "m", "namespace": "ns"}, "spec": SPECS["llamacpp"]})
    assert one is not None and render(one).disruption_budget is None
    # From 1.27: pods that are not ready may always be evicted (a crash-looping backend
    # never blocks a drain).
    evicting = render(backend, evict_unhealthy=True).disruption_budget
    assert evicting is not None and evicting["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    kubernetes_validate.validate(evicting, "1.33", strict=True)
    off = OperatorConfig(podDisruptionBudgets=False)
    assert render(backend, off).disruption_budget is None
