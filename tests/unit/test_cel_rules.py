"""The CRD's CEL rules (x-kubernetes-validations), evaluated with a CEL implementation from
the package index (cel-python): the local 1.20 API server ignores them, later servers
refuse at `kubectl apply` what they refuse.

Each rule refuses what it should, with its message; none refuses a spec the operator
accepts (every valid spec of the unit tests passes all of them); and what a rule refuses,
the operator refuses too (as InvalidSpec, for servers that ignore the rules)."""

from __future__ import annotations

from typing import Any

import celpy
import pytest

from fabric_operator.api.crd import openapi_schema
from fabric_operator.validation import validate

ENV = celpy.Environment()
HF = {"huggingface": {"repo": "Qwen/Qwen2.5-7B-Instruct"}}
GPU = {"resources": {"gpu": {"count": 1}}}
REMOTE = {"engine": "remote", "remote": {"baseURL": "https://api.openai.com/v1"}}


def _rules() -> dict[str, list[tuple[str, str, Any]]]:
    """Where each rule sits in the generated schema ("spec", "spec.autoscaling"), compiled."""
    spec = openapi_schema()["properties"]["spec"]
    found: dict[str, list[tuple[str, str, Any]]] = {}
    for where, schema in (("spec", spec), ("spec.autoscaling", spec["properties"]["autoscaling"])):
        found[where] = [
            (r["rule"], r["message"], ENV.program(ENV.compile(r["rule"])))
            for r in schema.get("x-kubernetes-validations", [])
        ]
    return found


RULES = _rules()


def broken(spec: dict[str, Any]) -> list[str]:
    """The messages of the rules `spec` breaks, as the API server would apply them."""
    out = []
    targets = {"spec": spec, "spec.autoscaling": spec.get("autoscaling")}
    for where, rules in RULES.items():
        target = targets[where]
        if target is None:
            continue
        for _rule, message, program in rules:
            if not program.evaluate({"self": celpy.json_to_cel(target)}):
                out.append(message)
    return out


def operator_problems(spec: dict[str, Any]) -> list[str]:
    parsed, problems = validate({"metadata": {"name": "m", "namespace": "n"}, "spec": spec})
    assert parsed is not None
    return [str(p) for p in problems]


def test_every_rule_compiles_and_the_crd_carries_them() -> None:
    assert len(RULES["spec"]) >= 14 and len(RULES["spec.autoscaling"]) == 1
    for rules in RULES.values():
        for rule, message, _ in rules:
            assert rule and message and not message.endswith(".")


VALID: list[dict[str, Any]] = [
    {"engine": "vllm", "model": HF, **GPU},
    {"engine": "vllm", "model": HF, **GPU, "toolCalling": {"parser": "hermes"}},
    {"engine": "vllm", "model": HF, **GPU, "engineOptions": {"gpuMemoryUtilization": 0.9}},
    {"engine": "tgi", "model": HF, **GPU, "engineOptions": {"tensorParallel": 1}},
    {"engine": "llamacpp", "model": {"url": "https://h.invalid/m.gguf"}},
    {"engine": "llamacpp", "model": {"huggingface": {"repo": "o/r", "file": "q4.gguf"}}},
    {"engine": "llamacpp", "model": HF, "toolCalling": {"enabled": False}},
    {"engine": "llamacpp-python", "model": {"pvc": {"claimName": "w", "path": "m.gguf"}}},
    {"engine": "ollama", "model": {"ollama": "qwen3:4b"}, "toolCalling": {"enabled": True}},
    {
        "engine": "llamacpp",
        "model": {"url": "https://h.invalid/m.gguf"},
        "autoscaling": {"minReplicas": 0, "maxReplicas": 2, "fallbackAfterSeconds": 5},
        "fallback": ["gpt"],
    },
    REMOTE,
    {**REMOTE, "fallback": ["other"], "apiKeySecretRef": {"name": "k", "key": "v"}},
    {"engine": "sglang", "model": HF, **GPU, "engineOptions": {"gpuMemoryUtilization": 0.8}},
    {"engine": "sglang", "model": HF, **GPU, "toolCalling": {"parser": "qwen25"}},
    {
        "engine": "transformers",
        "model": HF,
        "image": "r/tf:5.25",
        "engineOptions": {"dtype": "float32"},
    },
    {"engine": "openllm", "model": {"openllm": "llama3.2:1b"}, "image": "r/openllm:1"},
    {
        "engine": "openai-compatible",
        "model": {"url": "https://h.invalid/m.gguf"},
        "image": "r/server:1",
        "server": {"port": 8000, "args": ["--model", "$(FABRIC_MODEL)"]},
    },
    {"engine": "vllm", "model": HF, **GPU, "cache": {"size": "40Gi", "preload": True}},
    {
        "engine": "vllm",
        "model": HF,
        **GPU,
        "cache": {"size": "40Gi", "persistentVolumeClaim": {"shared": True}},
    },
    {"engine": "llamacpp", "model": HF, "podSecurity": {"runAsUser": 1000}},
    {"engine": "tgi", "model": HF, **GPU, "podSecurity": {"profile": "Baseline"}},
]


@pytest.mark.parametrize("spec", VALID)
def test_valid_specs_break_no_rule_and_the_operator_agrees(spec: dict[str, Any]) -> None:
    assert broken(spec) == []
    assert operator_problems(spec) == []


INVALID: list[tuple[dict[str, Any], str]] = [
    ({"engine": "remote", "model": HF}, "engine remote takes spec.remote"),
    ({"engine": "vllm", **GPU, "remote": REMOTE["remote"]}, "engine remote takes spec.remote"),
    ({**REMOTE, "image": "x"}, "a remote backend runs no pods"),
    ({**REMOTE, "toolCalling": {"enabled": True}}, "a remote backend runs no pods"),
    (
        {"engine": "vllm", **GPU, "model": {"url": "https://h.invalid/m.gguf"}},
        "spec.model.url (a GGUF URL) is for engines llamacpp and openai-compatible",
    ),
    ({"engine": "vllm", **GPU, "model": {"ollama": "x"}}, "engine ollama takes spec.model.ollama"),
    ({"engine": "ollama", "model": HF}, "engine ollama takes spec.model.ollama"),
    (
        {"engine": "vllm", **GPU, "model": {"huggingface": {"repo": "o/r", "file": "f.gguf"}}},
        "spec.model.huggingface.file (a GGUF) is for engines llamacpp and llamacpp-python",
    ),
    (
        {"engine": "llamacpp-python", "model": HF, "image": "r/x:1"},
        "llamacpp-python needs spec.model.huggingface.file",
    ),
    ({"engine": "vllm", "model": HF}, "engines vllm, tgi and sglang need at least 1 GPU"),
    (
        {"engine": "tgi", "model": HF, "resources": {"gpu": {"count": 0}}},
        "engines vllm, tgi and sglang need at least 1 GPU",
    ),
    (
        {"engine": "tgi", "model": HF, **GPU, "engineOptions": {"gpuMemoryUtilization": 0.5}},
        "spec.engineOptions.gpuMemoryUtilization is for engines vllm and sglang",
    ),
    (
        {
            "engine": "llamacpp",
            "model": {"url": "https://h.invalid/m.gguf"},
            "engineOptions": {"dtype": "float16"},
        },
        "spec.engineOptions.dtype is for engines vllm, tgi, sglang and transformers",
    ),
    (
        {
            "engine": "ollama",
            "model": {"ollama": "x"},
            "apiKeySecretRef": {"name": "a", "key": "b"},
        },
        "ollama, openllm and transformers have no built-in API key",
    ),
    (
        {"engine": "llamacpp", "model": HF, "toolCalling": {"parser": "hermes"}},
        "spec.toolCalling.parser is for engines vllm",
    ),
    (
        {"engine": "llamacpp-python", "model": {"pvc": {"claimName": "w", "path": "m"}}}
        | {"toolCalling": {"chatTemplate": "/t.jinja"}},
        "spec.toolCalling.chatTemplate is for engine vllm",
    ),
    (
        {"engine": "tgi", "model": HF, **GPU, "toolCalling": {"enabled": False}},
        "tgi, ollama, transformers, openllm and openai-compatible have no switch",
    ),
    (
        {
            "engine": "llamacpp",
            "model": {"url": "https://h.invalid/m.gguf"},
            "autoscaling": {"maxReplicas": 2, "fallbackAfterSeconds": 5},
        },
        "spec.autoscaling.fallbackAfterSeconds sends held requests to spec.fallback",
    ),
    (
        {
            "engine": "llamacpp",
            "model": {"url": "https://h.invalid/m.gguf"},
            "autoscaling": {"minReplicas": 3, "maxReplicas": 2},
        },
        "minReplicas must be at most maxReplicas",
    ),
    ({"engine": "sglang", "model": HF}, "engines vllm, tgi and sglang need at least 1 GPU"),
    (
        {"engine": "llamacpp", "model": HF, "engineOptions": {"tensorParallel": 1}},
        "spec.engineOptions tensorParallel and quantization are for engines vllm, tgi and sglang",
    ),
    (
        {"engine": "transformers", "model": HF, "engineOptions": {"contextLength": 4096}},
        "spec.engineOptions.contextLength is not something",
    ),
    (
        {"engine": "openllm", "model": HF, "image": "r/o:1"},
        "engine openllm takes spec.model.openllm",
    ),
    (
        {"engine": "vllm", **GPU, "model": {"openllm": "llama3.2:1b"}},
        "engine openllm takes spec.model.openllm",
    ),
    ({"engine": "openllm", "model": {"openllm": "x"}}, "engines openai-compatible and openllm run"),
    (
        {"engine": "openai-compatible", "model": HF, "image": "r/s:1"},
        "engine openai-compatible needs spec.server",
    ),
    (
        {"engine": "llamacpp", "model": HF, "server": {"port": 8000}},
        "engine openai-compatible needs spec.server",
    ),
    (
        {"engine": "vllm", "model": HF, **GPU, "cache": {"persistentVolumeClaim": {}}},
        "spec.cache.size is required with spec.cache.persistentVolumeClaim",
    ),
    (
        {"engine": "llamacpp", "model": HF, "cache": {"preload": True}},
        "spec.cache.preload downloads a Hugging Face model",
    ),
    (
        {"engine": "vllm", **GPU, "model": {"pvc": {"claimName": "w", "path": "m"}}}
        | {"cache": {"preload": True}},
        "spec.cache.preload downloads a Hugging Face model",
    ),
    (
        {"engine": "llamacpp", "model": HF, "podSecurity": {"profile": "Baseline", "runAsUser": 5}},
        "spec.podSecurity.runAsUser is for profile Restricted",
    ),
    (
        {"engine": "sglang", "model": HF, **GPU, "toolCalling": {"chatTemplate": "/t.jinja"}},
        "spec.toolCalling.chatTemplate is for engine vllm",
    ),
]


@pytest.mark.parametrize(("spec", "message"), INVALID)
def test_each_rule_refuses_what_the_operator_refuses(spec: dict[str, Any], message: str) -> None:
    found = broken(spec)
    assert len(found) == 1 and found[0].startswith(message), found
    # For servers that ignore the rules, the operator's own validation refuses it too.
    assert operator_problems(spec) != []


def test_every_rule_is_exercised() -> None:
    messages = {m for rules in RULES.values() for _, m, _ in rules}
    hit = {m for m in messages if any(m.startswith(msg) for _, msg in INVALID)}
    assert hit == messages, messages - hit
