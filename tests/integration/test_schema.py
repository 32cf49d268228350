"""The CRD schema is the first line of defence: the API server refuses bad manifests."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.kube import Cluster, wait_for

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
        ({"engine": "mlc-llm", "model": HF}, "spec.engine"),
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
        (
            {"engine": "vllm", "model": HF, "toolCalling": {"parser": "Hermes; rm -rf"}},
            "spec.toolCalling.parser",
        ),
        (
            {"engine": "vllm", "model": HF, "toolCalling": {"chatTemplate": "relative.jinja"}},
            "spec.toolCalling.chatTemplate",
        ),
        (
            {"engine": "vllm", "model": HF, "toolCalling": {"enabled": "yes"}},
            "spec.toolCalling.enabled",
        ),
    ],
)
def test_schema_refuses(cluster: Cluster, spec: dict[str, Any], words: str) -> None:
    # --validate=false: the API server's own answer, not kubectl's client-side check.
    result = cluster.apply(manifest(spec), "--validate=false")
    assert result.returncode != 0
    assert words in result.stderr, result.stderr


def explained(cluster: Cluster, field: str) -> str:
    """`kubectl explain`, once the API server publishes the CRD's OpenAPI (a second or two
    after the CRD is established; until then kubectl cannot find the kind)."""

    def explain() -> str | None:
        proc = cluster.kubectl("explain", field, check=False)
        return proc.stdout if proc.returncode == 0 else None

    return wait_for(f"kubectl explain {field}", explain, 30, 0.5)


def test_explain_shows_field_docs(cluster: Cluster) -> None:
    out = explained(cluster, "llmb.spec.servedModelName")
    assert "Name clients pass as `model`" in out
    tools = explained(cluster, "llmb.spec.toolCalling.parser")
    assert "--tool-call-parser" in tools and "--chat_format" in tools
