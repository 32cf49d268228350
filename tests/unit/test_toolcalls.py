"""Tool calling: the flags each engine is started with, the model-family table, what is
refused, and what status and Events say."""

from __future__ import annotations

from typing import Any

import pytest

from fabric_operator.api.backend import LLMBackend
from fabric_operator.controller.status import Failure, compute, remote_status
from fabric_operator.render import render, toolcalls
from fabric_operator.validation import validate
from tests.unit.test_reconciler import BACKEND, FakeKube, reconciler

EX = "/vllm-workspace/examples/tool_chat_template_"
GPU = {"resources": {"gpu": {"count": 1}}}


def manifest(spec: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"name": "m", "namespace": "ns", "uid": "u1"}, "spec": spec}


def problems(spec: dict[str, Any]) -> list[tuple[str, str]]:
    parsed, found = validate(manifest(spec))
    assert parsed is not None
    return [(p.field, p.message) for p in found]


def backend(spec: dict[str, Any]) -> LLMBackend:
    assert problems(spec) == []
    return LLMBackend.from_manifest(manifest(spec))


def vllm(repo: str, **fields: Any) -> dict[str, Any]:
    return {"engine": "vllm", "model": {"huggingface": {"repo": repo}}, **GPU, **fields}


def args(spec: dict[str, Any]) -> list[str]:
    c = render(backend(spec)).deployment["spec"]["template"]["spec"]["containers"][0]
    result: list[str] = c["args"]
    return result


def tool_args(spec: dict[str, Any]) -> list[str]:
    return toolcalls.plan(backend(spec)).args


# --- the model-family table, with real repository names ---------------------------------


@pytest.mark.parametrize(
    ("repo", "parser", "template"),
    [
        ("Qwen/Qwen2.5-7B-Instruct", "hermes", None),
        ("Qwen/Qwen2.5-Coder-32B-Instruct", "hermes", None),
        ("Qwen/Qwen3-8B", "hermes", None),
        ("Qwen/QwQ-32B", "hermes", None),
        ("Qwen/Qwen3-Coder-30B-A3B-Instruct", "qwen3_xml", None),
        ("NousResearch/Hermes-3-Llama-3.1-8B", "hermes", None),
        ("NousResearch/Hermes-2-Pro-Llama-3-8B", "hermes", None),
        ("meta-llama/Llama-3.1-8B-Instruct", "llama3_json", f"{EX}llama3.1_json.jinja"),
        ("meta-llama/Meta-Llama-3.1-70B-Instruct", "llama3_json", f"{EX}llama3.1_json.jinja"),
        ("meta-llama/Llama-3.3-70B-Instruct", "llama3_json", f"{EX}llama3.1_json.jinja"),
        ("meta-llama/Llama-3.2-3B-Instruct", "llama3_json", f"{EX}llama3.2_json.jinja"),
        (
            "meta-llama/Llama-4-Scout-17B-16E-Instruct",
            "llama4_pythonic",
            f"{EX}llama4_pythonic.jinja",
        ),
        ("mistralai/Mistral-7B-Instruct-v0.3", "mistral", f"{EX}mistral_parallel.jinja"),
        ("mistralai/Mixtral-8x7B-Instruct-v0.1", "mistral", f"{EX}mistral_parallel.jinja"),
        ("mistralai/Ministral-8B-Instruct-2410", "mistral", f"{EX}mistral_parallel.jinja"),
        ("ibm-granite/granite-3.0-8b-instruct", "granite", f"{EX}granite.jinja"),
        ("ibm-granite/granite-3.1-8b-instruct", "granite", None),
        ("ibm-granite/granite-20b-functioncalling", "granite-20b-fc", f"{EX}granite_20b_fc.jinja"),
        ("deepseek-ai/DeepSeek-V3", "deepseek_v3", f"{EX}deepseekv3.jinja"),
        ("deepseek-ai/DeepSeek-V3.1", "deepseek_v31", f"{EX}deepseekv31.jinja"),
        ("deepseek-ai/DeepSeek-R1-0528", "deepseek_v3", f"{EX}deepseekr1.jinja"),
        ("openai/gpt-oss-20b", "openai", None),
        ("moonshotai/Kimi-K2-Instruct", "kimi_k2", None),
        ("zai-org/GLM-4.5-Air", "glm45", None),
        ("internlm/internlm2_5-7b-chat", "internlm", f"{EX}internlm2_tool.jinja"),
        ("microsoft/Phi-4-mini-instruct", "phi4_mini_json", f"{EX}phi4_mini.jinja"),
    ],
)
def test_vllm_parser_follows_the_model_family(repo: str, parser: str, template: str | None) -> None:
    expected = ["--enable-auto-tool-choice", "--tool-call-parser", parser]
    if template:
        expected += ["--chat-template", template]
    spec = vllm(repo)
    assert tool_args(spec) == expected
    assert args(spec)[-len(expected) :] == expected  # after the engine's own flags
    assert parser in toolcalls.VLLM_PARSERS
    plan = toolcalls.plan(backend(spec))
    assert (plan.enabled, plan.summary, plan.reason) == (True, parser, "ParserFromModel")


@pytest.mark.parametrize(
    "repo",
    [
        "meta-llama/Meta-Llama-3-8B-Instruct",  # Llama 3.0: no tool format
        "google/gemma-2-9b-it",
        "ibm-granite/granite-4.0-h-small",  # the parser depends on more than the name
        "Qwen/Qwen-7B-Chat",  # Qwen 1
        "deepseek-ai/DeepSeek-V3.2-Exp",  # not in vLLM v0.11's docs
    ],
)
def test_an_unknown_family_leaves_vllm_tool_calling_off_and_says_why(repo: str) -> None:
    spec = vllm(repo)
    assert tool_args(spec) == []
    assert not any("tool" in a for a in args(spec))
    plan = toolcalls.plan(backend(spec))
    assert (plan.enabled, plan.summary, plan.reason) == (False, "off", "NoParserKnown")
    assert f"hf:{repo}" in plan.message and "spec.toolCalling.parser" in plan.message


@pytest.mark.parametrize(
    ("repo", "family"),
    [
        # Named after their teacher or base, with neither's tool format.
        ("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "DeepSeek-R1 distillation"),
        ("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "DeepSeek-R1 distillation"),
        ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "DeepSeek-R1 distillation"),
        ("deepseek-ai/DeepSeek-R1-0528-Qwen3-8B", "DeepSeek-R1 distillation"),
        ("teknium/OpenHermes-2.5-Mistral-7B", "OpenHermes"),
        ("mistralai/Mistral-7B-Instruct-v0.2", "Mistral-7B v0.1/v0.2"),
        ("mistralai/Mistral-7B-v0.1", "Mistral-7B v0.1/v0.2"),
    ],
)
def test_families_known_to_have_no_tool_format_stay_off(repo: str, family: str) -> None:
    plan = toolcalls.plan(backend(vllm(repo)))
    assert (plan.enabled, plan.reason, plan.args) == (False, "NoParserKnown", [])
    assert plan.message.startswith(f"{family} models have no tool-call format")


@pytest.mark.parametrize(
    ("path", "claim", "parser"),
    [
        ("mistral_7b_instruct_v0_2", "w", None),  # underscores throughout
        ("gemma-2-9b-it", "qwen3-cache", None),  # the claim's name is not the model's
        ("models/Qwen2.5-7B-Instruct", "w", "hermes"),
        ("qwen-32b-base", "w", None),  # not Qwen3: "qwen-3" followed by a digit
    ],
)
def test_pvc_paths_are_matched_and_claim_names_are_not(
    path: str, claim: str, parser: str | None
) -> None:
    spec = vllm("x/y", model={"pvc": {"claimName": claim, "path": path}})
    assert toolcalls.plan(backend(spec)).summary == (parser or "off")


def test_the_served_name_counts_only_for_a_pvc_path_that_says_nothing() -> None:
    spec = vllm("meta-llama/Llama-3.1-8B-Instruct", servedModelName="qwen3-compatible")
    assert tool_args(spec)[2] == "llama3_json"
    # A named repo is never overridden, nor named, by the served name.
    assert tool_args(vllm("google/gemma-2-9b-it", servedModelName="llama-3.1")) == []
    # A PVC path that says nothing: the served name tells the parser, never a template
    # (which would replace the model's own prompt format on a guess).
    pvc = {"model": {"pvc": {"claimName": "w", "path": "model"}}}
    plan = toolcalls.plan(backend({**vllm("x/y"), **pvc, "servedModelName": "llama-3.1-8b"}))
    assert plan.args == ["--enable-auto-tool-choice", "--tool-call-parser", "llama3_json"]
    assert "(from the served name)" in plan.message


@pytest.mark.parametrize(
    "fields",
    [
        {"resources": {"gpu": {"count": 1, "vendor": "amd"}}},  # the ROCm image's path differs
        {"image": "registry.example/vllm:custom"},  # a team's own image: unknown path
    ],
)
def test_family_templates_only_in_the_pinned_nvidia_image(fields: dict[str, Any]) -> None:
    spec = vllm("meta-llama/Llama-3.1-8B-Instruct", **fields)
    assert tool_args(spec) == ["--enable-auto-tool-choice", "--tool-call-parser", "llama3_json"]


def test_a_named_parser_and_template_win_over_the_table() -> None:
    spec = vllm(
        "meta-llama/Llama-3.2-3B-Instruct",
        toolCalling={"parser": "pythonic", "chatTemplate": "/templates/t.jinja"},
    )
    assert tool_args(spec) == [
        *["--enable-auto-tool-choice", "--tool-call-parser", "pythonic"],
        *["--chat-template", "/templates/t.jinja"],
    ]
    assert toolcalls.plan(backend(spec)).reason == "ParserSet"
    # A parser for an unknown family switches tool calling on.
    assert tool_args(vllm("google/gemma-2-9b-it", toolCalling={"parser": "pythonic"}))[2] == (
        "pythonic"
    )


# --- each engine ----------------------------------------------------------------------------

LLAMACPP = {"engine": "llamacpp", "model": {"url": "https://h.invalid/m.gguf"}}
PY = {"engine": "llamacpp-python", "model": {"pvc": {"claimName": "w", "path": "qwen3-4b.gguf"}}}


@pytest.mark.parametrize(
    ("spec", "expected", "summary", "reason"),
    [
        pytest.param(LLAMACPP, ["--jinja"], "jinja", "ChatTemplate", id="llamacpp"),
        pytest.param(
            {**LLAMACPP, "toolCalling": {"enabled": False}},
            ["--no-jinja"],
            "off",
            "Disabled",
            id="llamacpp-off",
        ),
        pytest.param(
            {"engine": "tgi", "model": {"huggingface": {"repo": "o/r"}}, **GPU},
            [],
            "builtin",
            "BuiltIn",
            id="tgi",
        ),
        pytest.param(
            {"engine": "ollama", "model": {"ollama": "qwen3:4b"}},
            [],
            "builtin",
            "ModelTemplate",
            id="ollama",
        ),
        pytest.param(
            PY,
            ["--chat_format", "chatml-function-calling"],
            "chatml-function-calling",
            "ParserFromModel",
            id="llamacpp-python-chatml-family",
        ),
        pytest.param(
            {**PY, "model": {"pvc": {"claimName": "w", "path": "llama-3.2-1b.gguf"}}},
            [],
            "off",
            "NoParserKnown",
            id="llamacpp-python-other-family",
        ),
        pytest.param(
            {**PY, "toolCalling": {"parser": "functionary-v2"}},
            ["--chat_format", "functionary-v2"],
            "functionary-v2",
            "ParserSet",
            id="llamacpp-python-named",
        ),
        pytest.param({**PY, "toolCalling": {"enabled": False}}, [], "off", "Disabled", id="py-off"),
        pytest.param(
            vllm("Qwen/Qwen3-8B", toolCalling={"enabled": False}),
            [],
            "off",
            "Disabled",
            id="vllm-off",
        ),
    ],
)
def test_each_engine(spec: dict[str, Any], expected: list[str], summary: str, reason: str) -> None:
    plan = toolcalls.plan(backend(spec))
    assert (plan.args, plan.summary, plan.reason) == (expected, summary, reason)
    # Ollama's depends on the model, which the operator cannot see: Unknown.
    assert plan.enabled is (None if reason == "ModelTemplate" else summary != "off")
    rendered = args(spec)
    # The tool flags close the engine's own (no extraArgs here), values beside their flags.
    assert rendered[len(rendered) - len(expected) :] == expected
    every = {f for flags in toolcalls.TOOL_FLAGS.values() for f in flags}
    assert [a for a in rendered if a in every] == [a for a in expected if a in every]


def test_remote_backends_leave_tools_to_the_provider() -> None:
    b = backend({"engine": "remote", "remote": {"baseURL": "https://api.openai.com/v1"}})
    status = remote_status(b, None, None, timestamp="2026-01-01T00:00:00Z")
    assert status["toolCalling"] == "provider"
    assert status["conditions"][-1]["type"] == "ToolCalling"
    assert status["conditions"][-1]["reason"] == "Provider"


# --- refused: contradictions and what cannot be done ------------------------------------------


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        pytest.param(
            {**LLAMACPP, "toolCalling": {"parser": "hermes"}},
            "spec.toolCalling.parser",
            "llamacpp has no tool-call parser to choose (it reads tools through the GGUF's "
            "chat template with --jinja); remove it",
            id="parser-on-llamacpp",
        ),
        pytest.param(
            {"engine": "ollama", "model": {"ollama": "qwen3"}, "toolCalling": {"parser": "x"}},
            "spec.toolCalling.parser",
            "ollama has no tool-call parser to choose (it reads tools by itself); remove it",
            id="parser-on-ollama",
        ),
        pytest.param(
            vllm("Qwen/Qwen3-8B", toolCalling={"parser": "qwen9"}),
            "spec.toolCalling.parser",
            "'qwen9' is not a --tool-call-parser of the pinned vllm image; it knows deepseek_v3,",
            id="unknown-vllm-parser",
        ),
        pytest.param(
            {**PY, "toolCalling": {"parser": "hermes"}},
            "spec.toolCalling.parser",
            "'hermes' is not a --chat_format of the pinned llamacpp-python image; it knows "
            "chatml-function-calling, functionary,",
            id="unknown-chat-format",
        ),
        pytest.param(
            {**LLAMACPP, "toolCalling": {"chatTemplate": "/t.jinja"}},
            "spec.toolCalling.chatTemplate",
            "is for engine vllm, not llamacpp",
            id="template-on-llamacpp",
        ),
        pytest.param(
            {"engine": "tgi", "model": {"huggingface": {"repo": "o/r"}}, **GPU}
            | {"toolCalling": {"enabled": False}},
            "spec.toolCalling.enabled",
            "tgi has no switch the operator can turn tool calling off with; remove it",
            id="tgi-cannot-turn-off",
        ),
        pytest.param(
            vllm("Qwen/Qwen3-8B", toolCalling={"enabled": False, "parser": "hermes"}),
            "spec.toolCalling.parser",
            "is set while tool calling is disabled",
            id="off-with-parser",
        ),
        pytest.param(
            vllm("google/gemma-2-9b-it", toolCalling={"enabled": True}),
            "spec.toolCalling.enabled",
            "true, but tool calling cannot be on: vLLM needs a tool-call parser",
            id="required-but-unknown",
        ),
        pytest.param(
            {**PY, "model": {"pvc": {"claimName": "w", "path": "m.gguf"}}}
            | {"toolCalling": {"enabled": True}},
            "spec.toolCalling.enabled",
            "true, but tool calling cannot be on: llama-cpp-python calls tools only with",
            id="required-py-unknown",
        ),
        pytest.param(
            vllm(
                "Qwen/Qwen3-8B",
                toolCalling={"parser": "hermes"},
                extraArgs=["--tool_call_parser=pythonic"],  # vLLM reads _ as -
            ),
            "spec.extraArgs[0]",
            "--tool-call-parser sets tool calling, as spec.toolCalling does; keep one of them",
            id="extra-args-and-tool-calling",
        ),
        pytest.param(
            {**LLAMACPP, "toolCalling": {"enabled": True}, "extraArgs": ["--no-jinja"]},
            "spec.extraArgs[0]",
            "--no-jinja sets tool calling, as spec.toolCalling does",
            id="required-but-no-jinja",
        ),
        pytest.param(
            vllm("Qwen/Qwen3-8B", extraArgs=["--served_model_name=other"]),
            "spec.extraArgs[0]",
            "--served-model-name is set by the operator",
            id="vllm-underscore-spelling",
        ),
        pytest.param(
            {**PY, "extraArgs": ["--api_k", "sk-literal"]},
            "spec.extraArgs[0]",
            "--api_key is set by the operator and cannot be overridden (it would put the key",
            id="py-abbreviated-key",
        ),
        pytest.param(
            {**PY, "extraArgs": ["--config_file=/tmp/c.json"]},
            "spec.extraArgs[0]",
            "--config_file is set by the operator",
            id="py-config-file",
        ),
        pytest.param(
            {**PY, "env": [{"name": "api_key", "value": "sk-literal"}]},
            "spec.env[0].name",
            "api_key would set llama-cpp-python's api_key",
            id="py-env-lowercase-key",
        ),
        pytest.param(
            {**PY, "env": [{"name": "Port", "value": "1"}]},
            "spec.env[0].name",
            "Port would set llama-cpp-python's port",
            id="py-env-port",
        ),
        pytest.param(
            {**PY, "env": [{"name": "CONFIG_FILE", "value": "/c.json"}]},
            "spec.env[0].name",
            "CONFIG_FILE would set llama-cpp-python's config_file",
            id="py-env-config-file",
        ),
        pytest.param(
            vllm("Qwen/Qwen3-8B", toolCalling={"chatTemplate": "/proc/self/environ"}),
            "spec.toolCalling.chatTemplate",
            "not under /proc, /sys or /dev",
            id="template-from-proc",
        ),
        pytest.param(
            vllm("google/gemma-2-9b-it", toolCalling={"chatTemplate": "/models/t.jinja"}),
            "spec.toolCalling.chatTemplate",
            "is used only with a tool-call parser, and none is known for this model",
            id="template-without-parser",
        ),
        pytest.param(
            {"engine": "llamacpp-python", "model": {"huggingface": {"repo": "o/r", "file": "f"}}},
            "spec.model.huggingface",
            "the pinned llama-cpp-python image cannot download",
            id="py-hf-needs-an-image-that-can-download",
        ),
        pytest.param(
            {"engine": "remote", "remote": {"baseURL": "https://api.openai.com/v1"}}
            | {"toolCalling": {"enabled": True}},
            "spec.toolCalling",
            "a remote backend runs no pods; remove it",
            id="remote",
        ),
        pytest.param(
            {**PY, "resources": {"gpu": {"count": 1}}},
            "spec.image",
            "llama-cpp-python publishes no GPU image",
            id="py-gpu-needs-an-image",
        ),
        pytest.param(
            {"engine": "llamacpp-python", "model": {"huggingface": {"repo": "o/r"}}},
            "spec.model.huggingface.file",
            "llamacpp-python needs the GGUF file",
            id="py-hf-needs-a-file",
        ),
        pytest.param(
            {"engine": "llamacpp-python", "model": {"url": "https://h.invalid/m.gguf"}},
            "spec.model.url",
            "engine llamacpp-python cannot load a url model source",
            id="py-no-url",
        ),
    ],
)
def test_refused(spec: dict[str, Any], field: str, words: str) -> None:
    found = problems(spec)
    assert any(f == field and words in m for f, m in found), found


def test_allowed_where_it_could_look_wrong() -> None:
    # A custom image may be a newer vLLM with parsers the table does not know.
    assert problems(vllm("Qwen/Qwen3-8B", image="r/v:1", toolCalling={"parser": "qwen9"})) == []
    assert problems(vllm("Qwen/Qwen3-8B", toolCalling={"enabled": True})) == []
    # Ollama's depends on the model: asking for it is not refused.
    assert problems({"engine": "ollama", "model": {"ollama": "x"}, "toolCalling": {}}) == []
    # llama-cpp-python's own flags that merely begin like a managed one's prefix do not.
    assert (
        problems(
            {**PY, "extraArgs": ["--n_threads", "2", "--hf_pretrained_model_name_or_path=o/r"]}
        )
        == []
    )


@pytest.mark.parametrize(
    ("spec", "summary", "on"),
    [
        # Specs written before spec.toolCalling existed keep working, as written.
        pytest.param({**LLAMACPP, "extraArgs": ["--jinja"]}, "jinja", True, id="jinja"),
        pytest.param({**LLAMACPP, "extraArgs": ["--no-jinja"]}, "off", False, id="no-jinja"),
        pytest.param(
            vllm(
                "Qwen/Qwen2.5-7B-Instruct",
                extraArgs=["--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
            ),
            "hermes",
            True,
            id="vllm-flags",
        ),
        pytest.param(
            vllm("meta-llama/Llama-3.1-8B-Instruct", extraArgs=["--chat-template=/m/t.jinja"]),
            "off",
            False,
            id="vllm-template-only",
        ),
        pytest.param(
            {**PY, "extraArgs": ["--chat_form", "functionary-v2"]},  # argparse's prefix
            "functionary-v2",
            True,
            id="py-abbreviated",
        ),
    ],
)
def test_tool_flags_already_in_extra_args_are_left_to_stand(
    spec: dict[str, Any], summary: str, on: bool
) -> None:
    assert problems(spec) == []
    plan = toolcalls.plan(backend(spec))
    assert (plan.enabled, plan.summary, plan.reason, plan.args) == (on, summary, "ExtraArgs", [])
    rendered = args(spec)
    for arg in spec["extraArgs"]:
        assert rendered.count(arg) == 1  # once: the user's, nothing added beside it


def test_a_refused_spec_leaves_what_status_says_of_tool_calling() -> None:
    running = compute(backend(vllm("Qwen/Qwen3-8B")), None, None, None)
    assert running["toolCalling"] == "hermes"
    bad = LLMBackend.from_manifest(manifest(vllm("Qwen/Qwen3-8B", toolCalling={"parser": "x9"})))
    failure = Failure("InvalidSpec", "spec.toolCalling.parser: 'x9' is not ...")
    after = compute(bad, None, failure, running)
    assert after["toolCalling"] == "hermes"
    assert after["conditions"][-1] == running["conditions"][-1]
    # A new backend refused at once: nothing said yet.
    fresh = compute(bad, None, failure, None)
    assert "toolCalling" not in fresh
    assert (fresh["conditions"][-1]["status"], fresh["conditions"][-1]["reason"]) == (
        "Unknown",
        "InvalidSpec",
    )


# --- status and Events --------------------------------------------------------------------


def test_status_shows_how_or_why_not() -> None:
    on = compute(backend(vllm("Qwen/Qwen3-8B")), None, None, None)
    assert on["toolCalling"] == "hermes"
    cond = on["conditions"][-1]
    assert (cond["type"], cond["status"], cond["reason"]) == (
        "ToolCalling",
        "True",
        "ParserFromModel",
    )
    assert cond["message"] == "--tool-call-parser hermes (model family Qwen2.5/Qwen3/QwQ)"
    off = compute(backend(vllm("google/gemma-2-9b-it")), None, None, None)
    assert off["toolCalling"] == "off"
    assert off["conditions"][-1]["status"] == "False"


def _reconcile(kube: FakeKube, spec: dict[str, Any], generation: int) -> None:
    rec, store = reconciler(kube)
    obj = {**BACKEND, "metadata": {**BACKEND["metadata"], "generation": generation}}
    previous = kube.statuses[-1] if kube.statuses else None
    store.put("LLMBackend", {**obj, "spec": spec, "status": previous})
    rec.reconcile("n", "m")


def test_events_warn_when_off_for_want_of_a_parser_and_note_changes() -> None:
    kube = FakeKube()
    _reconcile(kube, vllm("google/gemma-2-9b-it"), 1)
    assert ("Warning", "ToolCallingOff") in kube.events
    kube.events.clear()
    _reconcile(kube, vllm("google/gemma-2-9b-it", toolCalling={"parser": "pythonic"}), 2)
    assert ("Normal", "ToolCallingOn") in kube.events
    kube.events.clear()
    _reconcile(kube, vllm("google/gemma-2-9b-it", toolCalling={"enabled": False}), 3)
    assert ("Normal", "ToolCallingOff") in kube.events


def test_a_new_backend_with_tools_on_costs_no_extra_event() -> None:
    kube = FakeKube()
    _reconcile(kube, vllm("Qwen/Qwen3-8B"), 1)
    assert [e for e in kube.events if e[1].startswith("ToolCalling")] == []
