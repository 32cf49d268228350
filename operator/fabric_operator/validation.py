"""What the CRD schema cannot say: rules across fields and engines, checked before any write.

Each rule yields a Problem naming the field and what is allowed, so that the user reads in
`kubectl describe` exactly what to change.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes.utils.quantity import parse_quantity
from pydantic import ValidationError

from fabric_operator.api.backend import LLMBackend
from fabric_operator.api.rules import POD_FIELDS
from fabric_operator.api.v1alpha1 import Engine, LabelSelector
from fabric_operator.config import DEFAULT, OperatorConfig
from fabric_operator.render import openai_compatible, toolcalls, transformers
from fabric_operator.render.cache import claim_name
from fabric_operator.render.placement import accelerator, placement

DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
MAX_NAME = 63
MAX_ANNOTATIONS = 256 * 1024  # apimachinery's total size of an object's annotations

GPU_ENGINES = {Engine.VLLM, Engine.TGI, Engine.SGLANG}
SOURCES_BY_ENGINE = {
    Engine.VLLM: ("huggingface", "pvc"),
    Engine.TGI: ("huggingface", "pvc"),
    Engine.LLAMACPP: ("huggingface", "url", "pvc"),
    Engine.LLAMACPP_PYTHON: ("huggingface", "pvc"),
    Engine.OLLAMA: ("ollama",),
    Engine.SGLANG: ("huggingface", "pvc"),
    Engine.TRANSFORMERS: ("huggingface", "pvc"),
    Engine.OPENLLM: ("openllm",),
    Engine.OPENAI_COMPATIBLE: ("huggingface", "url", "pvc"),
}
OPTION_ENGINES = {
    "contextLength": (
        Engine.VLLM,
        Engine.TGI,
        Engine.LLAMACPP,
        Engine.LLAMACPP_PYTHON,
        Engine.OLLAMA,
        Engine.SGLANG,
    ),
    "tensorParallel": (Engine.VLLM, Engine.TGI, Engine.SGLANG),
    "gpuMemoryUtilization": (Engine.VLLM, Engine.SGLANG),
    "quantization": (Engine.VLLM, Engine.TGI, Engine.SGLANG),
    "dtype": (Engine.VLLM, Engine.TGI, Engine.SGLANG, Engine.TRANSFORMERS),
}
# text-generation-launcher's own value lists (launcher/src/main.rs, TGI 3.3).
TGI_DTYPES = ("float16", "bfloat16")
TGI_QUANTIZE = (
    "awq",
    "compressed-tensors",
    "eetq",
    "exl2",
    "gptq",
    "marlin",
    "bitsandbytes",
    "bitsandbytes-nf4",
    "bitsandbytes-fp4",
    "fp8",
)
# Flags the operator sets itself; in extraArgs they would clash or put a secret in the spec.
MANAGED_FLAGS = {
    "--host",
    "--hostname",
    "--port",
    "--api-key",
    "--api-key-file",
    "--served-model-name",
    "--alias",
    "-a",
    "--model",
    "-m",
    "--model-id",
    "--model_alias",
    "--api_key",
    "--hf_model_repo_id",
    "--model-path",
    "--model_path",
    "--force-model",
}
GGUF_ENGINES = (Engine.LLAMACPP, Engine.LLAMACPP_PYTHON)
# What the operator sets in an openai-compatible container (spec.server.apiKeyEnv may not
# name one: two entries of a name make the API server refuse the Deployment).
SERVER_OWN_ENV = frozenset(
    {*openai_compatible.MANAGED_ENV, "HF_HOME", "HF_TOKEN", "HOME", "USER", "LOGNAME"}
)
# Engines without a key of their own: the gateway checks keys in front of them.
NO_KEY_ENGINES = frozenset({Engine.OLLAMA, Engine.OPENLLM, Engine.TRANSFORMERS})
# Engines with no image the operator could default to.
IMAGE_REQUIRED = {
    Engine.TRANSFORMERS: "Hugging Face publishes no image for `transformers serve`; name one "
    "with transformers[serving] >= 5.10 and torch (hack/images/transformers builds a CPU one)",
    Engine.OPENLLM: "OpenLLM publishes no image for `openllm serve`; name one with openllm "
    "installed (and, without internet access, its catalogue and environment built in)",
}
# Engines whose image has huggingface_hub for spec.cache.preload.
PRELOAD_ENGINES = frozenset({Engine.VLLM, Engine.TGI, Engine.SGLANG, Engine.TRANSFORMERS})
SERVER_NAMES = {Engine.LLAMACPP: "llama-server", Engine.LLAMACPP_PYTHON: "llama-cpp-python"}
# llama-cpp-python's own settings the operator sets (as flags or variables), and its config
# file, which would make it ignore them all.
PY_MANAGED_FLAGS = {
    "--model",
    "--model_alias",
    "--host",
    "--port",
    "--api_key",
    "--hf_model_repo_id",
    "--config_file",
}
PY_MANAGED_ENV = {f.removeprefix("--") for f in PY_MANAGED_FLAGS} | {"chat_format"}
# Env the operator sets from Secrets; a literal in spec.env would override (and leak) them.
MANAGED_ENV = {
    "HF_TOKEN",
    "VLLM_API_KEY",
    "API_KEY",
    "LLAMA_API_KEY",
    "OLLAMA_HOST",
    "SGLANG_API_KEY",
    *openai_compatible.MANAGED_ENV,
}


@dataclass(frozen=True)
class Problem:
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def _engines(engines: tuple[str, ...]) -> str:
    return ", ".join(engines)


def schema_problems(error: ValidationError) -> list[Problem]:
    """Pydantic's errors as Problems with spec paths (for a CRD older than the operator)."""
    out = []
    for err in error.errors():
        path = ".".join(str(p) for p in ("spec", *err["loc"]))
        out.append(Problem(path, err["msg"]))
    return out


def check_name(name: str) -> Iterator[Problem]:
    if len(name) > MAX_NAME or not DNS_1035_LABEL.fullmatch(name):
        yield Problem(
            "metadata.name",
            f"{name[:80]!r} names the Service and the pod labels, so it must be a DNS-1035 "
            f"label: at most {MAX_NAME} lowercase letters, digits and '-', starting with a "
            "letter",
        )


def check_remote(backend: LLMBackend) -> Iterator[Problem]:
    """engine remote goes with spec.remote and nothing that shapes pods."""
    spec = backend.spec
    if spec.engine != Engine.REMOTE:
        if spec.remote is not None:
            yield Problem("spec.remote", f"is for engine remote, not {spec.engine}")
        return
    if spec.remote is None:
        yield Problem("spec.model", "engine remote takes spec.remote, not a model source")
        return
    given = spec.model_dump(by_alias=True, exclude_unset=True)
    for field in POD_FIELDS:
        if field in given:
            yield Problem(f"spec.{field}", "a remote backend runs no pods; remove it")
    yield from check_remote_provider(backend)


# Providers that answer nothing without the credential apiKeySecretRef names (Provider).
_CREDENTIAL = {
    "bedrock": "an Amazon Bedrock API key",
    "vertex": "a Google service-account JSON key (the gateway mints access tokens from it)",
}


def check_remote_provider(backend: LLMBackend) -> Iterator[Problem]:
    """Amazon Bedrock and Vertex AI refuse every request without their credential: a
    backend of theirs without apiKeySecretRef could never answer."""
    remote, ref = backend.spec.remote, backend.spec.api_key_secret_ref
    if remote is not None and remote.provider in _CREDENTIAL and ref is None:
        yield Problem(
            "spec.apiKeySecretRef",
            f"provider {remote.provider} needs a Secret holding {_CREDENTIAL[remote.provider]}",
        )


def check_remote_host(backend: LLMBackend, config: OperatorConfig) -> Iterator[Problem]:
    """A remote backend calls only a host the platform admin allows (and is sent the
    namespace's Secret named in apiKeySecretRef): anything else would let whoever may
    create LLMBackends send a Secret's value to a server of theirs, or make the gateway
    call another team's in-cluster Service."""
    remote = backend.spec.remote
    if backend.spec.engine != Engine.REMOTE or remote is None:
        return
    why = config.remote().refusal(remote.base_url)
    if why is not None:
        yield Problem("spec.remote.baseURL", why)


def check_fallback(backend: LLMBackend) -> Iterator[Problem]:
    for i, name in enumerate(backend.spec.fallback or []):
        if name == backend.name:
            yield Problem(f"spec.fallback[{i}]", "a backend cannot fall back to itself")
    if len(set(backend.spec.fallback or [])) != len(backend.spec.fallback or []):
        yield Problem("spec.fallback", "lists a backend more than once")


def check_autoscaling(backend: LLMBackend) -> Iterator[Problem]:
    """What the schema cannot say about spec.autoscaling: rules across its fields. With it
    set, spec.replicas belongs to the autoscaler (so a replicas outside the bounds is not
    an error: the autoscaler moves it inside)."""
    spec = backend.spec
    scaling = spec.autoscaling
    if scaling is None or spec.engine == Engine.REMOTE:
        return  # a remote backend's autoscaling is refused by check_remote
    where = "spec.autoscaling"
    if scaling.min_replicas > scaling.max_replicas:
        yield Problem(
            f"{where}.minReplicas",
            f"{scaling.min_replicas} is more than maxReplicas ({scaling.max_replicas})",
        )
    after = scaling.fallback_after_seconds
    if after is not None and not spec.fallback:
        yield Problem(
            f"{where}.fallbackAfterSeconds",
            "sends held requests to spec.fallback, which is empty; list a backend there "
            "or remove fallbackAfterSeconds",
        )


def check_spec(backend: LLMBackend) -> Iterator[Problem]:
    spec = backend.spec
    engine = spec.engine
    gpus = spec.gpu_count
    yield from check_fallback(backend)
    yield from check_autoscaling(backend)
    if engine == Engine.REMOTE or spec.remote is not None:
        yield from check_remote(backend)
        return

    if engine in GPU_ENGINES and gpus < 1:
        yield Problem(
            "spec.resources.gpu.count",
            f"engine {engine} needs at least 1 GPU; for a CPU backend use engine "
            "llamacpp, llamacpp-python or ollama",
        )
    if engine == Engine.LLAMACPP_PYTHON and gpus and spec.image is None:
        yield Problem(
            "spec.image",
            "llama-cpp-python publishes no GPU image; name one built with CUDA or ROCm "
            "(CMAKE_ARGS=-DGGML_CUDA=on) that runs `python3 -m llama_cpp.server`",
        )

    allowed = SOURCES_BY_ENGINE[engine]
    source = spec.source.kind
    if source not in allowed:
        yield Problem(
            f"spec.model.{source}",
            f"engine {engine} cannot load a {source} model source; use "
            f"{' or '.join('spec.model.' + s for s in allowed)}",
        )
    hf = spec.source.huggingface
    if hf and hf.file and engine not in GGUF_ENGINES:
        yield Problem(
            "spec.model.huggingface.file",
            f"a GGUF file is for engines llamacpp and llamacpp-python, not {engine}",
        )
    if hf and hf.revision and engine in GGUF_ENGINES:
        yield Problem(
            "spec.model.huggingface.revision",
            f"{SERVER_NAMES[engine]} loads from the default branch; pin the file with "
            "spec.model.huggingface.file"
            + (" or use spec.model.url" if engine == Engine.LLAMACPP else ""),
        )
    if hf and engine == Engine.LLAMACPP_PYTHON and spec.image is None:
        yield Problem(
            "spec.model.huggingface",
            "the pinned llama-cpp-python image cannot download (it has no huggingface_hub); "
            "put the GGUF on a PVC (spec.model.pvc) or name an image that has it",
        )
    if hf and not hf.file and engine == Engine.LLAMACPP_PYTHON:
        yield Problem(
            "spec.model.huggingface.file",
            "llamacpp-python needs the GGUF file (or a glob such as *q4_k_m.gguf) to load "
            "from the repository",
        )

    options = spec.options.model_dump(by_alias=True, exclude_none=True)
    for option, engines in OPTION_ENGINES.items():
        if option in options and engine not in engines:
            yield Problem(
                f"spec.engineOptions.{option}",
                f"not supported by engine {engine} (only {_engines(engines)})",
            )
    tp = spec.options.tensor_parallel
    if tp is not None and engine in GPU_ENGINES and tp > max(gpus, 1):
        yield Problem(
            "spec.engineOptions.tensorParallel",
            f"{tp} is more than the {gpus} GPU(s) of spec.resources.gpu.count; "
            "it must be at most the GPU count",
        )
    if tp is not None and engine in GPU_ENGINES and tp <= gpus and gpus % tp:
        yield Problem(
            "spec.engineOptions.tensorParallel",
            f"{tp} must divide spec.resources.gpu.count ({gpus})",
        )

    yield from check_tgi(backend)
    yield from check_server(backend)
    yield from check_cache(backend)
    yield from check_pod_security(backend)
    yield from check_image_and_key(backend)

    if engine == Engine.OLLAMA:
        if spec.hf_token_secret_ref:
            yield Problem(
                "spec.hfTokenSecretRef",
                "ollama pulls from its own library and does not use a Hugging Face token",
            )
        if spec.extra_args:
            yield Problem(
                "spec.extraArgs",
                "`ollama serve` takes no arguments; configure "
                "it with OLLAMA_* variables in spec.env",
            )

    yield from check_tool_calling(backend)
    yield from check_overrides(backend)


def check_tgi(backend: LLMBackend) -> Iterator[Problem]:
    """text-generation-launcher's own value lists."""
    if backend.spec.engine != Engine.TGI:
        return
    spec = backend.spec
    opts = spec.options
    if opts.dtype is not None and opts.dtype not in TGI_DTYPES:
        yield Problem(
            "spec.engineOptions.dtype",
            f"tgi accepts {' or '.join(TGI_DTYPES)}, not {opts.dtype}",
        )
    if opts.quantization is not None and opts.quantization not in TGI_QUANTIZE:
        yield Problem(
            "spec.engineOptions.quantization",
            f"tgi does not know {opts.quantization!r}; it accepts {', '.join(TGI_QUANTIZE)}",
        )
    if opts.dtype is not None and opts.quantization is not None:
        yield Problem(
            "spec.engineOptions.dtype",
            "tgi cannot combine dtype with quantization; set one of them",
        )


def check_image_and_key(backend: LLMBackend) -> Iterator[Problem]:
    """What each engine's image can do: take a key, run as another user, exist at all."""
    spec = backend.spec
    engine = spec.engine
    if engine in NO_KEY_ENGINES and spec.api_key_secret_ref:
        yield Problem(
            "spec.apiKeySecretRef",
            f"{engine} has no built-in API key; leave it unset and put the fabric "
            "gateway (which checks keys) in front of this backend",
        )
    if engine in IMAGE_REQUIRED and spec.image is None:
        yield Problem("spec.image", IMAGE_REQUIRED[engine])
    if engine == Engine.TRANSFORMERS:
        why = transformers.served_name_error(backend.served_model_name)
        if why is not None:
            yield Problem("spec.servedModelName", why)
    if engine == Engine.SGLANG and spec.gpu_vendor == "amd" and spec.image is None:
        yield Problem(
            "spec.image",
            "SGLang names no ROCm image of its own; name one built for your AMD GPUs",
        )
    wanted = spec.pod_security
    if (
        wanted is not None
        and wanted.profile == "Restricted"
        and engine == Engine.TGI
        and spec.image is None
    ):
        yield Problem(
            "spec.podSecurity.profile",
            "the pinned tgi image cannot run as another user than root (its Python is "
            "under /root: huggingface/text-generation-inference#3082); use Baseline or "
            "name an image that can",
        )


def check_server(backend: LLMBackend) -> Iterator[Problem]:
    """spec.server describes an openai-compatible image, and only that."""
    spec = backend.spec
    if spec.engine != Engine.OPENAI_COMPATIBLE:
        if spec.server is not None:
            yield Problem(
                "spec.server",
                f"is for engine openai-compatible; {spec.engine} is run as the operator knows",
            )
        return
    if spec.server is None:
        yield Problem(
            "spec.server",
            "engine openai-compatible needs spec.server: at least the port the image listens "
            "on (and its command/args, naming the model as $(FABRIC_MODEL))",
        )
    if spec.image is None:
        yield Problem("spec.image", "engine openai-compatible runs the image named here; set it")
    key_env = spec.server.api_key_env if spec.server else None
    if key_env is not None and key_env in SERVER_OWN_ENV:
        yield Problem(
            "spec.server.apiKeyEnv",
            f"{key_env} is a variable the operator sets itself; name the server's key "
            "variable (the key is also in FABRIC_API_KEY)",
        )
    # The kubelet expands $(VAR) in the command too, and a command that fails to start is
    # quoted in the pod's status (and from there in the backend's): never the key there.
    secret_vars = {openai_compatible.KEY_ENV, "HF_TOKEN", *([key_env] if key_env else [])}
    for i, word in enumerate((spec.server.command or []) if spec.server else []):
        if any(f"$({name})" in word for name in secret_vars):
            yield Problem(
                f"spec.server.command[{i}]",
                "names a Secret-backed variable; pass the key in spec.server.args or let "
                "the server read it from its variable",
            )
    for i, env in enumerate(spec.env or []):
        if key_env is not None and env.name == key_env and spec.api_key_secret_ref:
            yield Problem(
                f"spec.env[{i}].name",
                f"{env.name} carries the key from spec.apiKeySecretRef (spec.server.apiKeyEnv);"
                " it cannot be set here too",
            )
    if spec.tool_calling is not None and (spec.tool_calling.parser or spec.tool_calling.enabled):
        yield Problem(
            "spec.toolCalling",
            "the operator cannot switch tool calling on in an image it does not know; put the "
            "server's own flags in spec.server.args",
        )
    if spec.model is not None and spec.model.huggingface and spec.model.huggingface.file:
        yield Problem(
            "spec.model.huggingface.file",
            "openai-compatible hands the server the repository ($(FABRIC_MODEL)); name the "
            "file in spec.server.args",
        )


def check_cache(backend: LLMBackend) -> Iterator[Problem]:
    """spec.cache: a claim needs a size; preload needs a Hub model and an image with its
    downloader; the backend's own claim takes the backend's name."""
    spec = backend.spec
    cache = spec.cache
    if cache is None:
        return
    claim = cache.persistent_volume_claim
    if claim is not None and cache.size is None:
        yield Problem(
            "spec.cache.size", "is required with persistentVolumeClaim (the claim's size)"
        )
    if cache.size is not None:
        try:
            if parse_quantity(cache.size) <= 0:  # type: ignore[no-untyped-call]
                yield Problem("spec.cache.size", "must be more than 0")
        except (ValueError, ArithmeticError):
            yield Problem("spec.cache.size", "is not a valid quantity")
    if claim is not None and claim.access_mode == "ReadWriteOncePod":
        most = spec.autoscaling.max_replicas if spec.autoscaling else spec.replicas
        if claim.shared or most > 1:
            yield Problem(
                "spec.cache.persistentVolumeClaim.accessMode",
                "ReadWriteOncePod lets one pod mount the claim: "
                + ("a shared claim serves several backends" if claim.shared else f"{most} replicas")
                + "; use ReadWriteOnce (pods on one node) or ReadWriteMany",
            )
    pvc = spec.model.pvc if spec.model else None
    if claim is not None and pvc is not None and pvc.claim_name == claim_name(backend):
        yield Problem(
            "spec.cache.persistentVolumeClaim",
            f"the cache claim would be named {pvc.claim_name!r}, the claim the model is read "
            "from; rename one of them or set shared: true",
        )
    if cache.preload:
        if spec.model is None or spec.model.huggingface is None:
            yield Problem(
                "spec.cache.preload",
                "downloads a Hugging Face model; this backend's model comes from "
                f"{spec.model.kind if spec.model else 'nowhere'}"
                + (
                    " (ollama already pulls before it serves)"
                    if spec.engine == Engine.OLLAMA
                    else ""
                ),
            )
        elif spec.engine not in PRELOAD_ENGINES:
            yield Problem(
                "spec.cache.preload",
                f"{spec.engine}'s image has no downloader the operator can run; it downloads "
                "as it starts (status.lastStart shows how long)",
            )


def check_pod_security(backend: LLMBackend) -> Iterator[Problem]:
    wanted = backend.spec.pod_security
    if wanted is not None and wanted.profile == "Baseline" and wanted.run_as_user is not None:
        yield Problem(
            "spec.podSecurity.runAsUser",
            "is for profile Restricted; Baseline runs as the image's own user",
        )


def check_tool_calling(backend: LLMBackend) -> Iterator[Problem]:
    """spec.toolCalling: what the engine can do with it, and what it contradicts."""
    spec = backend.spec
    asked = spec.tool_calling
    engine = spec.engine
    where = "spec.toolCalling"
    if asked is not None:
        if asked.parser and engine not in toolcalls.PARSER_ENGINES:
            yield Problem(
                f"{where}.parser",
                f"{engine} has no tool-call parser to choose ("
                + (
                    "it reads tools through the GGUF's chat template with --jinja"
                    if engine == Engine.LLAMACPP
                    else "it reads tools by itself"
                )
                + "); remove it",
            )
        known = {
            Engine.VLLM: toolcalls.VLLM_PARSERS,
            Engine.LLAMACPP_PYTHON: toolcalls.LLAMACPP_PYTHON_FORMATS,
            Engine.SGLANG: toolcalls.SGLANG_PARSERS,
        }.get(engine)
        # A custom image may be a newer engine with parsers this table does not know.
        if asked.parser and known and spec.image is None and asked.parser not in known:
            yield Problem(
                f"{where}.parser",
                f"{asked.parser!r} is not a {toolcalls.PARSER_ENGINES[engine]} of the pinned "
                f"{engine} image; it knows {', '.join(sorted(known))}",
            )
        if asked.chat_template and engine != Engine.VLLM:
            yield Problem(f"{where}.chatTemplate", f"is for engine vllm, not {engine}")
        if asked.enabled is False:
            if engine in toolcalls.BUILT_IN_ENGINES or engine in toolcalls.IMAGE_DECIDES:
                yield Problem(
                    f"{where}.enabled",
                    f"{engine} has no switch the operator can turn tool calling off with; "
                    "remove it",
                )
            for name in ("parser", "chatTemplate"):
                if getattr(asked, "chat_template" if name == "chatTemplate" else name):
                    yield Problem(f"{where}.{name}", "is set while tool calling is disabled")
        template = asked.chat_template or ""
        if template.startswith(("/proc/", "/sys/", "/dev/")):
            yield Problem(
                f"{where}.chatTemplate",
                "must be a template file (in the image or on the model's PVC), not under "
                "/proc, /sys or /dev: its text becomes part of every prompt",
            )
        for i, flag in toolcalls.extra_tool_args(backend):
            yield Problem(
                f"spec.extraArgs[{i}]",
                f"{flag} sets tool calling, as spec.toolCalling does; keep one of them",
            )
    plan = toolcalls.plan(backend)
    if asked is not None and asked.enabled and plan.enabled is False:
        yield Problem(f"{where}.enabled", f"true, but tool calling cannot be on: {plan.message}")
    if (
        asked is not None
        and asked.chat_template
        and asked.enabled is not False
        and not plan.enabled
    ):
        yield Problem(
            f"{where}.chatTemplate",
            "is used only with a tool-call parser, and none is known for this model; set "
            "spec.toolCalling.parser too",
        )


def check_overrides(backend: LLMBackend) -> Iterator[Problem]:
    """extraArgs and env may add to the engine's settings, not take the operator's."""
    spec = backend.spec
    # As each engine's parser reads a flag: vLLM takes `_` for `-`, llama-cpp-python any
    # unambiguous prefix (so `--api_k` is `--api_key`).
    managed = (
        MANAGED_FLAGS | PY_MANAGED_FLAGS if spec.engine == Engine.LLAMACPP_PYTHON else MANAGED_FLAGS
    )
    if spec.engine == Engine.OPENAI_COMPATIBLE:
        managed = set()  # the user writes the whole command line
    for i, arg in enumerate(spec.extra_args or []):
        name = toolcalls.flag_name(spec.engine, arg, managed) or arg.split("=", 1)[0]
        if name in managed:
            hint = (
                " (it would put the key in the Deployment; use spec.apiKeySecretRef)"
                if "api" in name
                else ""
            )
            yield Problem(
                f"spec.extraArgs[{i}]",
                f"{name} is set by the operator and cannot be overridden{hint}",
            )
    seen: set[str] = set()
    for i, env in enumerate(spec.env or []):
        if env.name in seen:
            yield Problem(f"spec.env[{i}].name", f"{env.name} is listed twice")
        seen.add(env.name)
        # llama-cpp-python reads its settings from variables of any case.
        if spec.engine == Engine.LLAMACPP_PYTHON and env.name.lower() in PY_MANAGED_ENV:
            yield Problem(
                f"spec.env[{i}].name",
                f"{env.name} would set llama-cpp-python's {env.name.lower()}, which the "
                "operator sets (or which would make it ignore the operator's settings)",
            )
        if env.name in MANAGED_ENV:
            yield Problem(
                f"spec.env[{i}].name",
                f"{env.name} is set by the operator (from a Secret reference or "
                "its own settings) and cannot be overridden",
            )
        if env.value is not None and env.value_from is not None:
            yield Problem(f"spec.env[{i}]", "set value or valueFrom, not both")


def _qualified_name_error(key: str) -> str | None:
    """Kubernetes' rule for label and annotation keys: [prefix/]name."""
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not DNS_1123_SUBDOMAIN.fullmatch(prefix)):
        return f"prefix {prefix[:80]!r} must be a DNS subdomain (lowercase, at most 253)"
    if not name or len(name) > 63 or not QUALIFIED_NAME.fullmatch(name):
        return (
            f"name part {name[:80]!r} must be at most 63 letters, digits, '-', '_' or "
            "'.', starting and ending with a letter or digit"
        )
    return None


def _object_name_error(name: str) -> str | None:
    if len(name) > 253 or not DNS_1123_SUBDOMAIN.fullmatch(name):
        return f"{name[:80]!r} is not a valid object name (lowercase DNS subdomain)"
    return None


def check_kubernetes_syntax(backend: LLMBackend) -> Iterator[Problem]:
    """What the API server would refuse in the children, caught before anything is applied
    (so a refusal can never leave one child applied and the other not)."""
    spec = backend.spec
    annotations = spec.service.annotations if spec.service else None
    for key in annotations or {}:
        if err := _qualified_name_error(key):
            yield Problem(f"spec.service.annotations[{key[:80]!r}]", err)
    for key, value in (spec.node_selector or {}).items():
        if err := _qualified_name_error(key):
            yield Problem(f"spec.nodeSelector[{key[:80]!r}]", err)
        if len(value) > 63 or not LABEL_VALUE.fullmatch(value):
            yield Problem(
                f"spec.nodeSelector[{key[:80]!r}]",
                f"value {value[:80]!r} is not a valid label value",
            )
    for i, tol in enumerate(spec.tolerations or []):
        if tol.operator == "Exists" and tol.value:
            yield Problem(f"spec.tolerations[{i}].value", "must be empty when operator is Exists")
        if not tol.key and tol.operator != "Exists":
            yield Problem(
                f"spec.tolerations[{i}].operator",
                "must be Exists when key is empty (tolerate every taint)",
            )
        if tol.key and (err := _qualified_name_error(tol.key)):
            yield Problem(f"spec.tolerations[{i}].key", err)
        if tol.toleration_seconds is not None and tol.effect != "NoExecute":
            yield Problem(
                f"spec.tolerations[{i}].tolerationSeconds", "only applies to effect NoExecute"
            )
    # The API server's limit is in bytes of UTF-8, not in characters.
    size = sum(len(k.encode()) + len(v.encode()) for k, v in (annotations or {}).items())
    if size > MAX_ANNOTATIONS:
        yield Problem("spec.service.annotations", "more than 256 KiB in total")
    pull = [s.name for s in spec.image_pull_secrets or []]
    if len(set(pull)) != len(pull):
        yield Problem("spec.imagePullSecrets", "names a Secret more than once")
    for i, arg in enumerate(spec.extra_args or []):
        if "\x00" in arg:
            yield Problem(f"spec.extraArgs[{i}]", "contains a NUL character")
    for i, env in enumerate(spec.env or []):
        if env.value and "\x00" in env.value:
            yield Problem(f"spec.env[{i}].value", "contains a NUL character")
    yield from _resource_problems(backend)
    names = [("spec.priorityClassName", spec.priority_class_name)]
    names += [
        (f"spec.imagePullSecrets[{i}].name", s.name)
        for i, s in enumerate(spec.image_pull_secrets or [])
    ]
    if spec.model is not None and spec.model.pvc:
        names.append(("spec.model.pvc.claimName", spec.model.pvc.claim_name))
    for field, ref in (
        ("spec.apiKeySecretRef", spec.api_key_secret_ref),
        ("spec.hfTokenSecretRef", spec.hf_token_secret_ref),
    ):
        if ref is not None:
            names.append((f"{field}.name", ref.name))
            if not SECRET_KEY.fullmatch(ref.key):
                yield Problem(
                    f"{field}.key",
                    f"{ref.key[:80]!r} is not a valid Secret key (letters, digits, '-', '_', '.')",
                )
    for field, name in names:
        if name is not None and (err := _object_name_error(name)):
            yield Problem(field, err)


def _selector_problems(field: str, selector: LabelSelector | None) -> Iterator[Problem]:
    if selector is None:
        return
    for key, value in (selector.match_labels or {}).items():
        if err := _qualified_name_error(key):
            yield Problem(f"{field}.matchLabels[{key[:80]!r}]", err)
        if len(value) > 63 or not LABEL_VALUE.fullmatch(value):
            yield Problem(
                f"{field}.matchLabels[{key[:80]!r}]", f"{value[:80]!r} is not a valid label value"
            )
    for i, req in enumerate(selector.match_expressions or []):
        where = f"{field}.matchExpressions[{i}]"
        if err := _qualified_name_error(req.key):
            yield Problem(f"{where}.key", err)
        if req.operator in ("In", "NotIn") and not req.values:
            yield Problem(f"{where}.values", f"operator {req.operator} needs values")
        if req.operator in ("Exists", "DoesNotExist") and req.values:
            yield Problem(f"{where}.values", f"must be empty for operator {req.operator}")


def _resource_problems(backend: LLMBackend) -> Iterator[Problem]:
    resources = backend.spec.resources
    if resources is None or resources.requests is None or resources.limits is None:
        return
    for name in ("cpu", "memory"):
        request, limit = getattr(resources.requests, name), getattr(resources.limits, name)
        if request is None or limit is None:
            continue
        try:
            above = parse_quantity(request) > parse_quantity(limit)  # type: ignore[no-untyped-call]
        except (ValueError, ArithmeticError):
            yield Problem(f"spec.resources.{name}", "is not a valid quantity")
            continue
        if above:
            yield Problem(
                "spec.resources",
                f"requests.{name} {request} is above limits.{name} {limit}",
            )


def check_network_policy(backend: LLMBackend) -> Iterator[Problem]:
    """What the API server would refuse in the NetworkPolicy (applied before the others)."""
    wanted = backend.spec.network_policy
    for i, peer in enumerate((wanted.from_ if wanted else None) or []):
        field = f"spec.networkPolicy.from[{i}]"
        if peer.ip_block is not None and (peer.namespace_selector or peer.pod_selector):
            yield Problem(field, "ipBlock cannot be combined with namespaceSelector/podSelector")
        if not (peer.ip_block or peer.namespace_selector or peer.pod_selector):
            yield Problem(field, "needs namespaceSelector, podSelector or ipBlock")
        yield from _selector_problems(f"{field}.namespaceSelector", peer.namespace_selector)
        yield from _selector_problems(f"{field}.podSelector", peer.pod_selector)
        if peer.ip_block is not None:
            try:
                net = ipaddress.ip_network(peer.ip_block.cidr, strict=False)
                for j, cidr in enumerate(peer.ip_block.except_ or []):
                    inner = ipaddress.ip_network(cidr, strict=False)
                    if inner.version != net.version or not inner.subnet_of(net):  # type: ignore[arg-type]
                        yield Problem(f"{field}.ipBlock.except[{j}]", f"not inside {net}")
            except ValueError as err:
                yield Problem(f"{field}.ipBlock", f"not a CIDR: {err}")


def check_placement(backend: LLMBackend, config: OperatorConfig) -> Iterator[Problem]:
    """The GPU type must be one the operator knows, of the vendor asked for."""
    spec = backend.spec
    gpu_type = spec.gpu_type
    if gpu_type is not None:
        pool = accelerator(backend, config)
        if pool is None:
            known = ", ".join(sorted(config.catalogue())) or "none configured"
            yield Problem(
                "spec.resources.gpu.type",
                f"unknown GPU type {gpu_type!r}; this operator knows: {known}",
            )
        else:
            if pool.vendor != spec.gpu_vendor:
                yield Problem(
                    "spec.resources.gpu.vendor",
                    f"{gpu_type} is an {pool.vendor} GPU; set vendor: {pool.vendor}",
                )
            if not spec.gpu_count:
                yield Problem(
                    "spec.resources.gpu.count", f"gpu.type {gpu_type} needs a count of at least 1"
                )
    for key in placement(backend, config).conflicts:
        yield Problem(
            f"spec.nodeSelector[{key!r}]",
            f"contradicts the node pool of GPU type {gpu_type}; remove it or change gpu.type",
        )
    strategy = spec.strategy
    if (
        strategy is not None
        and strategy.type == "Recreate"
        and (strategy.max_surge is not None or strategy.max_unavailable is not None)
    ):
        yield Problem(
            "spec.strategy", "maxSurge and maxUnavailable apply to RollingUpdate, not Recreate"
        )
    if strategy is not None:
        yield from _rollout_problems(strategy.max_surge, strategy.max_unavailable)


def _rollout_problems(surge: int | str | None, unavailable: int | str | None) -> Iterator[Problem]:
    """apps/v1's own rules for a RollingUpdate, checked before anything is applied."""
    for name, value in (("maxSurge", surge), ("maxUnavailable", unavailable)):
        if isinstance(value, int) and value < 0:
            yield Problem(f"spec.strategy.{name}", "must not be negative")
    if isinstance(unavailable, str) and unavailable.endswith("%") and int(unavailable[:-1]) > 100:
        yield Problem("spec.strategy.maxUnavailable", "must not be more than 100%")
    if surge in (0, "0%") and unavailable in (0, "0%"):
        yield Problem("spec.strategy", "maxSurge and maxUnavailable cannot both be 0")


def validate(
    obj: Mapping[str, Any], config: OperatorConfig = DEFAULT
) -> tuple[LLMBackend | None, list[Problem]]:
    """Parse and check a whole LLMBackend object; the backend is None if it cannot parse."""
    meta = obj.get("metadata") or {}
    problems = list(check_name(str(meta.get("name", ""))))
    try:
        backend = LLMBackend.from_manifest(obj)
    except ValidationError as err:
        return None, problems + schema_problems(err)
    problems += check_spec(backend)
    problems += check_kubernetes_syntax(backend)
    problems += check_network_policy(backend)
    if backend.spec.remote is None:
        problems += check_placement(backend, config)
    else:
        problems += check_remote_host(backend, config)
    return backend, problems


def referenced_secrets(backend: LLMBackend) -> list[tuple[str, str, str]]:
    """(field, secret name, key) of each Secret the pods will read."""
    refs = []
    if backend.spec.api_key_secret_ref:
        ref = backend.spec.api_key_secret_ref
        refs.append(("spec.apiKeySecretRef", ref.name, ref.key))
    if backend.spec.hf_token_secret_ref:
        ref = backend.spec.hf_token_secret_ref
        refs.append(("spec.hfTokenSecretRef", ref.name, ref.key))
    return refs
