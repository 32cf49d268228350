"""Rules across fields and engines (validation.py), and what the pydantic models refuse."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from fabric_operator.api.v1alpha1 import LLMBackendSpec, ModelSource
from fabric_operator.validation import MANAGED_ENV, Problem, validate

REPO = "Qwen/Qwen2.5-0.5B-Instruct"
HF = {"huggingface": {"repo": REPO}}
URL = "https://h.invalid/m.gguf"
GPU1 = {"gpu": {"count": 1}}
BASE: dict[str, dict[str, Any]] = {
    "vllm": {"engine": "vllm", "model": HF, "resources": GPU1},
    "tgi": {"engine": "tgi", "model": HF, "resources": GPU1},
    "llamacpp": {"engine": "llamacpp", "model": {"url": URL}},
    "ollama": {"engine": "ollama", "model": {"ollama": "llama3.2:1b"}},
    "llamacpp-python": {
        "engine": "llamacpp-python",
        "model": {"pvc": {"claimName": "w", "path": "qwen2.5-0.5b.gguf"}},
    },
}
SECRET = {"name": "s", "key": "k"}


def problems(engine: str, name: str = "m", **fields: Any) -> list[tuple[str, str]]:
    backend, found = validate({"metadata": {"name": name}, "spec": {**BASE[engine], **fields}})
    assert backend is not None
    assert all(isinstance(p, Problem) for p in found)
    return [(p.field, p.message) for p in found]


def gpus(count: int) -> dict[str, Any]:
    return {"resources": {"gpu": {"count": count}}}


@pytest.mark.parametrize(
    ("engine", "fields"),
    [
        ("vllm", {}),
        ("vllm", {**gpus(4), "engineOptions": {"tensorParallel": 2, "dtype": "bfloat16"}}),
        ("vllm", {"model": {"pvc": {"claimName": "w", "path": "q"}}, "extraArgs": ["--seed=1"]}),
        ("vllm", {"apiKeySecretRef": SECRET, "hfTokenSecretRef": SECRET}),
        ("tgi", {"model": {"huggingface": {"repo": REPO, "revision": "main"}}}),
        ("tgi", {**gpus(2), "engineOptions": {"quantization": "awq", "contextLength": 4096}}),
        ("llamacpp", {}),
        ("llamacpp", {"model": {"huggingface": {"repo": REPO, "file": "q4.gguf"}}}),
        ("llamacpp", {"model": {"pvc": {"claimName": "w", "path": "m.gguf"}}, **gpus(1)}),
        ("llamacpp", {"engineOptions": {"contextLength": 2048}, "apiKeySecretRef": SECRET}),
        ("ollama", {}),
        ("ollama", {**gpus(1), "env": [{"name": "OLLAMA_NUM_PARALLEL", "value": "4"}]}),
        ("ollama", {"engineOptions": {"contextLength": 8192}, "servedModelName": "chat"}),
    ],
)
def test_valid_specs_have_no_problems(engine: str, fields: dict[str, Any]) -> None:
    assert problems(engine, **fields) == []


def _needs_gpu(engine: str) -> str:
    return (
        f"engine {engine} needs at least 1 GPU; for a CPU backend use engine llamacpp, "
        "llamacpp-python or ollama"
    )


def _unsupported(engine: str, only: str) -> str:
    return f"not supported by engine {engine} (only {only})"


OPTIONS = "spec.engineOptions"
TP = "spec.engineOptions.tensorParallel"
OLLAMA_KEY = (
    "ollama has no built-in API key; leave it unset and put the fabric gateway (which checks "
    "keys) in front of this backend"
)
OLLAMA_ARGS = "`ollama serve` takes no arguments; configure it with OLLAMA_* variables in spec.env"


@pytest.mark.parametrize(
    ("engine", "fields", "expected"),
    [
        pytest.param(
            "vllm", {"resources": None}, [("spec.resources.gpu.count", _needs_gpu("vllm"))]
        ),
        pytest.param("tgi", gpus(0), [("spec.resources.gpu.count", _needs_gpu("tgi"))]),
        pytest.param(
            "vllm",
            {"model": {"url": URL}},
            [
                (
                    "spec.model.url",
                    "engine vllm cannot load a url model source; use spec.model.huggingface "
                    "or spec.model.pvc",
                )
            ],
        ),
        pytest.param(
            "tgi",
            {"model": {"ollama": "x"}},
            [
                (
                    "spec.model.ollama",
                    "engine tgi cannot load a ollama model source; use spec.model.huggingface "
                    "or spec.model.pvc",
                )
            ],
        ),
        pytest.param(
            "llamacpp",
            {"model": {"ollama": "x"}},
            [
                (
                    "spec.model.ollama",
                    "engine llamacpp cannot load a ollama model source; use "
                    "spec.model.huggingface or spec.model.url or spec.model.pvc",
                )
            ],
        ),
        pytest.param(
            "ollama",
            {"model": {"pvc": {"claimName": "w", "path": "p"}}},
            [
                (
                    "spec.model.pvc",
                    "engine ollama cannot load a pvc model source; use spec.model.ollama",
                )
            ],
        ),
        pytest.param(
            "vllm",
            {"model": {"huggingface": {"repo": REPO, "file": "a.gguf"}}},
            [
                (
                    "spec.model.huggingface.file",
                    "a GGUF file is for engines llamacpp and llamacpp-python, not vllm",
                )
            ],
        ),
        pytest.param(
            "tgi",
            {"model": {"huggingface": {"repo": REPO, "file": "a.gguf"}}},
            [
                (
                    "spec.model.huggingface.file",
                    "a GGUF file is for engines llamacpp and llamacpp-python, not tgi",
                )
            ],
        ),
        pytest.param(
            "llamacpp",
            {"model": {"huggingface": {"repo": REPO, "revision": "v2"}}},
            [
                (
                    "spec.model.huggingface.revision",
                    "llama-server loads from the default branch; pin the file with "
                    "spec.model.huggingface.file or use spec.model.url",
                )
            ],
        ),
        pytest.param(
            "tgi",
            {"engineOptions": {"gpuMemoryUtilization": 0.8}},
            [(f"{OPTIONS}.gpuMemoryUtilization", _unsupported("tgi", "vllm, sglang"))],
        ),
        pytest.param(
            "llamacpp",
            {"engineOptions": {"quantization": "q4", "dtype": "float16"}},
            [
                (f"{OPTIONS}.quantization", _unsupported("llamacpp", "vllm, tgi, sglang")),
                (f"{OPTIONS}.dtype", _unsupported("llamacpp", "vllm, tgi, sglang, transformers")),
            ],
        ),
        pytest.param(
            "ollama",
            {"engineOptions": {"tensorParallel": 1, "gpuMemoryUtilization": 0.5}},
            [
                (f"{OPTIONS}.tensorParallel", _unsupported("ollama", "vllm, tgi, sglang")),
                (f"{OPTIONS}.gpuMemoryUtilization", _unsupported("ollama", "vllm, sglang")),
            ],
        ),
        pytest.param(
            "vllm",
            {**gpus(2), "engineOptions": {"tensorParallel": 4}},
            [
                (
                    TP,
                    "4 is more than the 2 GPU(s) of spec.resources.gpu.count; it must be at "
                    "most the GPU count",
                ),
            ],
            id="tp-more-than-gpus",
        ),
        pytest.param(
            "tgi",
            {**gpus(4), "engineOptions": {"tensorParallel": 3}},
            [(TP, "3 must divide spec.resources.gpu.count (4)")],
            id="tp-not-dividing",
        ),
        pytest.param("ollama", {"apiKeySecretRef": SECRET}, [("spec.apiKeySecretRef", OLLAMA_KEY)]),
        pytest.param(
            "ollama",
            {"hfTokenSecretRef": SECRET},
            [
                (
                    "spec.hfTokenSecretRef",
                    "ollama pulls from its own library and does not use a Hugging Face token",
                )
            ],
        ),
        pytest.param(
            "ollama",
            {"extraArgs": ["--verbose", "--host=x"]},
            [
                ("spec.extraArgs", OLLAMA_ARGS),
                (
                    "spec.extraArgs[1]",
                    "--host is set by the operator and cannot be overridden",
                ),
            ],
        ),
        pytest.param(
            "vllm",
            {"env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2", "valueFrom": {}}]},
            [("spec.env[1]", "set value or valueFrom, not both")],
        ),
    ],
)
def test_rule(engine: str, fields: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    assert problems(engine, **fields) == expected


API_KEY_HINT = " (it would put the key in the Deployment; use spec.apiKeySecretRef)"


@pytest.mark.parametrize(
    ("engine", "arg", "flag", "hint"),
    [
        ("vllm", "--host", "--host", ""),
        ("tgi", "--hostname", "--hostname", ""),
        ("vllm", "--port=9000", "--port", ""),
        ("vllm", "--api-key=sk-123", "--api-key", API_KEY_HINT),
        ("llamacpp", "--api-key-file", "--api-key-file", API_KEY_HINT),
        ("vllm", "--served-model-name", "--served-model-name", ""),
        ("llamacpp", "--alias=x", "--alias", ""),
        ("llamacpp", "-a", "-a", ""),
        ("llamacpp", "-m", "-m", ""),
        ("vllm", "--model", "--model", ""),
        ("tgi", "--model-id=x/y", "--model-id", ""),
    ],
)
def test_managed_flags_in_extra_args(engine: str, arg: str, flag: str, hint: str) -> None:
    assert problems(engine, extraArgs=["--ok", arg]) == [
        ("spec.extraArgs[1]", f"{flag} is set by the operator and cannot be overridden{hint}")
    ]


@pytest.mark.parametrize("name", sorted(MANAGED_ENV))
def test_managed_env_names(name: str) -> None:
    assert name in {
        "HF_TOKEN",
        "VLLM_API_KEY",
        "API_KEY",
        "LLAMA_API_KEY",
        "OLLAMA_HOST",
        "SGLANG_API_KEY",
    } or name.startswith("FABRIC_")
    env = [{"name": "OK", "value": "1"}, {"name": name, "value": "literal"}]
    assert problems("llamacpp", env=env) == [
        (
            "spec.env[1].name",
            f"{name} is set by the operator (from a Secret reference or its own settings) "
            "and cannot be overridden",
        )
    ]


# --- metadata.name ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a" * 64, "Model", "1model", "model-", "my_model", "a.b", ""])
def test_name_must_be_a_dns_1035_label(name: str) -> None:
    found = problems("llamacpp", name=name)
    assert len(found) == 1
    field, message = found[0]
    assert field == "metadata.name"
    assert message.startswith(repr(name[:80]))
    assert "must be a DNS-1035 label: at most 63 lowercase letters" in message


@pytest.mark.parametrize("name", ["a", "a" * 63, "qwen-2-5", "m0"])
def test_good_names(name: str) -> None:
    assert problems("llamacpp", name=name) == []


# Python's `$` also matches before a trailing newline; Go's (the API server's) does not.
@pytest.mark.parametrize(
    ("fields", "name", "field"),
    [
        ({}, "abc\n", "metadata.name"),
        ({"service": {"annotations": {"team\n": "a"}}}, "m", "spec.service.annotations['team\\n']"),
        ({"priorityClassName": "high\n"}, "m", "spec.priorityClassName"),
        ({"apiKeySecretRef": {"name": "s", "key": "k\n"}}, "m", "spec.apiKeySecretRef.key"),
    ],
)
def test_trailing_newline_is_refused(fields: dict[str, Any], name: str, field: str) -> None:
    assert [f for f, _ in problems("llamacpp", name=name, **fields)] == [field]


# --- unparsable specs -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "fields"),
    [
        ({"engine": "gpt"}, {"spec.engine"}),
        ({"engine": "vllm"}, {"spec"}),
        ({**BASE["llamacpp"], "replicas": -1}, {"spec.replicas"}),
        ({**BASE["llamacpp"], "bogus": 1}, {"spec.bogus"}),
        ({**BASE["llamacpp"], "engineOptions": {"contextLength": 0}}, {OPTIONS + ".contextLength"}),
        ({**BASE["vllm"], "model": {"url": URL, "ollama": "x"}}, {"spec.model"}),
        (
            {**BASE["vllm"], "resources": {"gpu": {"count": 1, "vendor": "intel"}}},
            {"spec.resources.gpu.vendor"},
        ),
    ],
)
def test_unparsable_spec_gives_no_backend_and_spec_paths(
    spec: dict[str, Any], fields: set[str]
) -> None:
    backend, found = validate({"metadata": {"name": "m"}, "spec": spec})
    assert backend is None
    assert {p.field for p in found} == fields
    assert all(p.message for p in found)


def test_unparsable_spec_still_reports_a_bad_name() -> None:
    backend, found = validate({"metadata": {"name": "Bad"}, "spec": {}})
    assert backend is None
    assert [p.field for p in found] == ["metadata.name", "spec.engine"]
    assert str(found[1]).startswith("spec.engine: ")


# --- pydantic-level checks --------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "got"),
    [({}, "none"), ({"huggingface": {"repo": REPO}, "url": URL}, "huggingface, url")],
)
def test_model_source_needs_exactly_one(source: dict[str, Any], got: str) -> None:
    with pytest.raises(
        ValidationError,
        match=f"exactly one of huggingface, url, ollama, pvc, openllm must be set, got {got}",
    ):
        ModelSource.model_validate(source)


@pytest.mark.parametrize(
    "spec",
    [
        {**BASE["llamacpp"], "unknown": True},
        {**BASE["llamacpp"], "model": {"url": URL, "sha": "x"}},
        {**BASE["vllm"], "model": {"huggingface": {"repo": REPO, "branch": "main"}}},
        {**BASE["vllm"], "resources": {"gpu": {"count": 1, "memory": "80Gi"}}},
        {**BASE["llamacpp"], "env": [{"name": "A", "valueFrm": {}}]},
    ],
)
def test_unknown_fields_are_refused(spec: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        LLMBackendSpec.model_validate(spec)


@pytest.mark.parametrize(("replicas", "ok"), [(-1, False), (0, True), (1000, True), (1001, False)])
def test_replicas_bounds(replicas: int, ok: bool) -> None:
    spec = {**BASE["llamacpp"], "replicas": replicas}
    if ok:
        assert LLMBackendSpec.model_validate(spec).replicas == replicas
    else:
        with pytest.raises(ValidationError, match="replicas"):
            LLMBackendSpec.model_validate(spec)


REMOTE = {"engine": "remote", "remote": {"baseURL": "https://api.anthropic.com/v1"}}


def test_remote_backend_is_valid_without_model_source() -> None:
    backend, found = validate({"metadata": {"name": "claude"}, "spec": REMOTE})
    assert backend is not None and found == []
    assert backend.spec.remote is not None and backend.spec.remote.provider == "openai-compatible"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({**REMOTE, "image": "x"}, [("spec.image", "a remote backend runs no pods; remove it")]),
        (
            {**REMOTE, "resources": {"gpu": {"count": 1}}, "nodeSelector": {"a": "b"}},
            [
                ("spec.resources", "a remote backend runs no pods; remove it"),
                ("spec.nodeSelector", "a remote backend runs no pods; remove it"),
            ],
        ),
        (
            {"engine": "vllm", "remote": REMOTE["remote"], "resources": GPU1},
            [("spec.remote", "is for engine remote, not vllm")],
        ),
        (
            {"engine": "remote", "model": {"url": URL}},
            [("spec.model", "engine remote takes spec.remote, not a model source")],
        ),
        (
            {**REMOTE, "fallback": ["m", "other", "other"]},
            [
                ("spec.fallback[0]", "a backend cannot fall back to itself"),
                ("spec.fallback", "lists a backend more than once"),
            ],
        ),
    ],
)
def test_remote_and_fallback_mistakes_are_named(
    spec: dict[str, Any], expected: list[tuple[str, str]]
) -> None:
    backend, found = validate({"metadata": {"name": "m"}, "spec": spec})
    assert backend is not None
    assert [(p.field, p.message) for p in found] == expected


def test_model_and_remote_together_do_not_parse() -> None:
    backend, found = validate(
        {"metadata": {"name": "m"}, "spec": {**REMOTE, "model": {"url": URL}}}
    )
    assert backend is None
    assert [(p.field, p.message) for p in found] == [
        ("spec", "Value error, exactly one of model and remote must be set")
    ]


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ({}, [("spec.networkPolicy.from[0]", "needs namespaceSelector, podSelector or ipBlock")]),
        (
            {"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}},
            [
                (
                    "spec.networkPolicy.from[0]",
                    "ipBlock cannot be combined with namespaceSelector/podSelector",
                )
            ],
        ),
        (
            {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["192.168.0.0/16"]}},
            [("spec.networkPolicy.from[0].ipBlock.except[0]", "not inside 10.0.0.0/8")],
        ),
        (
            {"podSelector": {"matchLabels": {"app": "bad value"}}},
            [
                (
                    "spec.networkPolicy.from[0].podSelector.matchLabels['app']",
                    "'bad value' is not a valid label value",
                )
            ],
        ),
        (
            {"podSelector": {"matchExpressions": [{"key": "tier", "operator": "In"}]}},
            [
                (
                    "spec.networkPolicy.from[0].podSelector.matchExpressions[0].values",
                    "operator In needs values",
                )
            ],
        ),
    ],
)
def test_network_policy_peers_the_api_server_would_refuse(
    peer: dict[str, Any], expected: list[tuple[str, str]]
) -> None:
    found = problems("llamacpp", networkPolicy={"from": [peer]})
    assert found == expected


def test_env_listed_twice_is_refused() -> None:
    env = [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]
    assert problems("llamacpp", env=env) == [("spec.env[1].name", "A is listed twice")]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"resources": {"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}},
            [("spec.resources", "requests.memory 2Gi is above limits.memory 1Gi")],
        ),
        (
            {"strategy": {"type": "RollingUpdate", "maxSurge": 0, "maxUnavailable": "0%"}},
            [("spec.strategy", "maxSurge and maxUnavailable cannot both be 0")],
        ),
        (
            {"strategy": {"type": "RollingUpdate", "maxUnavailable": "150%"}},
            [("spec.strategy.maxUnavailable", "must not be more than 100%")],
        ),
        (
            {"strategy": {"type": "RollingUpdate", "maxSurge": -1}},
            [("spec.strategy.maxSurge", "must not be negative")],
        ),
    ],
)
def test_resources_and_rollouts_the_api_server_would_refuse(
    fields: dict[str, Any], expected: list[tuple[str, str]]
) -> None:
    assert problems("llamacpp", **fields) == expected
