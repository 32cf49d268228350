"""The CRD schema is the first line of defence: the API server refuses bad manifests."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.kube import Cluster

pytestmark = pytest.mark.integration


def manifest(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "llm.fabric.dev/v1alpha1",
        "kind": "LLMBackend",
        "metadata": {"name": "bad", "namespace": "default"},
        "spec": spec,
    }


HF = {"huggingface": {"repo": "Qwen/Qwen2.5-0.5B"}}


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ({"engine": "sglang", "model": HF}, "spec.engine"),
        ({"engine": "vllm", "model": HF, "replicas": -1}, "spec.replicas"),
        ({"engine": "vllm", "model": HF, "replicas": "two"}, "spec.replicas"),
        ({"engine": "vllm"}, "spec.model"),
        ({"engine": "vllm", "model": {}}, "spec.model"),
        ({"engine": "llamacpp", "model": {**HF, "url": "https://x.invalid/m.gguf"}}, "spec.model"),
        (
            {"engine": "vllm", "model": HF, "resources": {"gpu": {"count": -2}}},
            "spec.resources.gpu.count",
        ),
        (
            {"engine": "vllm", "model": HF, "engineOptions": {"gpuMemoryUtilization": 1.5}},
            "spec.engineOptions.gpuMemoryUtilization",
        ),
        (
            {"engine": "vllm", "model": HF, "resources": {"limits": {"memory": "lots"}}},
            "spec.resources.limits.memory",
        ),
    ],
)
def test_schema_refuses(cluster: Cluster, spec: dict[str, Any], words: str) -> None:
    # --validate=false: the API server's own answer, not kubectl's client-side check.
    result = cluster.apply(manifest(spec), "--validate=false")
    assert result.returncode != 0
    assert words in result.stderr, result.stderr


def test_explain_shows_field_docs(cluster: Cluster) -> None:
    out = cluster.kubectl("explain", "llmb.spec.servedModelName").stdout
    assert "Name clients pass as `model`" in out
