"""Kubernetes syntax the API server would refuse in the children is caught up front."""

from __future__ import annotations

from typing import Any

import pytest

from fabric_operator.validation import validate

BASE: dict[str, Any] = {"engine": "llamacpp", "model": {"url": "https://h.invalid/m.gguf"}}


def problems(**spec: Any) -> list[str]:
    backend, found = validate({"metadata": {"name": "m"}, "spec": {**BASE, **spec}})
    assert backend is not None
    return [str(p) for p in found]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {"service": {"annotations": {"bad key!": "v"}}},
            "spec.service.annotations['bad key!']: name part 'bad key!' must be at most 63",
        ),
        (
            {"nodeSelector": {"a/b/c": "x"}},
            "spec.nodeSelector['a/b/c']: prefix 'a/b' must be a DNS subdomain",
        ),
        (
            {"nodeSelector": {"pool": "gpu pool"}},
            "spec.nodeSelector['pool']: value 'gpu pool' is not a valid label value",
        ),
        (
            {"tolerations": [{"operator": "Exists", "value": "v"}]},
            "spec.tolerations[0].value: must be empty when operator is Exists",
        ),
        (
            {"tolerations": [{"operator": "Equal", "value": "v"}]},
            "spec.tolerations[0].operator: must be Exists when key is empty",
        ),
        (
            {"tolerations": [{"key": "k", "tolerationSeconds": 5}]},
            "spec.tolerations[0].tolerationSeconds: only applies to effect NoExecute",
        ),
        (
            {"priorityClassName": "Bad_Name"},
            "spec.priorityClassName: 'Bad_Name' is not a valid object name",
        ),
        (
            {"imagePullSecrets": [{"name": "UPPER"}]},
            "spec.imagePullSecrets[0].name: 'UPPER' is not a valid object name",
        ),
        (
            {"apiKeySecretRef": {"name": "s", "key": "a key"}},
            "spec.apiKeySecretRef.key: 'a key' is not a valid Secret key",
        ),
        (
            {"hfTokenSecretRef": {"name": "S", "key": "token"}},
            "spec.hfTokenSecretRef.name: 'S' is not a valid object name",
        ),
        (
            {"model": {"pvc": {"claimName": "my_claim", "path": "m.gguf"}}},
            "spec.model.pvc.claimName: 'my_claim' is not a valid object name",
        ),
    ],
)
def test_refused_with_the_field_named(spec: dict[str, Any], expected: str) -> None:
    found = problems(**spec)
    assert any(p.startswith(expected) for p in found), found


def test_valid_kubernetes_syntax_passes() -> None:
    assert (
        problems(
            service={"annotations": {"service.beta.kubernetes.io/aws-load-balancer-type": "nlb"}},
            nodeSelector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "pool": ""},
            tolerations=[
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                {"operator": "Exists"},
                {"key": "k", "effect": "NoExecute", "tolerationSeconds": 30},
            ],
            priorityClassName="llm-high",
            imagePullSecrets=[{"name": "regcred"}],
            apiKeySecretRef={"name": "keys.team-a", "key": "api_key.v1"},
        )
        == []
    )


TGI: dict[str, Any] = {
    "engine": "tgi",
    "model": {"huggingface": {"repo": "a/b"}},
    "resources": {"gpu": {"count": 1}},
}


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"dtype": "float32"}, "spec.engineOptions.dtype: tgi accepts float16 or bfloat16, not"),
        (
            {"quantization": "awq-marlin"},
            "spec.engineOptions.quantization: tgi does not know 'awq-marlin'",
        ),
        (
            {"dtype": "bfloat16", "quantization": "awq"},
            "spec.engineOptions.dtype: tgi cannot combine dtype with quantization",
        ),
    ],
)
def test_tgi_value_lists(options: dict[str, Any], expected: str) -> None:
    _, found = validate({"metadata": {"name": "m"}, "spec": {**TGI, "engineOptions": options}})
    assert any(str(p).startswith(expected) for p in found), found


@pytest.mark.parametrize("options", [{"dtype": "bfloat16"}, {"quantization": "fp8"}])
def test_tgi_accepts_its_values(options: dict[str, Any]) -> None:
    _, found = validate({"metadata": {"name": "m"}, "spec": {**TGI, "engineOptions": options}})
    assert found == []


def test_service_annotations_are_measured_in_bytes_as_the_api_server_does() -> None:
    """256 KiB of UTF-8, not of characters: 150,000 'é' are 300,000 bytes."""
    wide = {f"a{i}.example.com/note": "é" * 30_000 for i in range(5)}
    assert problems(service={"annotations": wide}) == [
        "spec.service.annotations: more than 256 KiB in total"
    ]
    narrow = {f"a{i}.example.com/note": "e" * 30_000 for i in range(5)}
    assert problems(service={"annotations": narrow}) == []
