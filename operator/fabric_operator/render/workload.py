"""The Deployment and Service around an engine container: the parts common to all engines."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fabric_operator.api.backend import LLMBackend
from fabric_operator.api.v1alpha1 import Engine, PodSecurityProfile
from fabric_operator.config import DEFAULT, OperatorConfig
from fabric_operator.render import (
    llamacpp,
    llamacpp_python,
    ollama,
    openai_compatible,
    openllm,
    sglang,
    tgi,
    toolcalls,
    transformers,
    vllm,
)
from fabric_operator.render.cache import (
    cache_claim,
    cache_volume,
    ephemeral_request,
    preload_container,
)
from fabric_operator.render.engine import (
    CACHE_VOLUME,
    MODEL_MOUNT,
    PORT_NAME,
    EngineContainer,
    Manifest,
    empty_dir,
    plain_env,
)
from fabric_operator.render.placement import placement

ENGINES: dict[str, Callable[[LLMBackend], EngineContainer]] = {
    Engine.VLLM: vllm.container,
    Engine.TGI: tgi.container,
    Engine.LLAMACPP: llamacpp.container,
    Engine.LLAMACPP_PYTHON: llamacpp_python.container,
    Engine.OLLAMA: ollama.container,
    Engine.SGLANG: sglang.container,
    Engine.TRANSFORMERS: transformers.container,
    Engine.OPENLLM: openllm.container,
    Engine.OPENAI_COMPATIBLE: openai_compatible.container,
}
ENGINE_PORTS: dict[str, int] = {
    Engine.VLLM: vllm.PORT,
    Engine.TGI: tgi.PORT,
    Engine.LLAMACPP: llamacpp.PORT,
    Engine.LLAMACPP_PYTHON: llamacpp_python.PORT,
    Engine.OLLAMA: ollama.PORT,
    Engine.SGLANG: sglang.PORT,
    Engine.TRANSFORMERS: transformers.PORT,
    Engine.OPENLLM: openllm.PORT,
}

MANAGED_BY = "fabric-operator"
BACKEND_LABEL = "llm.fabric.dev/backend"
COMPONENT = "inference-server"
CONTAINER_NAME = "engine"
GPU_RESOURCE = {"nvidia": "nvidia.com/gpu", "amd": "amd.com/gpu"}


@dataclass(frozen=True)
class Children:
    """Everything an LLMBackend owns."""

    deployment: Manifest
    service: Manifest
    network_policy: Manifest | None = None
    cache_claim: Manifest | None = None  # the backend's own weight cache
    disruption_budget: Manifest | None = None

    def all(self) -> list[Manifest]:
        """In the order they are applied (and `fabric-operator render` prints them): the
        NetworkPolicy first, so that no engine pod serves before its policy exists; the
        cache claim before the pods that mount it; then the Deployment, the likelier to
        be refused by the API server, so that a refusal leaves no Service without its
        Deployment."""
        first = [m for m in (self.network_policy, self.cache_claim) if m is not None]
        last = [self.disruption_budget] if self.disruption_budget is not None else []
        return [*first, self.deployment, self.service, *last]


def selector_labels(backend: LLMBackend) -> dict[str, str]:
    """Labels that pick this backend's pods; immutable in a Deployment, so never the engine."""
    return {BACKEND_LABEL: backend.name}


def labels(backend: LLMBackend) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": str(backend.spec.engine),
        "app.kubernetes.io/instance": backend.name,
        "app.kubernetes.io/component": COMPONENT,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/part-of": "fabric",
        **selector_labels(backend),
    }


def engine_port(backend: LLMBackend) -> int:
    """The port the engine listens on in its pod."""
    server = backend.spec.server
    if backend.spec.engine == Engine.OPENAI_COMPATIBLE and server is not None:
        return server.port
    return ENGINE_PORTS[backend.spec.engine]


def service_port(backend: LLMBackend) -> int:
    service = backend.spec.service
    return (service.port if service and service.port else None) or engine_port(backend)


def endpoint(backend: LLMBackend, cluster_domain: str = "cluster.local") -> str:
    """The OpenAI-compatible base URL clients inside the cluster use."""
    host = f"{backend.name}.{backend.namespace}.svc.{cluster_domain}"
    return f"http://{host}:{service_port(backend)}/v1"


def _probe(path: str | None, period: int, failures: int) -> Manifest:
    action: Manifest = (
        {"httpGet": {"path": path, "port": PORT_NAME}}
        if path is not None
        else {"tcpSocket": {"port": PORT_NAME}}
    )
    return {
        **action,
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def _resources(backend: LLMBackend) -> Manifest:
    res = backend.spec.resources
    out: dict[str, dict[str, Any]] = {}
    for kind in ("requests", "limits"):
        values = getattr(res, kind) if res else None
        if values is not None:
            given = values.model_dump(exclude_none=True)
            if given:
                out[kind] = {k: str(v) for k, v in given.items()}
    room = ephemeral_request(backend)
    if room is not None:
        out.setdefault("requests", {})["ephemeral-storage"] = room
    gpus = backend.spec.gpu_count
    if gpus:
        out.setdefault("limits", {})[GPU_RESOURCE[backend.spec.gpu_vendor]] = str(gpus)
    return out


def restricted(backend: LLMBackend, engine: EngineContainer) -> bool:
    """Whether the pods meet the Pod Security Standards' restricted profile: as asked, else
    wherever the engine's image can run as another user than its own. Not by default on
    AMD GPUs: /dev/kfd and /dev/dri/renderD* belong to the node's render/video groups
    (mode 0660), whose ids differ between distributions."""
    wanted = backend.spec.pod_security
    if wanted is not None:
        return wanted.profile == PodSecurityProfile.RESTRICTED
    amd_gpu = backend.spec.gpu_count > 0 and backend.spec.gpu_vendor == "amd"
    return engine.non_root and not amd_gpu


# HOME of a restricted engine: the images' own (/root) is not the user's to write.
HOME = "/home/fabric"
HOME_VOLUME = "home"
_HOME_NAMES = frozenset({"HOME", "USER", "LOGNAME"})


def _shared_mounts(backend: LLMBackend, engine: EngineContainer) -> list[Manifest]:
    """What the engine and its init containers all mount: the cache (and HOME)."""
    mounts = [{"name": CACHE_VOLUME, "mountPath": engine.cache_path}]
    if restricted(backend, engine):
        mounts.append({"name": HOME_VOLUME, "mountPath": HOME})
    return mounts


def _shared_env(backend: LLMBackend, engine: EngineContainer) -> list[Manifest]:
    """A user id with no passwd entry gets HOME=/ (unwritable) and no user name (PyTorch's
    getpass fails): both are given."""
    if not restricted(backend, engine):
        return []
    return [plain_env("HOME", HOME), plain_env("USER", "fabric"), plain_env("LOGNAME", "fabric")]


def image(backend: LLMBackend, engine: EngineContainer, config: OperatorConfig) -> str:
    """The backend's image, else the operator's mirror of the pinned one, else the pinned."""
    return backend.spec.image or config.images.get(engine.image, engine.image)


def _with_user_env(backend: LLMBackend, ours: list[Manifest]) -> list[Manifest]:
    """`ours`, then spec.env, whose names replace ours (a name twice in one list would make
    the API server refuse the apply)."""
    user = [e.model_dump(by_alias=True, exclude_none=True) for e in backend.spec.env or []]
    names = {e["name"] for e in user}
    return [e for e in ours if e["name"] not in names] + user


def _container(backend: LLMBackend, engine: EngineContainer, config: OperatorConfig) -> Manifest:
    spec = backend.spec
    mounts = list(engine.volume_mounts) + _shared_mounts(backend, engine)
    if spec.source.pvc:
        mounts.append({"name": "model", "mountPath": MODEL_MOUNT, "readOnly": True})
    # The user's variables override the engine's defaults of the same name (HF_HOME on a
    # PVC, say); a name twice in one list would make the API server refuse the apply.
    env = _with_user_env(backend, _shared_env(backend, engine) + engine.env)
    # A short startup period: every start (not only the first) waits for its first
    # success, and /health is cheap; the failure budget stays startup_seconds.
    startup_period = 2
    container: Manifest = {
        "name": CONTAINER_NAME,
        "image": image(backend, engine, config),
        # Tool-calling flags after the engine's own, before the user's extraArgs.
        "args": engine.args + toolcalls.plan(backend).args + list(spec.extra_args or []),
        "ports": [{"name": PORT_NAME, "containerPort": engine.port, "protocol": "TCP"}],
        "env": env,
        "resources": _resources(backend),
        "volumeMounts": mounts,
        "startupProbe": _probe(
            engine.liveness_path, startup_period, engine.startup_seconds // startup_period
        ),
        "livenessProbe": _probe(engine.liveness_path, 10, 3),
        "readinessProbe": _probe(engine.readiness_path, 5, 3),
    }
    container["securityContext"] = container_security()
    if engine.command:
        container["command"] = engine.command
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    return container


# Every engine: no privilege escalation, no Linux capabilities (GPUs need none: the
# device plugin hands over the device files).
def container_security() -> Manifest:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


NON_ROOT_UID = 65532


def _pod_security(backend: LLMBackend, engine: EngineContainer) -> Manifest:
    pod: Manifest = {"seccompProfile": {"type": "RuntimeDefault"}}
    if restricted(backend, engine):
        wanted = backend.spec.pod_security
        uid = (wanted.run_as_user if wanted else None) or NON_ROOT_UID
        pod |= {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": uid,
            "fsGroup": uid,  # the cache volumes become writable
            # A weight cache of many GB is chowned once, not on every mount.
            "fsGroupChangePolicy": "OnRootMismatch",
        }
    return pod


def _strategy(backend: LLMBackend) -> Manifest:
    """GPU backends roll without surging: a surge pod would wait for a spare GPU forever."""
    custom = backend.spec.strategy
    if custom is not None:
        out: Manifest = {"type": str(custom.type)}
        rolling = {
            k: v
            for k, v in (("maxSurge", custom.max_surge), ("maxUnavailable", custom.max_unavailable))
            if v is not None
        }
        if rolling:
            out["rollingUpdate"] = rolling
        return out
    cache = backend.spec.cache
    claim = cache.persistent_volume_claim if cache else None
    # A surge pod cannot mount a ReadWriteOncePod claim the old pod holds, nor a
    # ReadWriteOnce one from another node (Multi-Attach): replace, do not surge.
    single_node = claim is not None and claim.access_mode != "ReadWriteMany"
    if backend.spec.gpu_count or single_node:
        return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    return {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


def _pod_spec(backend: LLMBackend, engine: EngineContainer, config: OperatorConfig) -> Manifest:
    spec = backend.spec
    volumes = [*engine.volumes, cache_volume(backend)]
    if restricted(backend, engine):
        volumes.append(empty_dir(HOME_VOLUME, HOME)[0])
    if spec.source.pvc:
        volumes.append(
            {
                "name": "model",
                "persistentVolumeClaim": {
                    "claimName": spec.source.pvc.claim_name,
                    "readOnly": True,
                },
            }
        )
    pod: Manifest = {
        # Service links inject e.g. VLLM_PORT for a Service named "vllm", which vLLM
        # mistakes for its own setting; engines need no API access either.
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "securityContext": _pod_security(backend, engine),
        "containers": [_container(backend, engine, config)],
        "volumes": volumes,
    }
    preload = preload_container(backend, engine)
    if preload is not None:
        # The user's HF_HOME, HF_ENDPOINT, proxies... apply to the download as to the engine.
        preload["env"] = _with_user_env(backend, preload["env"])
    inits = [*([preload] if preload else []), *engine.init_containers]
    if inits:
        pod["initContainers"] = [
            {
                **c,
                # The engine's own image (the pull, the preload) follows the mirror too.
                "image": image(backend, engine, config)
                if c["image"] == engine.image
                else c["image"],
                "env": _shared_env(backend, engine)
                + [e for e in c.get("env") or [] if e["name"] not in _HOME_NAMES],
                "volumeMounts": _shared_mounts(backend, engine) + list(c.get("volumeMounts") or []),
                "securityContext": container_security(),
            }
            for c in inits
        ]
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s.name} for s in spec.image_pull_secrets]
    where = placement(backend, config)
    if where.node_selector:
        pod["nodeSelector"] = where.node_selector
    if where.tolerations:
        pod["tolerations"] = where.tolerations
    if where.affinity:
        pod["affinity"] = where.affinity
    if spec.priority_class_name:
        pod["priorityClassName"] = spec.priority_class_name
    return pod


def engine_container(backend: LLMBackend) -> EngineContainer:
    return ENGINES[backend.spec.engine](backend)


def deployment(backend: LLMBackend, config: OperatorConfig = DEFAULT) -> Manifest:
    engine = engine_container(backend)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": backend.name,
            "namespace": backend.namespace,
            "labels": labels(backend),
        },
        "spec": {
            "replicas": backend.spec.replicas,
            "selector": {"matchLabels": selector_labels(backend)},
            "strategy": _strategy(backend),
            "template": {
                "metadata": {"labels": labels(backend)},
                "spec": _pod_spec(backend, engine, config),
            },
        },
    }


def service(backend: LLMBackend) -> Manifest:
    svc = backend.spec.service
    metadata: Manifest = {
        "name": backend.name,
        "namespace": backend.namespace,
        "labels": labels(backend),
    }
    if svc and svc.annotations:
        metadata["annotations"] = dict(svc.annotations)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "type": str(svc.type) if svc else "ClusterIP",
            "selector": selector_labels(backend),
            "ports": [
                {
                    "name": PORT_NAME,
                    "port": service_port(backend),
                    "targetPort": PORT_NAME,
                    # v1.20 server-side apply needs protocol spelled out in list keys.
                    "protocol": "TCP",
                }
            ],
        },
    }


GATEWAY_POD_LABELS = {"app.kubernetes.io/name": "fabric-gateway"}
# Set by the API server on every namespace from Kubernetes 1.21 (NamespaceDefaultLabelName)
# and kept equal to its name, so it cannot be forged; on 1.20 the admin sets it by hand.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
# Where the gateway runs when nobody said (`OperatorConfig.gateway_namespace` unset: the
# CLI sets the operator's own namespace).
DEFAULT_GATEWAY_NAMESPACE = "default"
CLIENT_LABEL = "llm.fabric.dev/client"
CLIENT_PEER: Manifest = {"podSelector": {"matchLabels": {CLIENT_LABEL: "true"}}}


def gateway_peer(namespace: str) -> Manifest:
    """The gateway's pods, in the gateway's namespace only: a pod that carries the
    gateway's label in any other namespace (a team's own) is not admitted."""
    return {
        "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: namespace}},
        "podSelector": {"matchLabels": dict(GATEWAY_POD_LABELS)},
    }


def network_policy(backend: LLMBackend, config: OperatorConfig = DEFAULT) -> Manifest | None:
    """Only the allowed clients reach the engine port (spec.networkPolicy, else the
    operator's default); None when no policy is wanted."""
    wanted = backend.spec.network_policy
    if not (wanted.enabled if wanted is not None else config.network_policy):
        return None
    peers = (
        [p.model_dump(by_alias=True, exclude_none=True) for p in wanted.from_]
        if wanted is not None and wanted.from_
        else [
            gateway_peer(config.gateway_namespace or DEFAULT_GATEWAY_NAMESPACE),
            dict(CLIENT_PEER),
        ]
    )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": backend.name,
            "namespace": backend.namespace,
            "labels": labels(backend),
        },
        "spec": {
            "podSelector": {"matchLabels": selector_labels(backend)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": peers,
                    "ports": [{"port": engine_port(backend), "protocol": "TCP"}],
                }
            ],
        },
    }


def disruption_budget(
    backend: LLMBackend,
    config: OperatorConfig = DEFAULT,
    policy_version: str = "v1",
    evict_unhealthy: bool = False,
) -> Manifest | None:
    """A node drain takes one replica at a time (maxUnavailable 1), never the model away:
    for backends of more than one replica (with one, the budget would protect nothing).
    `evict_unhealthy` (servers from 1.27): pods that are not ready may always be evicted,
    so a backend whose pods all crash never blocks a drain."""
    if not config.pod_disruption_budgets or backend.spec.replicas < 2:
        return None
    spec: Manifest = {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(backend)}}
    if evict_unhealthy:
        spec["unhealthyPodEvictionPolicy"] = "AlwaysAllow"
    return {
        "apiVersion": f"policy/{policy_version}",
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": backend.name,
            "namespace": backend.namespace,
            "labels": labels(backend),
        },
        "spec": spec,
    }


def render(
    backend: LLMBackend,
    config: OperatorConfig = DEFAULT,
    *,
    policy_version: str = "v1",
    evict_unhealthy: bool = False,
) -> Children:
    """The children of a *valid* backend (see fabric_operator.validation). `policy_version`:
    the PodDisruptionBudget API version the server takes (v1beta1 before 1.21);
    `evict_unhealthy`: the server knows unhealthyPodEvictionPolicy (1.27 and later)."""
    return Children(
        deployment=deployment(backend, config),
        service=service(backend),
        network_policy=network_policy(backend, config),
        cache_claim=cache_claim(backend, labels(backend)),
        disruption_budget=disruption_budget(backend, config, policy_version, evict_unhealthy),
    )
