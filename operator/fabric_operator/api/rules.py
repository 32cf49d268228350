"""Cross-field rules the API server checks at `kubectl apply` (CEL, x-kubernetes-validations).

Kubernetes 1.25 and later refuse a spec that breaks one, with the message below, before
the operator sees it; older servers ignore them, and the operator's own validation (the
same rules and more, surfaced as InvalidSpec) stays for them. A rule here must never refuse
what the operator accepts: tests/unit/test_cel_rules.py evaluates each one with a CEL
implementation against specs on both sides. Only `rule` and `message` are used: the
fields later servers added (fieldPath, reason) would be unknown to 1.25-1.27.
"""

from __future__ import annotations

from typing import Any

# Fields that shape pods: meaningless for a remote backend, so refused rather than ignored.
POD_FIELDS = (
    "image",
    "imagePullPolicy",
    "imagePullSecrets",
    "engineOptions",
    "extraArgs",
    "env",
    "hfTokenSecretRef",
    "resources",
    "nodeSelector",
    "tolerations",
    "affinity",
    "priorityClassName",
    "service",
    "strategy",
    "networkPolicy",
    "autoscaling",
    "routing",
    "toolCalling",
    "server",
    "cache",
    "podSecurity",
)


def _rule(rule: str, message: str) -> dict[str, str]:
    return {"rule": rule, "message": message}


def _not_remote_fields() -> str:
    return " && ".join(f"!has(self.{f})" for f in POD_FIELDS)


SPEC_RULES: list[dict[str, str]] = [
    _rule(
        "self.engine == 'remote' ? has(self.remote) : has(self.model)",
        "engine remote takes spec.remote; every other engine takes spec.model",
    ),
    _rule(
        f"self.engine != 'remote' || ({_not_remote_fields()})",
        "a remote backend runs no pods: remove the fields that shape them "
        f"({', '.join(POD_FIELDS)})",
    ),
    _rule(
        "!has(self.model) || !has(self.model.url) || self.engine in ['llamacpp', "
        "'openai-compatible']",
        "spec.model.url (a GGUF URL) is for engines llamacpp and openai-compatible",
    ),
    _rule(
        "!has(self.model) || has(self.model.openllm) == (self.engine == 'openllm')",
        "engine openllm takes spec.model.openllm (a catalogue tag), and spec.model.openllm is "
        "for engine openllm",
    ),
    _rule(
        "has(self.server) == (self.engine == 'openai-compatible')",
        "engine openai-compatible needs spec.server (its port, command and args), and "
        "spec.server is for engine openai-compatible",
    ),
    _rule(
        "!(self.engine in ['openai-compatible', 'openllm']) || has(self.image)",
        "engines openai-compatible and openllm run the image named in spec.image; set it",
    ),
    _rule(
        "!has(self.cache) || !has(self.cache.persistentVolumeClaim) || has(self.cache.size)",
        "spec.cache.size is required with spec.cache.persistentVolumeClaim (the claim's size)",
    ),
    _rule(
        "!has(self.cache) || !has(self.cache.preload) || !self.cache.preload"
        " || (has(self.model) && has(self.model.huggingface)"
        " && self.engine in ['vllm', 'tgi', 'sglang', 'transformers'])",
        "spec.cache.preload downloads a Hugging Face model (spec.model.huggingface) for "
        "engines vllm, tgi, sglang and transformers",
    ),
    _rule(
        "!has(self.podSecurity) || !has(self.podSecurity.runAsUser)"
        " || !has(self.podSecurity.profile) || self.podSecurity.profile == 'Restricted'",
        "spec.podSecurity.runAsUser is for profile Restricted; Baseline runs as the image's "
        "own user",
    ),
    _rule(
        "!has(self.model) || has(self.model.ollama) == (self.engine == 'ollama')",
        "engine ollama takes spec.model.ollama, and spec.model.ollama is for engine ollama",
    ),
    _rule(
        "!has(self.model) || !has(self.model.huggingface) || !has(self.model.huggingface.file)"
        " || self.engine in ['llamacpp', 'llamacpp-python']",
        "spec.model.huggingface.file (a GGUF) is for engines llamacpp and llamacpp-python",
    ),
    _rule(
        "self.engine != 'llamacpp-python' || !has(self.model) || !has(self.model.huggingface)"
        " || has(self.model.huggingface.file)",
        "llamacpp-python needs spec.model.huggingface.file, the GGUF (or a glob) to load",
    ),
    _rule(
        "!(self.engine in ['vllm', 'tgi', 'sglang']) || (has(self.resources)"
        " && has(self.resources.gpu) && has(self.resources.gpu.count)"
        " && self.resources.gpu.count >= 1)",
        "engines vllm, tgi and sglang need at least 1 GPU (spec.resources.gpu.count); for a "
        "CPU backend use llamacpp, llamacpp-python, ollama or transformers",
    ),
    _rule(
        "!has(self.engineOptions) || !has(self.engineOptions.gpuMemoryUtilization)"
        " || self.engine in ['vllm', 'sglang']",
        "spec.engineOptions.gpuMemoryUtilization is for engines vllm and sglang",
    ),
    _rule(
        "!has(self.engineOptions) || self.engine in ['vllm', 'tgi', 'sglang']"
        " || !(has(self.engineOptions.tensorParallel) || has(self.engineOptions.quantization))",
        "spec.engineOptions tensorParallel and quantization are for engines vllm, tgi and sglang",
    ),
    _rule(
        "!has(self.engineOptions) || !has(self.engineOptions.dtype)"
        " || self.engine in ['vllm', 'tgi', 'sglang', 'transformers']",
        "spec.engineOptions.dtype is for engines vllm, tgi, sglang and transformers",
    ),
    _rule(
        "!has(self.engineOptions) || !has(self.engineOptions.contextLength)"
        " || !(self.engine in ['transformers', 'openllm', 'openai-compatible'])",
        "spec.engineOptions.contextLength is not something transformers, openllm or "
        "openai-compatible servers take as a flag the operator knows",
    ),
    _rule(
        "!(self.engine in ['ollama', 'openllm', 'transformers']) || !has(self.apiKeySecretRef)",
        "ollama, openllm and transformers have no built-in API key: leave "
        "spec.apiKeySecretRef unset and "
        "put the fabric gateway in front of them",
    ),
    _rule(
        "!has(self.toolCalling) || !has(self.toolCalling.parser)"
        " || self.engine in ['vllm', 'sglang', 'llamacpp-python']",
        "spec.toolCalling.parser is for engines vllm and sglang (--tool-call-parser) and "
        "llamacpp-python (--chat_format); the others read tools without one",
    ),
    _rule(
        "!has(self.toolCalling) || !has(self.toolCalling.chatTemplate) || self.engine == 'vllm'",
        "spec.toolCalling.chatTemplate is for engine vllm",
    ),
    _rule(
        "!has(self.toolCalling) || !has(self.toolCalling.enabled) || self.toolCalling.enabled"
        " || !(self.engine in ['tgi', 'ollama', 'transformers', 'openllm', "
        "'openai-compatible'])",
        "tgi, ollama, transformers, openllm and openai-compatible have no switch for tool "
        "calling: spec.toolCalling.enabled cannot be false",
    ),
    _rule(
        "!has(self.autoscaling) || !has(self.autoscaling.fallbackAfterSeconds)"
        " || (has(self.fallback) && size(self.fallback) > 0)",
        "spec.autoscaling.fallbackAfterSeconds sends held requests to spec.fallback, which is "
        "empty",
    ),
]

AUTOSCALING_RULES: list[dict[str, str]] = [
    _rule(
        "!has(self.minReplicas) || self.minReplicas <= self.maxReplicas",
        "minReplicas must be at most maxReplicas",
    ),
]


def validations(rules: list[dict[str, str]]) -> dict[str, Any]:
    """The schema keyword that carries them (json_schema_extra of a model)."""
    return {"x-kubernetes-validations": rules}
