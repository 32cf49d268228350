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

Tool-calling flags a spec already carries in extraArgs (written before spec.toolCalling
existed) are left to stand: the plan steps aside and status reads them, so an upgrade never
turns a working backend into an invalid one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fabric_operator.api.backend import LLMBackend
from fabric_operator.api.v1alpha1 import Engine

# Reasons of the ToolCalling condition.
PARSER_FROM_MODEL = "ParserFromModel"
PARSER_SET = "ParserSet"
CHAT_TEMPLATE = "ChatTemplate"
BUILT_IN = "BuiltIn"
MODEL_TEMPLATE = "ModelTemplate"
DISABLED = "Disabled"
NO_PARSER_KNOWN = "NoParserKnown"
EXTRA_ARGS = "ExtraArgs"
PROVIDER = "Provider"
IMAGE = "Image"

# vLLM's examples/ directory in the vllm/vllm-openai image (docker/Dockerfile: WORKDIR
# /vllm-workspace, COPY examples examples). Only that image: elsewhere (the ROCm image,
# a team's own) the path is not known, and a wrong --chat-template stops vLLM at start.
VLLM_EXAMPLES = "/vllm-workspace/examples"


@dataclass(frozen=True)
class Family:
    """A model family and its tool-call format as vLLM's docs name it; a parser of None
    is a family known to have no tool format (tool calling stays off, saying so)."""

    name: str
    pattern: re.Pattern[str]
    vllm_parser: str | None
    # A template from vLLM's examples/ that renders tools, for models whose own does not.
    vllm_template: str | None = None
    # The family's chat format is ChatML, so llama-cpp-python's chatml-function-calling
    # formats its prompts as the model was trained.
    chatml: bool = False


def _example(name: str) -> str:
    return f"{VLLM_EXAMPLES}/tool_chat_template_{name}.jinja"


def _family(
    name: str,
    pattern: str,
    parser: str | None,
    template: str | None = None,
    chatml: bool = False,
) -> Family:
    return Family(name, re.compile(pattern), parser, template, chatml)


# First match wins: the exclusions and the more specific names come first. Matched against
# the lower-cased model name: a Hugging Face repo without its organisation (and the GGUF
# file), a PVC path, a GGUF URL's path, an Ollama tag; for a PVC only, then the served
# name. The parser and template are those vLLM v0.11.0's docs give for the family (Qwen3:
# hermes, as Qwen's own docs say). Left out on purpose: Llama 3.0 (no tool format),
# Granite 4, xLAM and DeepSeek-V3.2 (the parser or template depends on more than the
# name).
FAMILIES: tuple[Family, ...] = (
    # Fine-tunes named after their teacher or base, with neither's tool format.
    _family("DeepSeek-R1 distillation", r"distill|deepseek[-_]?r1[-_]0528[-_]qwen", None),
    _family("OpenHermes", r"openhermes", None),
    _family("Mistral-7B v0.1/v0.2", r"mistral[-_]7b[-_](instruct[-_])?v0[._][12]", None),
    _family("Qwen3-Coder", r"qwen3[-_]?coder", "qwen3_xml", chatml=True),
    _family("Qwen2.5/Qwen3/QwQ", r"qwen[-_]?(2\.5|3)(?![\d.])|qwq", "hermes", chatml=True),
    _family("Hermes 2 Pro/3", r"hermes[-_]?(2[-_]?pro|3)(?!\d)", "hermes", chatml=True),
    _family("Llama 4", r"llama[-_]?4(?!\d)", "llama4_pythonic", _example("llama4_pythonic")),
    _family("Llama 3.2", r"llama[-_]?3\.2(?!\d)", "llama3_json", _example("llama3.2_json")),
    _family("Llama 3.1/3.3", r"llama[-_]?3\.[13](?!\d)", "llama3_json", _example("llama3.1_json")),
    _family(
        "Mistral",
        r"mistral[-_]|mixtral|ministral|codestral|devstral|magistral",
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
    _family("DeepSeek-V3.1", r"deepseek[-_]?v3\.1(?!\d)", "deepseek_v31", _example("deepseekv31")),
    _family("DeepSeek-R1", r"deepseek[-_]?r1(?![\d.])", "deepseek_v3", _example("deepseekr1")),
    _family("DeepSeek-V3", r"deepseek[-_]?v3(?![\d.])", "deepseek_v3", _example("deepseekv3")),
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

# SGLang's parser for each vLLM parser of the family table (SGLang 0.5.x,
# function_call/parser_names.py and docs/advanced_features/tool_parser): the names that
# both the pinned image and later releases take (qwen25 and glm45 are aliases there).
# vLLM parsers not listed have no SGLang counterpart: tool calling stays off, saying so.
SGLANG_FROM_VLLM = {
    "hermes": "qwen25",
    "qwen3_xml": "qwen3_coder",
    "llama3_json": "llama3",
    "llama4_pythonic": "pythonic",
    "mistral": "mistral",
    "deepseek_v3": "deepseekv3",
    "deepseek_v31": "deepseekv31",
    "openai": "gpt-oss",
    "kimi_k2": "kimi_k2",
    "glm45": "glm45",
}
# Families whose vLLM parser is hermes but that are not Qwen (SGLang's hermes parser).
SGLANG_HERMES_FAMILIES = frozenset({"Hermes 2 Pro/3"})
SGLANG_PARSERS = frozenset(
    {
        "deepseekv3",
        "deepseekv31",
        "glm45",
        "gpt-oss",
        "hermes",
        "kimi_k2",
        "llama3",
        "mistral",
        "pythonic",
        "qwen25",
        "qwen3_coder",
        "step3",
    }
)

# Engines whose server reads `tools` with no flag at all.
BUILT_IN_ENGINES = {Engine.TGI, Engine.OLLAMA}
# Engines whose tool calling the operator cannot switch or see: the image (or the
# server's own model handling) decides. Status says so (Unknown) rather than guess.
IMAGE_DECIDES = {
    Engine.OPENAI_COMPATIBLE: "the server in spec.image decides; if it needs a flag for "
    "tool calls, put it in spec.server.args",
    Engine.TRANSFORMERS: "transformers serve renders tools with the model's chat template",
    Engine.OPENLLM: "openllm's bundled vLLM decides, from the model's packaging",
}
# Engines that take spec.toolCalling.parser, and what they call it.
PARSER_ENGINES = {
    Engine.VLLM: "--tool-call-parser",
    Engine.SGLANG: "--tool-call-parser",
    Engine.LLAMACPP_PYTHON: "--chat_format",
}
# Engines whose argparse takes any unambiguous prefix of a flag (allow_abbrev).
PREFIX_ENGINES = frozenset({Engine.LLAMACPP_PYTHON, Engine.SGLANG})
# The engines' own tool-calling flags, as extraArgs may carry them (see flag_name).
TOOL_FLAGS: dict[str, frozenset[str]] = {
    Engine.VLLM: frozenset(
        {
            "--enable-auto-tool-choice",
            "--no-enable-auto-tool-choice",
            "--tool-call-parser",
            "--tool-parser-plugin",
            "--chat-template",
        }
    ),
    Engine.LLAMACPP: frozenset({"--jinja", "--no-jinja"}),
    Engine.LLAMACPP_PYTHON: frozenset({"--chat_format"}),
    Engine.SGLANG: frozenset({"--tool-call-parser", "--chat-template"}),
}


@dataclass(frozen=True)
class ToolCallingPlan:
    """What the engine is started with for tool calling, and what status says of it.
    `enabled` None: it depends on the model, which the operator cannot see (Ollama)."""

    enabled: bool | None
    summary: str  # status.toolCalling: the parser, jinja, builtin, or off
    reason: str
    message: str
    args: list[str] = field(default_factory=list)


def flag_name(engine: str, arg: str, names: frozenset[str] | set[str]) -> str | None:
    """The flag of `names` that an extraArgs entry sets, as the engine's parser reads it:
    vLLM takes `_` for `-`; llama-cpp-python's argparse takes any unambiguous prefix."""
    name = arg.split("=", 1)[0]
    if not name.startswith("--"):
        return None
    if engine == Engine.VLLM:
        name = name.replace("_", "-")
    if name in names:
        return name
    if engine in PREFIX_ENGINES and len(name) > 2:
        prefixed = [n for n in names if n.startswith(name)]
        if prefixed:
            return min(prefixed)
    return None


def extra_tool_args(backend: LLMBackend) -> list[tuple[int, str]]:
    """(index, flag) of the tool-calling flags among spec.extraArgs."""
    spec = backend.spec
    names = TOOL_FLAGS.get(spec.engine, frozenset())
    found = []
    for i, arg in enumerate(spec.extra_args or []):
        flag = flag_name(spec.engine, arg, names)
        if flag:
            found.append((i, flag))
    return found


def _value(args: list[str], i: int) -> str | None:
    arg = args[i]
    if "=" in arg:
        return arg.split("=", 1)[1]
    return args[i + 1] if i + 1 < len(args) else None


def _from_extra_args(backend: LLMBackend, found: list[tuple[int, str]]) -> ToolCallingPlan:
    """Tool calling as the user's own extraArgs set it."""
    args = list(backend.spec.extra_args or [])
    engine = backend.spec.engine
    last = {flag: i for i, flag in found}
    listed = " ".join(args[i] for i, _ in found)
    summary: str | None = None
    if engine == Engine.VLLM:
        on = "--enable-auto-tool-choice" in last and "--tool-call-parser" in last
        on = on and last.get("--no-enable-auto-tool-choice", -1) < last["--enable-auto-tool-choice"]
        summary = _value(args, last["--tool-call-parser"]) if on else None
    elif engine == Engine.LLAMACPP:
        on = last.get("--jinja", -1) > last.get("--no-jinja", -1)
        summary = "jinja" if on else None
    elif engine == Engine.SGLANG:
        on = "--tool-call-parser" in last
        summary = _value(args, last["--tool-call-parser"]) if on else None
    else:
        summary = _value(args, last["--chat_format"])
        on = summary in LLAMACPP_PYTHON_FORMATS
    return ToolCallingPlan(
        on,
        (summary or "extraArgs") if on else "off",
        EXTRA_ARGS,
        f"left to spec.extraArgs ({listed}); spec.toolCalling sets it instead",
    )


def model_references(backend: LLMBackend) -> list[tuple[str, bool]]:
    """What a model family is recognised by, most telling first, and whether it is only
    the served name: the weights' own name (a repo without its organisation, a path
    without its claim, a URL's path), then, for a PVC only (whose path may say nothing,
    e.g. `model`), the served name. Never the served name for a named repo: anyone may
    serve anything under any name."""
    source = backend.spec.source
    if source.huggingface is not None:
        weights = source.huggingface.repo.rsplit("/", 1)[-1]
        if source.huggingface.file:
            weights += f" {source.huggingface.file}"
    elif source.pvc is not None:
        weights = source.pvc.path
    elif source.url is not None:
        weights = urlsplit(source.url).path.rsplit("/", 1)[-1]
    else:
        weights = str(source.ollama or source.openllm)
    refs = [(weights.lower(), False)]
    if source.pvc is not None:
        refs.append((backend.served_model_name.lower(), True))
    return refs


def family_of(backend: LLMBackend) -> tuple[Family, bool] | None:
    """The family, and whether only the served name told it."""
    for ref, served in model_references(backend):
        found = next((f for f in FAMILIES if f.pattern.search(ref)), None)
        if found:
            return found, served
    return None


def _off(reason: str, message: str) -> ToolCallingPlan:
    return ToolCallingPlan(False, "off", reason, message)


def plan(backend: LLMBackend) -> ToolCallingPlan:
    """The tool-calling decision for an engine backend (validation has refused the
    contradictions: a parser where the engine has none, `enabled: true` where it cannot,
    spec.toolCalling beside tool-calling extraArgs)."""
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
    found = extra_tool_args(backend)
    if found and asked is None:
        return _from_extra_args(backend, found)
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
    if engine == Engine.TGI:
        return ToolCallingPlan(
            True, "builtin", BUILT_IN, "tgi constrains tool calls with its grammar; no flag"
        )
    if engine == Engine.OLLAMA:
        return ToolCallingPlan(
            None,
            "builtin",
            MODEL_TEMPLATE,
            "ollama calls tools for models whose template supports them (the library marks "
            "them 'tools'); others answer 400 'does not support tools'",
        )
    if engine == Engine.LLAMACPP:
        return ToolCallingPlan(
            True,
            "jinja",
            CHAT_TEMPLATE,
            "llama-server --jinja: the GGUF's chat template renders tools and its tool-call "
            "format is parsed",
            ["--jinja"],
        )
    if engine in IMAGE_DECIDES:
        return ToolCallingPlan(None, "image", IMAGE, IMAGE_DECIDES[engine])
    family = family_of(backend)
    if engine == Engine.LLAMACPP_PYTHON:
        return _llamacpp_python(parser, family[0] if family else None)
    if engine == Engine.SGLANG:
        return _sglang(parser, family)
    return _vllm(backend, parser, family)


def _sglang(parser: str | None, family: tuple[Family, bool] | None) -> ToolCallingPlan:
    if parser:
        reason, why = PARSER_SET, "spec.toolCalling.parser"
    else:
        known = family[0] if family else None
        vllm_parser = known.vllm_parser if known else None
        parser = SGLANG_FROM_VLLM.get(vllm_parser or "")
        if known is not None and known.name in SGLANG_HERMES_FAMILIES:
            parser = "hermes"
        if known is None or parser is None:
            return _off(
                NO_PARSER_KNOWN,
                (
                    f"no SGLang tool-call parser is known for {known.name} models"
                    if known
                    else "SGLang needs a tool-call parser for the model's output format and "
                    "none is known for this model"
                )
                + "; set spec.toolCalling.parser (e.g. qwen25, llama3, mistral, pythonic) to "
                "switch it on",
            )
        reason = PARSER_FROM_MODEL
        why = f"model family {known.name}" + (
            " (from the served name)" if family and family[1] else ""
        )
    return ToolCallingPlan(
        True, parser, reason, f"--tool-call-parser {parser} ({why})", ["--tool-call-parser", parser]
    )


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


def _vllm(
    backend: LLMBackend, parser: str | None, family: tuple[Family, bool] | None
) -> ToolCallingPlan:
    spec = backend.spec
    asked = spec.tool_calling
    template = asked.chat_template if asked else None
    if parser:
        reason, why = PARSER_SET, "spec.toolCalling.parser"
    elif family and family[0].vllm_parser:
        known, served = family
        parser, reason = family[0].vllm_parser, PARSER_FROM_MODEL
        why = f"model family {known.name}" + (" (from the served name)" if served else "")
        # A family's template replaces the model's own for every chat: only where its
        # path is known (the pinned NVIDIA image) and the weights' own name told it.
        if template is None and not served and spec.image is None and spec.gpu_vendor == "nvidia":
            template = known.vllm_template
    else:
        what = (
            f"{family[0].name} models have no tool-call format"
            if family
            else "vLLM needs a tool-call parser for the model's output format and none is "
            f"known for {spec.source.describe()}"
        )
        return _off(
            NO_PARSER_KNOWN,
            f"{what}; set spec.toolCalling.parser (e.g. hermes, llama3_json, mistral, "
            "pythonic) to switch it on",
        )
    args = ["--enable-auto-tool-choice", "--tool-call-parser", parser]
    message = f"--tool-call-parser {parser} ({why})"
    if template:
        args += ["--chat-template", template]
        message += f" with the chat template {template}"
    return ToolCallingPlan(True, parser, reason, message, args)
