"""The engines added on top of the first four: sglang, openllm and openai-compatible,
rendered field by field, and refused where they cannot run (transformers: see
test_transformers_render.py)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from fabric_operator.api.backend import LLMBackend
from fabric_operator.render import render, sglang, toolcalls
from fabric_operator.render.workload import endpoint
from fabric_operator.validation import validate

REPO = "Qwen/Qwen2.5-7B-Instruct"
HF = {"huggingface": {"repo": REPO}}
GPU1 = {"gpu": {"count": 1}}
API_KEY = {"name": "keys", "key": "api"}
HF_TOKEN = {"name": "hf", "key": "token"}


def manifest(spec: dict[str, Any], name: str = "m") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "uid": "u1"}, "spec": spec}


def rendered(spec: dict[str, Any]) -> dict[str, Any]:
    parsed, problems = validate(manifest(spec))
    assert problems == [] and parsed is not None, problems
    return render(LLMBackend.from_manifest(manifest(spec))).deployment


def engine_container(spec: dict[str, Any]) -> dict[str, Any]:
    [container] = rendered(spec)["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = container
    return result


def problems(spec: dict[str, Any]) -> list[tuple[str, str]]:
    _, found = validate(manifest(spec))
    return [(p.field, p.message) for p in found]


def env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


# --- sglang -------------------------------------------------------------------------------

SGLANG = {"engine": "sglang", "model": {"huggingface": {"repo": REPO}}, "resources": GPU1}


def test_sglang_command_args_and_probes() -> None:
    c = engine_container(SGLANG)
    assert c["image"] == "lmsysorg/sglang:v0.5.19-cu129"
    assert c["command"] == ["python3", "-m", "sglang.launch_server"]
    assert c["args"][:9] == [
        "--model-path",
        REPO,
        "--host",
        "0.0.0.0",
        "--port",
        "30000",
        "--served-model-name",
        "m",
        "--enable-metrics",
    ]
    # Qwen2.5: SGLang's Qwen parser, found from the model family.
    assert c["args"][-2:] == ["--tool-call-parser", "qwen25"]
    assert c["ports"][0]["containerPort"] == 30000
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert env(c)["HF_HOME"] == "/cache/huggingface"
    assert endpoint(LLMBackend.from_manifest(manifest(SGLANG))).endswith(":30000/v1")


def test_sglang_options_become_its_flags() -> None:
    options = {
        "contextLength": 32768,
        "tensorParallel": 2,
        "gpuMemoryUtilization": 0.85,
        "quantization": "fp8",
        "dtype": "bfloat16",
    }
    spec = {**SGLANG, "resources": {"gpu": {"count": 2}}, "engineOptions": options}
    args = engine_container(spec)["args"]
    pairs = dict(itertools.pairwise(args))  # each flag -> the word after it
    assert pairs["--tp-size"] == "2"
    assert pairs["--context-length"] == "32768"
    assert pairs["--mem-fraction-static"] == "0.85"
    assert pairs["--quantization"] == "fp8" and pairs["--dtype"] == "bfloat16"


def test_sglang_key_is_a_reference_expanded_by_the_kubelet_never_a_value() -> None:
    c = engine_container({**SGLANG, "apiKeySecretRef": API_KEY, "hfTokenSecretRef": HF_TOKEN})
    i = c["args"].index("--api-key")
    assert c["args"][i + 1] == "$(SGLANG_API_KEY)"
    assert env(c)["SGLANG_API_KEY"] == {"secretKeyRef": API_KEY}
    assert env(c)["HF_TOKEN"] == {"secretKeyRef": HF_TOKEN}
    # The kubelet expands $(VAR) in args from the container's env; an unknown name would
    # reach SGLang literally as the key.
    assert c["env"][-1]["name"] == "SGLANG_API_KEY"


@pytest.mark.parametrize(
    ("fields", "field", "says"),
    [
        ({"resources": {"gpu": {"count": 0}}}, "spec.resources.gpu.count", "at least 1 GPU"),
        (
            {"resources": {"gpu": {"count": 1, "vendor": "amd"}}},
            "spec.image",
            "no ROCm image",
        ),
        ({"toolCalling": {"parser": "hermes_x"}}, "spec.toolCalling.parser", "not a"),
        ({"extraArgs": ["--model-path", "x"]}, "spec.extraArgs[0]", "set by the operator"),
        ({"extraArgs": ["--tool-call-parser=llama3"]}, None, None),
    ],
)
def test_sglang_refusals(fields: dict[str, Any], field: str | None, says: str | None) -> None:
    found = problems({**SGLANG, **fields})
    if field is None:
        assert found == []  # tool flags in extraArgs alone are left to stand
        c = engine_container({**SGLANG, **fields})
        assert c["args"].count("--tool-call-parser") == 0  # the plan steps aside
        assert c["args"][-1] == "--tool-call-parser=llama3"
        return
    assert any(f == field and says in m for f, m in found), found


@pytest.mark.parametrize(
    ("repo", "parser"),
    [
        ("meta-llama/Llama-3.1-8B-Instruct", "llama3"),
        ("meta-llama/Llama-4-Scout-17B-16E-Instruct", "pythonic"),
        ("Qwen/Qwen3-Coder-30B-A3B-Instruct", "qwen3_coder"),
        ("mistralai/Mistral-Small-3.2-24B-Instruct-2506", "mistral"),
        ("deepseek-ai/DeepSeek-V3.1", "deepseekv31"),
        ("openai/gpt-oss-20b", "gpt-oss"),
        ("NousResearch/Hermes-3-Llama-3.1-8B", "hermes"),
        ("ibm-granite/granite-3.1-8b-instruct", None),  # no SGLang parser for Granite
        ("some-org/unknown-model", None),
    ],
)
def test_sglang_parser_from_the_family(repo: str, parser: str | None) -> None:
    c = engine_container({**SGLANG, "model": {"huggingface": {"repo": repo}}})
    if parser is None:
        assert "--tool-call-parser" not in c["args"]
    else:
        assert c["args"][c["args"].index("--tool-call-parser") + 1] == parser


# --- openllm --------------------------------------------------------------------------------

OPENLLM = {"engine": "openllm", "model": {"openllm": "llama3.2:1b"}, "image": "r/openllm:0.6.30"}


def test_openllm_serves_a_catalogue_model_from_the_named_image() -> None:
    c = engine_container(OPENLLM)
    assert c["image"] == "r/openllm:0.6.30"
    assert c["command"] == ["openllm", "serve"]
    assert c["args"] == ["llama3.2:1b", "--port", "3000"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    pod = rendered(OPENLLM)["spec"]["template"]["spec"]
    assert "runAsNonRoot" not in pod["securityContext"]  # the image's own user owns its home


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"image": None}, "spec.image"),
        ({"apiKeySecretRef": API_KEY}, "spec.apiKeySecretRef"),
        ({"model": HF}, "spec.model.huggingface"),
        ({"toolCalling": {"enabled": False}}, "spec.toolCalling.enabled"),
    ],
)
def test_openllm_refusals(fields: dict[str, Any], field: str) -> None:
    spec = {k: v for k, v in {**OPENLLM, **fields}.items() if v is not None}
    assert field in [f for f, _ in problems(spec)]


# --- openai-compatible ------------------------------------------------------------------

GENERIC = {
    "engine": "openai-compatible",
    "image": "ghcr.io/acme/server:2.1",
    "model": HF,
    "server": {
        "port": 9000,
        "command": ["serve"],
        "args": ["--model", "$(FABRIC_MODEL)", "--name", "$(FABRIC_SERVED_MODEL_NAME)"],
        "healthPath": "/healthz",
        "readinessPath": "/v1/models",
        "apiKeyEnv": "SERVER_KEY",
    },
}


def test_any_server_gets_the_model_as_variables_its_args_name() -> None:
    c = engine_container(GENERIC)
    assert c["image"] == "ghcr.io/acme/server:2.1"
    assert c["command"] == ["serve"]
    assert c["args"] == ["--model", "$(FABRIC_MODEL)", "--name", "$(FABRIC_SERVED_MODEL_NAME)"]
    values = env(c)
    assert values["FABRIC_MODEL"] == REPO
    assert values["FABRIC_SERVED_MODEL_NAME"] == "m"
    assert values["FABRIC_PORT"] == "9000"
    assert c["ports"] == [{"name": "http", "containerPort": 9000, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/v1/models"
    svc = render(LLMBackend.from_manifest(manifest(GENERIC))).service
    assert svc["spec"]["ports"][0]["port"] == 9000


def test_any_server_key_goes_to_its_variable_and_fabric_api_key_from_the_secret() -> None:
    c = engine_container({**GENERIC, "apiKeySecretRef": API_KEY})
    values = env(c)
    assert values["SERVER_KEY"] == {"secretKeyRef": API_KEY}
    assert values["FABRIC_API_KEY"] == {"secretKeyRef": API_KEY}
    assert all("value" not in e for e in c["env"] if "KEY" in e["name"])


def test_any_server_without_paths_is_probed_by_tcp_and_pvc_and_url_sources_reach_it() -> None:
    server = {"port": 8000}
    c = engine_container(
        {**GENERIC, "server": server, "model": {"pvc": {"claimName": "w", "path": "m/"}}}
    )
    assert c["readinessProbe"]["tcpSocket"] == {"port": "http"}
    assert c["livenessProbe"]["tcpSocket"] == {"port": "http"}
    assert env(c)["FABRIC_MODEL"] == "/models/m"
    assert "command" not in c and c["args"] == []
    c = engine_container({**GENERIC, "model": {"url": "https://h.invalid/x.gguf"}})
    assert env(c)["FABRIC_MODEL"] == "https://h.invalid/x.gguf"


def test_any_server_status_says_the_image_decides_tool_calling() -> None:
    plan = toolcalls.plan(LLMBackend.from_manifest(manifest(GENERIC)))
    assert plan.enabled is None and plan.summary == "image" and plan.args == []


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"server": None}, "spec.server"),
        ({"image": None}, "spec.image"),
        ({"toolCalling": {"parser": "hermes"}}, "spec.toolCalling.parser"),
        ({"toolCalling": {"enabled": True}}, "spec.toolCalling"),
        ({"engineOptions": {"contextLength": 4096}}, "spec.engineOptions.contextLength"),
        ({"env": [{"name": "FABRIC_MODEL", "value": "x"}]}, "spec.env[0].name"),
        ({"server": {"port": 1, "apiKeyEnv": "HF_HOME"}}, "spec.server.apiKeyEnv"),
        ({"server": {"port": 1, "apiKeyEnv": "FABRIC_PORT"}}, "spec.server.apiKeyEnv"),
        ({"server": {"port": 1, "apiKeyEnv": "HOME"}}, "spec.server.apiKeyEnv"),
        ({"server": {"port": 1, "command": ["x", "$(FABRIC_API_KEY)"]}}, "spec.server.command[1]"),
        (
            {"server": {"port": 1, "command": ["--key=$(SERVER_KEY)"], "apiKeyEnv": "SERVER_KEY"}},
            "spec.server.command[0]",
        ),
        (
            {"apiKeySecretRef": API_KEY, "env": [{"name": "SERVER_KEY", "value": "sk-literal"}]},
            "spec.env[0].name",
        ),
        ({"model": {"huggingface": {"repo": "o/r", "file": "q.gguf"}}}, None),
    ],
)
def test_any_server_refusals(fields: dict[str, Any], field: str | None) -> None:
    spec = {k: v for k, v in {**GENERIC, **fields}.items() if v is not None}
    found = [f for f, _ in problems(spec)]
    if field is None:
        assert "spec.model.huggingface.file" in found
    else:
        assert field in found, found


def test_server_is_refused_on_engines_the_operator_runs_itself() -> None:
    spec = {**SGLANG, "server": {"port": 1}}
    assert "spec.server" in [f for f, _ in problems(spec)]


def test_a_user_flag_in_extra_args_of_any_server_is_not_policed() -> None:
    spec = {**GENERIC, "extraArgs": ["--port", "9000", "--api-key", "$(FABRIC_API_KEY)"]}
    assert problems(spec) == []
    assert engine_container(spec)["args"][-4:] == spec["extraArgs"]


def test_sglang_module_has_one_pinned_image() -> None:
    assert ":" in sglang.IMAGE and not sglang.IMAGE.endswith(":latest")
