"""The LLMBackend API (llm.fabric.dev/v1alpha1): the one source of the CRD schema.

Field descriptions here are what `kubectl explain llmb.spec...` shows, so they are
written for the user of the resource, not for the reader of this code.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from fabric_operator.api.rules import AUTOSCALING_RULES, SPEC_RULES, validations

GROUP = "llm.fabric.dev"
VERSION = "v1alpha1"
KIND = "LLMBackend"
PLURAL = "llmbackends"
SINGULAR = "llmbackend"
SHORT_NAMES = ["llmb"]
API_VERSION = f"{GROUP}/{VERSION}"

# Kubernetes' own pattern for resource quantities (apimachinery resource.Quantity).
# Without the sign apimachinery allows: a negative request or limit is refused anyway.
QUANTITY_PATTERN = (
    r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]"
    r"|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
ENV_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"

Quantity = Annotated[
    int | str,
    Field(
        json_schema_extra={
            "x-kubernetes-int-or-string": True,
            "pattern": QUANTITY_PATTERN,
            "minimum": 0,
        }
    ),
]


class Model(BaseModel):
    """Base for API objects: camelCase on the wire, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", use_enum_values=True
    )


class Engine(StrEnum):
    """Inference server that runs the model."""

    VLLM = "vllm"
    TGI = "tgi"
    LLAMACPP = "llamacpp"
    LLAMACPP_PYTHON = "llamacpp-python"
    OLLAMA = "ollama"
    SGLANG = "sglang"
    TRANSFORMERS = "transformers"
    OPENLLM = "openllm"
    OPENAI_COMPATIBLE = "openai-compatible"
    REMOTE = "remote"


class Provider(StrEnum):
    """Who runs a remote backend; decides how the key is sent."""

    OPENAI = "openai"
    AZURE = "azure"
    ANTHROPIC = "anthropic"
    GOOGLE = "google"
    BEDROCK = "bedrock"  # Amazon Bedrock: its API key as the bearer
    VERTEX = "vertex"  # Google Vertex AI: OAuth tokens minted from a service-account key
    OPENAI_COMPATIBLE = "openai-compatible"


class HuggingFaceSource(Model):
    """A model on the Hugging Face Hub."""

    repo: str = Field(
        description="Repository id, e.g. Qwen/Qwen2.5-7B-Instruct.",
        min_length=1,
        max_length=256,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$",
    )
    revision: str | None = Field(
        default=None,
        description="Branch, tag or commit to load; the repository's default branch if unset.",
        min_length=1,
        max_length=256,
    )
    file: str | None = Field(
        default=None,
        description=(
            "GGUF file inside the repository (llamacpp, llamacpp-python), e.g. "
            "qwen2.5-0.5b-instruct-q4_k_m.gguf; llama-server picks a default quantization "
            "if unset."
        ),
        min_length=1,
        max_length=1024,
    )


class PVCSource(Model):
    """Weights already present on a PersistentVolumeClaim, mounted read-only."""

    claim_name: str = Field(
        description="Name of a PersistentVolumeClaim in the LLMBackend's namespace.",
        min_length=1,
        max_length=253,
    )
    path: str = Field(
        description=(
            "Path inside the claim: a model directory (vllm, tgi) or a .gguf file (llamacpp, "
            "llamacpp-python)."
        ),
        min_length=1,
        max_length=1024,
        pattern=r"^[^/].*$",
    )


MODEL_SOURCES = ("huggingface", "url", "ollama", "pvc", "openllm")


class ModelSource(Model):
    """Where the weights come from: exactly one of huggingface, url, ollama, pvc or openllm."""

    model_config = ConfigDict(
        json_schema_extra={"oneOf": [{"required": [s]} for s in MODEL_SOURCES]}
    )

    huggingface: HuggingFaceSource | None = Field(
        default=None,
        description="A Hugging Face Hub repository (vllm, tgi, llamacpp; llamacpp-python "
        "with an image that has huggingface_hub).",
    )
    url: str | None = Field(
        default=None,
        description="HTTP(S) URL of a .gguf file (llamacpp).",
        pattern=r"^https?://\S+$",
        max_length=2048,
    )
    ollama: str | None = Field(
        default=None,
        description="An Ollama library tag, e.g. llama3.2:1b (ollama).",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:-]*$",
        max_length=256,
    )
    pvc: PVCSource | None = Field(
        default=None,
        description="Weights on a PersistentVolumeClaim (vllm, tgi, llamacpp, "
        "llamacpp-python, sglang, transformers, openai-compatible).",
    )
    openllm: str | None = Field(
        default=None,
        description="A model of OpenLLM's catalogue (bentoml/openllm-models), e.g. "
        "llama3.2:1b (openllm).",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:-]*$",
        max_length=256,
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        chosen = self.chosen()
        if len(chosen) != 1:
            raise ValueError(
                f"exactly one of {', '.join(MODEL_SOURCES)} must be set, got "
                f"{', '.join(chosen) if chosen else 'none'}"
            )
        return self

    def chosen(self) -> list[str]:
        return [s for s in MODEL_SOURCES if getattr(self, s) is not None]

    @property
    def kind(self) -> str:
        return self.chosen()[0]

    def describe(self) -> str:
        """A short human-readable name of the source, for status and logs."""
        if self.huggingface is not None:
            return f"hf:{self.huggingface.repo}"
        if self.url is not None:
            return self.url
        if self.ollama is not None:
            return f"ollama:{self.ollama}"
        if self.openllm is not None:
            return f"openllm:{self.openllm}"
        assert self.pvc is not None
        return f"pvc:{self.pvc.claim_name}/{self.pvc.path}"


class SecretKeyRef(Model):
    """A key of a Secret in the LLMBackend's namespace."""

    name: str = Field(description="Name of the Secret.", min_length=1, max_length=253)
    key: str = Field(description="Key inside the Secret.", min_length=1, max_length=253)


class GPUVendor(StrEnum):
    NVIDIA = "nvidia"
    AMD = "amd"


class GPU(Model):
    """Accelerators for each replica."""

    count: int = Field(
        default=0,
        ge=0,
        le=64,
        description=(
            "GPUs per replica; becomes the nvidia.com/gpu or amd.com/gpu limit. 0 runs on CPU "
            "(llamacpp, llamacpp-python and ollama only)."
        ),
    )
    vendor: GPUVendor = Field(default=GPUVendor.NVIDIA, description="GPU vendor: nvidia or amd.")
    type: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description=(
            "GPU model, e.g. H100-80GB, L4 or MI300X: places the pods on the node pool that "
            "has it (the operator's accelerator catalogue maps it to node labels and "
            "tolerations). Any GPU node if unset."
        ),
    )


class ResourceList(Model):
    """CPU and memory amounts, as in a container's resources."""

    cpu: Quantity | None = Field(default=None, description="CPU, e.g. 4 or 500m.")
    memory: Quantity | None = Field(default=None, description="Memory, e.g. 16Gi.")


class Resources(Model):
    """Compute resources of each replica."""

    gpu: GPU | None = Field(default=None, description="Accelerators per replica.")
    requests: ResourceList | None = Field(default=None, description="CPU/memory requests.")
    limits: ResourceList | None = Field(default=None, description="CPU/memory limits.")


class Dtype(StrEnum):
    AUTO = "auto"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"


class EngineOptions(Model):
    """Typed engine settings; the operator turns each into the engine's own flag."""

    context_length: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description=(
            "Maximum context in tokens (vllm --max-model-len, tgi --max-total-tokens, "
            "llama-server --ctx-size, OLLAMA_CONTEXT_LENGTH)."
        ),
    )
    tensor_parallel: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description=(
            "GPUs one model copy is split over (vllm --tensor-parallel-size, tgi --num-shard);"
            " at most resources.gpu.count. Defaults to the GPU count."
        ),
    )
    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Fraction of GPU memory vllm may use (vllm --gpu-memory-utilization).",
    )
    quantization: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        pattern=r"^[a-z0-9_-]+$",
        description="Quantization method, e.g. awq, gptq, fp8 "
        "(vllm --quantization, tgi --quantize).",
    )
    dtype: Dtype | None = Field(
        default=None, description="Weights/activations dtype (vllm, tgi --dtype)."
    )


class ServiceType(StrEnum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"


class ServiceSpec(Model):
    """The Service that exposes the OpenAI-compatible endpoint."""

    type: ServiceType = Field(default=ServiceType.CLUSTER_IP, description="Service type.")
    port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Service port; defaults to the engine's own port (vllm 8000, tgi 8080, "
        "llamacpp 8080, llamacpp-python 8000, ollama 11434).",
    )
    annotations: dict[str, str] | None = Field(
        default=None, description="Annotations for the Service (load balancer settings...)."
    )


class LabelSelectorRequirement(Model):
    key: str = Field(description="Label key.", min_length=1, max_length=317)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="In, NotIn, Exists or DoesNotExist."
    )
    values: list[str] | None = Field(default=None, description="Values for In and NotIn.")


class LabelSelector(Model):
    """As metav1.LabelSelector; an empty selector selects everything."""

    match_labels: dict[str, str] | None = Field(default=None, description="Labels to match.")
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        default=None, description="Label requirements, all of which must hold."
    )


class IPBlock(Model):
    cidr: str = Field(description="CIDR allowed, e.g. 10.0.0.0/8.", min_length=1, max_length=64)
    except_: list[str] | None = Field(
        default=None, alias="except", description="CIDRs inside cidr that are not allowed."
    )


class NetworkPeer(Model):
    """Who may connect, as a networking/v1 NetworkPolicyPeer."""

    namespace_selector: LabelSelector | None = Field(
        default=None, description="Namespaces by label (with podSelector: pods in them)."
    )
    pod_selector: LabelSelector | None = Field(
        default=None, description="Pods by label (in this namespace unless namespaceSelector)."
    )
    ip_block: IPBlock | None = Field(default=None, description="Addresses outside the cluster.")


class NetworkPolicySpec(Model):
    """Which clients may reach the engine port; everything else is refused."""

    enabled: bool = Field(default=True, description="Create the NetworkPolicy.")
    from_: list[NetworkPeer] | None = Field(
        default=None,
        alias="from",
        max_length=32,
        description="Allowed clients. Default: the gateway's pods (label "
        "app.kubernetes.io/name=fabric-gateway, any namespace) and pods labelled "
        "llm.fabric.dev/client=true in this namespace.",
    )


class Toleration(Model):
    """A pod toleration, as in core/v1."""

    key: str | None = Field(default=None, description="Taint key; empty matches all keys.")
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="Exists or Equal (default Equal)."
    )
    value: str | None = Field(default=None, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, description="For NoExecute: how long the pod stays bound after the taint."
    )


class EnvVar(Model):
    """An environment variable for the engine container, as in core/v1."""

    name: str = Field(description="Variable name.", min_length=1, pattern=ENV_NAME_PATTERN)
    value: str | None = Field(default=None, max_length=32768, description="Literal value.")
    value_from: dict[str, Any] | None = Field(
        default=None,
        description="Source of the value (secretKeyRef, configMapKeyRef, fieldRef...), as in "
        "core/v1 EnvVarSource.",
    )


class StrategyType(StrEnum):
    ROLLING_UPDATE = "RollingUpdate"
    RECREATE = "Recreate"


IntOrPercent = Annotated[
    int | str,
    Field(
        json_schema_extra={
            "x-kubernetes-int-or-string": True,
            "pattern": r"^[0-9]+%?$",
            "minimum": 0,
        }
    ),
]


class Strategy(Model):
    """How replicas are replaced when the spec changes."""

    type: StrategyType = Field(description="RollingUpdate or Recreate.")
    max_surge: IntOrPercent | None = Field(
        default=None,
        description="RollingUpdate: extra pods during a rollout (count or percent). Each "
        "surge pod needs its own GPUs.",
    )
    max_unavailable: IntOrPercent | None = Field(
        default=None, description="RollingUpdate: pods that may be down during a rollout."
    )


class RemoteSpec(Model):
    """An OpenAI-compatible endpoint outside the cluster, reached through the gateway."""

    base_url: str = Field(
        alias="baseURL",
        description="OpenAI-compatible base URL, ending before /chat/completions, e.g. "
        "https://api.openai.com/v1, https://RESOURCE.openai.azure.com/openai/v1, "
        "https://api.anthropic.com/v1, "
        "https://generativelanguage.googleapis.com/v1beta/openai, "
        "https://bedrock-runtime.REGION.amazonaws.com/openai/v1, "
        "https://bedrock-mantle.REGION.api.aws/v1, "
        "https://LOCATION-aiplatform.googleapis.com/v1/projects/PROJECT/locations/LOCATION/"
        "endpoints/openapi.",
        pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
        max_length=2048,
    )
    model: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        pattern=r"^\S+$",
        description="The provider's name of the model, sent upstream in place of "
        "servedModelName, e.g. gpt-4o-mini, claude-sonnet-4-5, openai.gpt-oss-120b "
        "(Bedrock) or google/gemini-2.0-flash-001 (Vertex); servedModelName if unset.",
    )
    provider: Provider = Field(
        default=Provider.OPENAI_COMPATIBLE,
        description="openai, azure (the key also goes in the api-key header), anthropic, "
        "google, bedrock (an Amazon Bedrock API key), vertex (apiKeySecretRef names a "
        "Google service-account JSON key; the gateway sends short-lived OAuth access "
        "tokens minted from it) or openai-compatible. Every one is called with OpenAI's "
        "chat-completions protocol; nothing is translated.",
    )


class LocalObjectReference(Model):
    name: str = Field(description="Name of the referenced object.", min_length=1)


class Autoscaling(Model):
    """Replicas that follow demand: requests in flight and held at the gateway, per replica."""

    model_config = ConfigDict(json_schema_extra=validations(AUTOSCALING_RULES))

    min_replicas: int = Field(
        default=1,
        ge=0,
        le=1000,
        description="Fewest replicas. 0 scales to zero after scaleDownDelaySeconds without "
        "requests: no GPU is held while idle, and the first request waits at the gateway "
        "(holdTimeoutSeconds) while a pod starts.",
    )
    max_replicas: int = Field(
        ge=1,
        le=1000,
        description="Most replicas: the cap on what demand may cost. At least minReplicas.",
    )
    target_requests: int = Field(
        default=4,
        ge=1,
        le=10000,
        description="Concurrent requests one replica is meant to serve (held at the gateway, "
        "plus in flight through it or, if more, what the engine pods report running and "
        "waiting); the autoscaler keeps demand / replicas near it. Set it to the batch an "
        "engine serves without its latency suffering.",
    )
    scale_down_delay_seconds: int = Field(
        default=300,
        ge=0,
        le=86400,
        description="How long demand must stay below what the current replicas serve before "
        "they are removed (and, with minReplicas 0, how long without any request before "
        "scaling to zero): a model takes minutes to load, so a short lull must not cost a "
        "cold start. Scale-up never waits.",
    )
    hold_timeout_seconds: int = Field(
        default=600,
        ge=1,
        le=3600,
        description="How long the gateway holds a request while the backend is at zero or "
        "has no ready pod, before answering 503 with Retry-After (or sending it to "
        "spec.fallback). Cover the time a pod takes to start and load the model.",
    )
    max_held_requests: int = Field(
        default=100,
        ge=0,
        le=100000,
        description="Most requests the gateway holds for this backend at once; more get 503 "
        "with Retry-After (or spec.fallback) at once, so a burst at zero cannot pile up "
        "without bound. 0 holds none.",
    )
    fallback_after_seconds: int | None = Field(
        default=None,
        ge=0,
        le=3600,
        description="Send a held request to spec.fallback (e.g. a remote provider) after this "
        "many seconds instead of letting it wait for a pod to start; 0 sends it at once. "
        "Needs spec.fallback. Unset: held requests wait for a pod.",
    )


class RoutingStrategy(StrEnum):
    """How the gateway picks a ready pod for each request."""

    LEAST_IN_FLIGHT = "LeastInFlight"
    PREFIX_AFFINITY = "PrefixAffinity"


class Routing(Model):
    """How the gateway spreads requests over the ready pods of this backend."""

    strategy: RoutingStrategy = Field(
        default=RoutingStrategy.LEAST_IN_FLIGHT,
        description="LeastInFlight: the pod with the fewest requests in flight, which keeps "
        "latency even. PrefixAffinity: the same conversation prefix goes to the same pod "
        "(consistent hashing with bounded loads), so the engine's prompt cache is reused and "
        "the time to first token drops; a pod above its share of the load is skipped.",
    )
    prefix_characters: int = Field(
        default=2048,
        ge=64,
        le=65536,
        description="PrefixAffinity: how many characters of the conversation, system prompt "
        "included, key the affinity. Long enough that conversations sharing only a short "
        "opener do not land on one pod; short enough that later turns of one conversation "
        "keep the same key.",
    )


class ToolCalling(Model):
    """Tool calling: requests with `tools` answered with choices[0].message.tool_calls."""

    enabled: bool | None = Field(
        default=None,
        description="Unset: on wherever the engine and model can (status.toolCalling and "
        "the ToolCalling condition say how, or why not). true: required; the backend is "
        "refused (InvalidSpec) where the operator cannot switch it on. false: off (vllm, "
        "llamacpp, llamacpp-python; tgi and ollama always accept tools).",
    )
    parser: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        pattern=r"^[a-z0-9][a-z0-9_.-]*$",
        description="vllm: the --tool-call-parser (hermes, llama3_json, mistral, ...); "
        "llamacpp-python: the --chat_format (chatml-function-calling, functionary-v2, ...). "
        "Unset: from the model family where that is unambiguous (Qwen2.5/Qwen3: hermes, "
        "Llama 3.x: llama3_json, Mistral: mistral...). Not for llamacpp, tgi or ollama, "
        "which read the model's own chat template.",
    )
    chat_template: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        pattern=r"^/\S+$",
        description="vllm: absolute path, inside the image, of a Jinja chat template that "
        "renders tools (--chat-template), for a model whose own template does not. Unset: "
        "the template vLLM's docs name for the parser, if any.",
    )


class ServerSpec(Model):
    """Engine openai-compatible: how to run a container that already speaks the OpenAI API.

    The model reaches it as environment variables the args may name with Kubernetes'
    own $(VAR) expansion: FABRIC_MODEL (the Hugging Face repo id, the file or directory
    on the PVC, or the URL), FABRIC_SERVED_MODEL_NAME and FABRIC_PORT.
    """

    port: int = Field(
        ge=1, le=65535, description="Port the server listens on, on every address (0.0.0.0)."
    )
    command: list[Annotated[str, Field(max_length=4096)]] | None = Field(
        default=None, max_length=64, description="Entrypoint; the image's own if unset."
    )
    args: list[Annotated[str, Field(max_length=32768)]] | None = Field(
        default=None,
        max_length=256,
        description="Arguments, e.g. [--model, $(FABRIC_MODEL), --port, $(FABRIC_PORT)].",
    )
    health_path: str | None = Field(
        default=None,
        max_length=1024,
        pattern=r"^/\S*$",
        description="HTTP path answering 200 while the server is alive (startup and liveness "
        "probes). Unset: a TCP connect to the port.",
    )
    readiness_path: str | None = Field(
        default=None,
        max_length=1024,
        pattern=r"^/\S*$",
        description="HTTP path answering 200 once the model is loaded (readiness probe); "
        "healthPath if unset.",
    )
    api_key_env: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        pattern=ENV_NAME_PATTERN,
        description="Environment variable the server reads its bearer key from; "
        "spec.apiKeySecretRef fills it. Without it the key is only available to the args "
        "as $(FABRIC_API_KEY).",
    )


class CacheAccessMode(StrEnum):
    READ_WRITE_ONCE = "ReadWriteOnce"
    READ_WRITE_MANY = "ReadWriteMany"
    READ_WRITE_ONCE_POD = "ReadWriteOncePod"


class CacheClaim(Model):
    """A PersistentVolumeClaim that holds the downloaded weights across restarts."""

    storage_class_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        description="StorageClass of the claim; the cluster's default if unset.",
    )
    access_mode: CacheAccessMode = Field(
        default=CacheAccessMode.READ_WRITE_ONCE,
        description="ReadWriteOnce (replicas on one node share it), ReadWriteMany (replicas "
        "anywhere: needs a storage class that offers it) or ReadWriteOncePod.",
    )
    shared: bool = Field(
        default=False,
        description="false: a claim of this backend's own (named after it), deleted with it "
        "or when the cache is turned off. true: one claim per model in the namespace "
        "(fabric-cache-<hash of the model source>), reused by every backend of that model "
        "and kept when they go (delete it by hand).",
    )


class Cache(Model):
    """Where the engine downloads the weights (and keeps its compile caches)."""

    size: Quantity | None = Field(
        default=None,
        description="Room for the weights, e.g. 40Gi: the claim's size, or, without a claim, "
        "the emptyDir's limit and an ephemeral-storage request (the pod goes to a node with "
        "the room). Required with persistentVolumeClaim.",
    )
    persistent_volume_claim: CacheClaim | None = Field(
        default=None,
        description="Keep the cache on a PersistentVolumeClaim: a restarted pod finds the "
        "weights already there. Unset: an emptyDir, emptied with each pod.",
    )
    preload: bool = Field(
        default=False,
        description="Download the Hugging Face weights in an init container before the "
        "engine starts (vllm, tgi, sglang, transformers with spec.model.huggingface):"
        " a download failure is its own container's error, and status.lastStart shows the "
        "download apart from the load.",
    )


class PodSecurityProfile(StrEnum):
    RESTRICTED = "Restricted"
    BASELINE = "Baseline"


class PodSecurity(Model):
    """The Pod Security Standards profile the engine pods meet."""

    profile: PodSecurityProfile = Field(
        default=PodSecurityProfile.RESTRICTED,
        description="Restricted: the engine runs as a non-root user (runAsUser) with HOME and "
        "its caches on writable volumes. Baseline: as the image's own user (often root), for "
        "images that cannot run as another user.",
    )
    run_as_user: int | None = Field(
        default=None,
        ge=1,
        le=2147483647,
        description="Restricted: the user (and group) id the engine runs as; 65532 if unset.",
    )


class LLMBackendSpec(Model):
    """Desired state of an LLM inference backend."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [{"required": ["model"]}, {"required": ["remote"]}],
            **validations(SPEC_RULES),
        }
    )

    engine: Engine = Field(
        description="Inference server: vllm, tgi, llamacpp (llama.cpp's llama-server), "
        "llamacpp-python (llama-cpp-python's server), ollama, sglang, transformers "
        "(`transformers serve`), openllm, or openai-compatible (any image that speaks the "
        "OpenAI API, described by spec.server); remote for an endpoint outside the cluster "
        "(spec.remote)."
    )
    model: ModelSource | None = Field(
        default=None,
        description="Where the weights come from (every engine but remote; exactly one of "
        "model and remote).",
    )
    remote: RemoteSpec | None = Field(
        default=None,
        description="Engine remote: the OpenAI-compatible endpoint the gateway routes to. "
        "No pods are created; apiKeySecretRef is the key sent to it.",
    )
    fallback: list[Annotated[str, Field(max_length=63, pattern=DNS_LABEL_PATTERN)]] | None = Field(
        default=None,
        max_length=8,
        description="LLMBackends in this namespace the gateway tries, in order, when "
        "this one refuses to connect, answers 5xx or 429, or times out before its "
        "first byte.",
    )
    served_model_name: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        pattern=r"^\S+$",
        description="Name clients pass as `model`; defaults to metadata.name.",
    )
    replicas: int = Field(
        default=1,
        ge=0,
        le=1000,
        description="Number of engine replicas. With spec.autoscaling set, the autoscaler "
        "owns it: it writes its decision here, and a manual change (kubectl scale) lasts "
        "only until its next decision; change spec.autoscaling instead.",
    )
    image: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="Container image override; defaults to the engine's pinned image.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        default=None, description="Image pull policy of the engine container."
    )
    image_pull_secrets: list[LocalObjectReference] | None = Field(
        default=None, description="Secrets for pulling the image from a private registry."
    )
    engine_options: EngineOptions | None = Field(
        default=None, description="Typed engine settings (context length, parallelism...)."
    )
    extra_args: list[Annotated[str, Field(max_length=32768)]] | None = Field(
        default=None,
        max_length=256,
        description="Extra command-line arguments appended to the engine's own.",
    )
    env: list[EnvVar] | None = Field(
        default=None, description="Extra environment variables for the engine container."
    )
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding the bearer key the engine requires of every request "
        "(vllm, tgi, llamacpp, llamacpp-python), or the key the gateway sends to a remote "
        "endpoint.",
    )
    hf_token_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding a Hugging Face token, for gated or private models.",
    )
    resources: Resources | None = Field(
        default=None, description="GPUs, CPU and memory of each replica."
    )
    node_selector: dict[str, str] | None = Field(
        default=None, description="Node labels the pods must match."
    )
    tolerations: list[Toleration] | None = Field(
        default=None, description="Tolerations for node taints (e.g. a GPU pool's taint)."
    )
    affinity: dict[str, Any] | None = Field(
        default=None, description="Pod affinity rules, as in core/v1 Affinity."
    )
    priority_class_name: str | None = Field(
        default=None, min_length=1, max_length=253, description="PriorityClass of the pods."
    )
    service: ServiceSpec | None = Field(default=None, description="How the endpoint is exposed.")
    network_policy: NetworkPolicySpec | None = Field(
        default=None,
        description="A NetworkPolicy that admits only the listed clients to the engine port "
        "(the operator's default applies when unset: off unless configured).",
    )
    autoscaling: Autoscaling | None = Field(
        default=None,
        description="Scale replicas with demand, to zero if minReplicas is 0 (every engine "
        "but remote). Unset: spec.replicas is fixed.",
    )
    routing: Routing | None = Field(
        default=None,
        description="How the gateway picks a pod for each request (every engine but remote). "
        "Unset: LeastInFlight.",
    )
    tool_calling: ToolCalling | None = Field(
        default=None,
        description="Tool calling (every engine but remote, whose provider decides). Unset: "
        "on wherever the engine and model can.",
    )
    server: ServerSpec | None = Field(
        default=None,
        description="Engine openai-compatible: the container's port, command, args, probes "
        "and key variable (required for it, refused for the other engines).",
    )
    cache: Cache | None = Field(
        default=None,
        description="Where the weights are downloaded: a sized emptyDir or a "
        "PersistentVolumeClaim that keeps them across restarts. Unset: an emptyDir without "
        "a limit.",
    )
    pod_security: PodSecurity | None = Field(
        default=None,
        description="Pod Security Standards profile of the engine pods. Unset: Restricted "
        "(non-root, uid 65532).",
    )
    strategy: Strategy | None = Field(
        default=None,
        description="Rollout strategy. Default: GPU backends replace pods one at a time "
        "without surging (maxSurge 0, maxUnavailable 1), so a rollout never waits for spare "
        "GPUs; CPU backends surge one pod first (maxSurge 1, maxUnavailable 0).",
    )

    @model_validator(mode="after")
    def _model_or_remote(self) -> LLMBackendSpec:
        if (self.model is None) == (self.remote is None):
            raise ValueError("exactly one of model and remote must be set")
        return self

    @property
    def source(self) -> ModelSource:
        """The model source of an engine backend (validation guarantees one)."""
        if self.model is None:
            raise ValueError("a remote backend has no model source")
        return self.model

    @property
    def gpu_count(self) -> int:
        return self.resources.gpu.count if self.resources and self.resources.gpu else 0

    @property
    def gpu_vendor(self) -> str:
        gpu = self.resources.gpu if self.resources else None
        return str(gpu.vendor) if gpu else GPUVendor.NVIDIA.value

    @property
    def gpu_type(self) -> str | None:
        return self.resources.gpu.type if self.resources and self.resources.gpu else None

    @property
    def options(self) -> EngineOptions:
        return self.engine_options or EngineOptions()


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(Model):
    """A status condition, in the shape of metav1.Condition."""

    type: str = Field(description="Condition type: Ready, Progressing or Degraded.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    observed_generation: int | None = Field(
        default=None, description="metadata.generation the condition was computed from."
    )
    last_transition_time: str = Field(
        description="When status last changed (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    reason: str = Field(description="CamelCase reason for the last transition.")
    message: str = Field(description="Human-readable details.")


class Phase(StrEnum):
    PENDING = "Pending"
    STARTING = "Starting"
    LOADING = "Loading"
    PROGRESSING = "Progressing"
    READY = "Ready"
    DEGRADED = "Degraded"
    STOPPED = "Stopped"
    REMOTE = "Remote"
    INVALID = "Invalid"
    UNSCHEDULABLE = "Unschedulable"
    IMAGE_PULL_BACK_OFF = "ImagePullBackOff"
    CRASH_LOOP_BACK_OFF = "CrashLoopBackOff"
    OOM_KILLED = "OOMKilled"
    CREATE_CONTAINER_CONFIG_ERROR = "CreateContainerConfigError"


class ScalingReason(StrEnum):
    """Why the autoscaler wants the replicas it wants (status.autoscaling.reason)."""

    SCALED_TO_ZERO = "ScaledToZero"
    SCALING_UP = "ScalingUp"
    SCALING_DOWN = "ScalingDown"
    STABLE = "Stable"
    AT_MAXIMUM = "AtMaximum"
    HOLDING = "Holding"


class AutoscalingStatus(Model):
    """What the autoscaler decided and why; also its memory across operator restarts."""

    model_config = ConfigDict(extra="ignore")

    desired_replicas: int | None = Field(
        default=None, description="Replicas the autoscaler wants (it writes spec.replicas)."
    )
    reason: str | None = Field(
        default=None,
        description=f"Why: {', '.join(ScalingReason)}.",
    )
    message: str | None = Field(
        default=None,
        description="Details, e.g. 14 requests in flight, target 4/replica.",
    )
    demand: int | None = Field(
        default=None,
        description="Requests held plus in flight (summed over the gateway replicas) or, if "
        "more, at the engine pods by their own gauges, at the last decision.",
    )
    last_scale_time: str | None = Field(
        default=None,
        description="When the autoscaler last changed the replicas (RFC 3339); a restarted "
        "operator keeps the replicas it set at least scaleDownDelaySeconds from then.",
        json_schema_extra={"format": "date-time"},
    )
    last_demand_time: str | None = Field(
        default=None,
        description="When a request was last in flight or held (RFC 3339); scaling to zero "
        "counts scaleDownDelaySeconds from it, across operator restarts.",
        json_schema_extra={"format": "date-time"},
    )
    gateways: int | None = Field(
        default=None, description="Gateway replicas whose counts the last decision summed."
    )


class LastStart(Model):
    """Where the time of the newest pod's start went, from what the pod reports."""

    model_config = ConfigDict(extra="ignore")

    pod: str | None = Field(default=None, description="The pod measured.")
    created: str | None = Field(
        default=None,
        description="When the pod was created (RFC 3339).",
        json_schema_extra={"format": "date-time"},
    )
    scheduled_seconds: int | None = Field(
        default=None, description="Created to bound to a node (waiting for a GPU node shows here)."
    )
    init_seconds: int | None = Field(
        default=None,
        description="Bound to init containers done: the weights' download with "
        "spec.cache.preload, the model pull for ollama.",
    )
    started_seconds: int | None = Field(
        default=None, description="To the engine container running: mostly the image pull."
    )
    ready_seconds: int | None = Field(
        default=None,
        description="Engine running to ready: loading the weights (and downloading them "
        "without preload).",
    )
    total_seconds: int | None = Field(
        default=None, description="Created to ready; unset while the pod is not ready yet."
    )


class LLMBackendStatus(Model):
    """Observed state of an LLMBackend, written by the operator."""

    model_config = ConfigDict(extra="ignore")

    observed_generation: int | None = Field(
        default=None, description="metadata.generation this status reflects."
    )
    phase: Phase | None = Field(
        default=None,
        description="Summary: Pending, Starting, Loading, Progressing, Ready, Stopped, Remote, "
        "Invalid, Degraded, or what keeps pods from serving: Unschedulable, ImagePullBackOff, "
        "CrashLoopBackOff, OOMKilled, CreateContainerConfigError.",
    )
    endpoint: str | None = Field(
        default=None, description="OpenAI-compatible base URL inside the cluster (ends in /v1)."
    )
    served_model_name: str | None = Field(default=None, description="Name clients pass as `model`.")
    replicas: int | None = Field(default=None, description="Replicas the Deployment has.")
    ready_replicas: int | None = Field(default=None, description="Replicas ready to serve.")
    ready: str | None = Field(default=None, description="Ready/desired replicas, e.g. 1/1.")
    restarts: int | None = Field(
        default=None,
        description="Container restarts across the current pods: a crash the pods "
        "recovered from shows here even when the backend is Ready again.",
    )
    selector: str | None = Field(
        default=None, description="Label selector of the pods (for the scale subresource)."
    )
    autoscaling: AutoscalingStatus | None = Field(
        default=None, description="The autoscaler's decision (with spec.autoscaling set)."
    )
    last_start: LastStart | None = Field(
        default=None,
        description="Where the newest pod's start went: scheduling, init containers (weights "
        "with preload), image pull, loading.",
    )
    tool_calling: str | None = Field(
        default=None,
        description="How the engine answers `tools`: the vllm parser (hermes...), jinja "
        "(llamacpp), the llamacpp-python chat format, builtin (tgi, ollama), provider "
        "(remote), or off; the ToolCalling condition says why.",
    )
    conditions: list[Condition] | None = Field(
        default=None,
        description="Ready, Progressing, Degraded and ToolCalling conditions.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
