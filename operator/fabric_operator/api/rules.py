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
        "!has(self.model) || !has(self.model.url) || self.engine == 'llamacpp'",
        "spec.model.url (a GGUF URL) is for engine llamacpp",
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
        "!(self.engine in ['vllm', 'tgi']) || (has(self.resources) && has(self.resources.gpu)"
        " && has(self.resources.gpu.count) && self.resources.gpu.count >= 1)",
        "engines vllm and tgi need at least 1 GPU (spec.resources.gpu.count); for a CPU "
        "backend use llamacpp, llamacpp-python or ollama",
    ),
    _rule(
        "!has(self.engineOptions) || !has(self.engineOptions.gpuMemoryUtilization)"
        " || self.engine == 'vllm'",
        "spec.engineOptions.gpuMemoryUtilization is for engine vllm",
    ),
    _rule(
        "!has(self.engineOptions) || self.engine in ['vllm', 'tgi']"
        " || !(has(self.engineOptions.tensorParallel) || has(self.engineOptions.quantization)"
        " || has(self.engineOptions.dtype))",
        "spec.engineOptions tensorParallel, quantization and dtype are for engines vllm and tgi",
    ),
    _rule(
        "self.engine != 'ollama' || !has(self.apiKeySecretRef)",
        "ollama has no built-in API key: leave spec.apiKeySecretRef unset and put the fabric "
        "gateway in front of it",
    ),
    _rule(
        "!has(self.toolCalling) || !has(self.toolCalling.parser)"
        " || self.engine in ['vllm', 'llamacpp-python']",
        "spec.toolCalling.parser is for engines vllm (--tool-call-parser) and llamacpp-python "
        "(--chat_format); the others read tools without one",
    ),
    _rule(
        "!has(self.toolCalling) || !has(self.toolCalling.chatTemplate) || self.engine == 'vllm'",
        "spec.toolCalling.chatTemplate is for engine vllm",
    ),
    _rule(
        "!has(self.toolCalling) || !has(self.toolCalling.enabled) || self.toolCalling.enabled"
        " || !(self.engine in ['tgi', 'ollama'])",
        "tgi and ollama always accept tools: spec.toolCalling.enabled cannot be false",
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
