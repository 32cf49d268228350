"""Tool calling per engine: which flags switch it on, and which parser a model family needs.

Agents cannot take a first step without `tool_calls`, so tool calling is on wherever the
engine and the model allow it; where they do not, the decision says why in words a user
can act on (status.toolCalling and the ToolCalling condition). One table maps model
families to vLLM's parsers: keep it here and nowhere else.

Facts checked against vLLM v0.11.0 (docs/features/tool_calling.md; `tools` without
--enable-auto-tool-choice is a 400, since a request with tools means tool_choice "auto"),
llama.cpp's server (--jinja, on by default from b7170, PR #17524; without it `tools` is an
error), TGI 3.3 (router/src/lib.rs: tools through its grammar, no flag), Ollama
(docs/api/openai-compatibility.mdx: tools for models whose template has them) and
llama-cpp-python 0.3 (llama_chat_format.py: chatml-function-calling, functionary*).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from fabric_operator.api.backend import LLMBackend
from fabric_operator.api.v1alpha1 import Engine

# Reasons of the ToolCalling condition.
PARSER_FROM_MODEL = "ParserFromModel"
PARSER_SET = "ParserSet"
CHAT_TEMPLATE = "ChatTemplate"
BUILT_IN = "BuiltIn"
DISABLED = "Disabled"
NO_PARSER_KNOWN = "NoParserKnown"
PROVIDER = "Provider"

# vLLM's examples/ directory in the vllm/vllm-openai image (docker/Dockerfile copies it
# to /vllm-workspace/examples).
VLLM_EXAMPLES = "/vllm-workspace/examples"


@dataclass(frozen=True)
class Family:
    """A model family whose tool-call format vLLM's docs name."""

    name: str
    pattern: re.Pattern[str]
    vllm_parser: str
    # A template from vLLM's examples/ that renders tools, for models whose own does not.
    vllm_template: str | None = None
    # The family's chat format is ChatML, so llama-cpp-python's chatml-function-calling
    # formats its prompts as the model was trained.
    chatml: bool = False


def _example(name: str) -> str:
    return f"{VLLM_EXAMPLES}/tool_chat_template_{name}.jinja"


def _family(
    name: str, pattern: str, parser: str, template: str | None = None, chatml: bool = False
) -> Family:
    return Family(name, re.compile(pattern), parser, template, chatml)


# First match wins: the more specific names come first. Matched against the lower-cased
# model reference (Hugging Face repo, PVC path, GGUF URL or Ollama tag, and the served
# name). The parser and template are those vLLM v0.11.0's docs give for the family (Qwen3:
# hermes, as Qwen's own docs say). Families left out on purpose: Llama 3.0 (no tool
# format), Granite 4 and xLAM (the parser or template depends on more than the name).
FAMILIES: tuple[Family, ...] = (
    _family("Qwen3-Coder", r"qwen3[-_]?coder", "qwen3_xml", chatml=True),
    _family("Qwen2.5/Qwen3/QwQ", r"qwen[-_]?(2\.5|3)|qwq", "hermes", chatml=True),
    _family("Hermes 2 Pro/3", r"hermes[-_]?(2[-_]?pro|3)", "hermes", chatml=True),
    _family("Llama 4", r"llama[-_]?4", "llama4_pythonic", _example("llama4_pythonic")),
    _family("Llama 3.2", r"llama[-_]?3\.2", "llama3_json", _example("llama3.2_json")),
    _family("Llama 3.1/3.3", r"llama[-_]?3\.[13]", "llama3_json", _example("llama3.1_json")),
    _family(
        "Mistral",
        # Mistral-7B-Instruct v0.1 and v0.2 predate its tool format; "mistralai/" is the
        # organisation, not a model.
        r"mistral[-_](?!7b[-_]instruct[-_]v0\.[12])|mixtral|ministral|codestral|devstral"
        r"|magistral",
        "mistral",
        _example("mistral_parallel"),
    ),
    _family(
        "Granite 20B function calling",
        r"granite[-_]?20b[-_]?function",
        "granite-20b-fc",
        _example("granite_20b_fc"),
    ),
    _family("Granite 3.0", r"granite[-_]?3\.0", "granite", _example("granite")),
    _family("Granite 3.1+", r"granite[-_]?3\.[1-9]", "granite"),
    _family("DeepSeek-V3.1", r"deepseek[-_]?v3\.1", "deepseek_v31", _example("deepseekv31")),
    # R1's distillations are Qwen and Llama models with neither R1's nor a tool format.
    _family(
        "DeepSeek-R1", r"deepseek[-_]?r1(?![-_]distill)", "deepseek_v3", _example("deepseekr1")
    ),
    _family("DeepSeek-V3", r"deepseek[-_]?v3", "deepseek_v3", _example("deepseekv3")),
    _family("gpt-oss", r"gpt[-_]?oss", "openai"),
    _family("Kimi K2", r"kimi[-_]?k2", "kimi_k2"),
    _family("GLM-4.5", r"glm[-_]?4\.5", "glm45"),
    _family("InternLM2.5", r"internlm2", "internlm", _example("internlm2_tool")),
    _family("Phi-4-mini", r"phi[-_]?4[-_]?mini", "phi4_mini_json", _example("phi4_mini")),
)

# vLLM v0.11.0's registered parsers (ToolParserManager), for validating a named one.
VLLM_PARSERS = frozenset(
    {
        "deepseek_v3",
        "deepseek_v31",
        "glm45",
        "granite",
        "granite-20b-fc",
        "hermes",
        "hunyuan_a13b",
        "internlm",
        "jamba",
        "kimi_k2",
        "llama3_json",
        "llama4_json",
        "llama4_pythonic",
        "longcat",
        "minimax",
        "mistral",
        "openai",
        "phi4_mini_json",
        "pythonic",
        "qwen3_coder",
        "qwen3_xml",
        "seed_oss",
        "step3",
        "xlam",
    }
)
# llama-cpp-python's chat formats that answer `tools` with tool_calls.
LLAMACPP_PYTHON_FORMATS = frozenset(
    {"chatml-function-calling", "functionary", "functionary-v1", "functionary-v2"}
)
LLAMACPP_PYTHON_DEFAULT = "chatml-function-calling"

# Engines whose server reads `tools` with no flag at all.
BUILT_IN_ENGINES = {Engine.TGI, Engine.OLLAMA}
# Engines that take spec.toolCalling.parser, and what they call it.
PARSER_ENGINES = {Engine.VLLM: "--tool-call-parser", Engine.LLAMACPP_PYTHON: "--chat_format"}


@dataclass(frozen=True)
class ToolCallingPlan:
    """What the engine is started with for tool calling, and what status says of it."""

    enabled: bool
    summary: str  # status.toolCalling: the parser, jinja, builtin, or off
    reason: str
    message: str
    args: list[str] = field(default_factory=list)


def model_references(backend: LLMBackend) -> list[str]:
    """What a model family is recognised by, most telling first: the repo, path, URL or tag
    of the weights (with the GGUF file name), then the served name (a PVC path is often
    just `model`). A served name never outranks the weights' own name."""
    source = backend.spec.source
    weights = source.describe()
    if source.huggingface and source.huggingface.file:
        weights += f" {source.huggingface.file}"
    return [weights.lower(), backend.served_model_name.lower()]


def family_of(backend: LLMBackend) -> Family | None:
    for ref in model_references(backend):
        found = next((f for f in FAMILIES if f.pattern.search(ref)), None)
        if found:
            return found
    return None


def _off(reason: str, message: str) -> ToolCallingPlan:
    return ToolCallingPlan(False, "off", reason, message)


def plan(backend: LLMBackend) -> ToolCallingPlan:
    """The tool-calling decision for an engine backend (validation has refused the
    contradictions: a parser where the engine has none, `enabled: true` where it cannot)."""
    spec = backend.spec
    asked = spec.tool_calling
    enabled = asked.enabled if asked else None
    parser = asked.parser if asked else None
    engine = spec.engine
    if engine == Engine.REMOTE:
        return ToolCallingPlan(
            True,
            "provider",
            PROVIDER,
            "the remote provider answers tools; the gateway passes them through unchanged",
        )
    if enabled is False:
        if engine == Engine.LLAMACPP:
            # --jinja is llama-server's default from build b7170 on: switched off explicitly.
            return ToolCallingPlan(
                False,
                "off",
                DISABLED,
                "spec.toolCalling.enabled is false: --no-jinja",
                ["--no-jinja"],
            )
        return _off(DISABLED, "spec.toolCalling.enabled is false")
    if engine in BUILT_IN_ENGINES:
        how = (
            "tgi constrains tool calls with its grammar; no flag is needed"
            if engine == Engine.TGI
            else "ollama calls tools for models whose template supports them (its library "
            "page lists a tools tag); no flag is needed"
        )
        return ToolCallingPlan(True, "builtin", BUILT_IN, how)
    if engine == Engine.LLAMACPP:
        return ToolCallingPlan(
            True,
            "jinja",
            CHAT_TEMPLATE,
            "llama-server --jinja: the GGUF's chat template renders tools and its tool-call "
            "format is parsed",
            ["--jinja"],
        )
    family = family_of(backend)
    if engine == Engine.LLAMACPP_PYTHON:
        return _llamacpp_python(parser, family)
    return _vllm(backend, parser, family)


def _llamacpp_python(parser: str | None, family: Family | None) -> ToolCallingPlan:
    if parser:
        return ToolCallingPlan(
            True,
            parser,
            PARSER_SET,
            f"--chat_format {parser} (spec.toolCalling.parser)",
            ["--chat_format", parser],
        )
    if family and family.chatml:
        return ToolCallingPlan(
            True,
            LLAMACPP_PYTHON_DEFAULT,
            PARSER_FROM_MODEL,
            f"--chat_format {LLAMACPP_PYTHON_DEFAULT}: {family.name} models chat in ChatML",
            ["--chat_format", LLAMACPP_PYTHON_DEFAULT],
        )
    return _off(
        NO_PARSER_KNOWN,
        "llama-cpp-python calls tools only with a function-calling chat format, which "
        "replaces the model's own prompt format; no ChatML model family was recognised, so "
        "the GGUF's template is kept. Set spec.toolCalling.parser to one of "
        f"{', '.join(sorted(LLAMACPP_PYTHON_FORMATS))} to switch it on",
    )


def _vllm(backend: LLMBackend, parser: str | None, family: Family | None) -> ToolCallingPlan:
    asked = backend.spec.tool_calling
    template = asked.chat_template if asked else None
    if parser:
        reason, why = PARSER_SET, "spec.toolCalling.parser"
    elif family:
        parser, reason, why = family.vllm_parser, PARSER_FROM_MODEL, f"model family {family.name}"
        template = template or family.vllm_template
    else:
        return _off(
            NO_PARSER_KNOWN,
            "vLLM needs a tool-call parser for the model's output format and none is known "
            f"for {backend.spec.source.describe()}; set spec.toolCalling.parser (e.g. hermes, "
            "llama3_json, mistral, pythonic) to switch it on",
        )
    args = ["--enable-auto-tool-choice", "--tool-call-parser", parser]
    message = f"--tool-call-parser {parser} ({why})"
    if template:
        args += ["--chat-template", template]
        message += f" with the chat template {template}"
    return ToolCallingPlan(True, parser, reason, message, args)
