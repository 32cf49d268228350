"""What an engine module contributes to the pod, and helpers the engine modules share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fabric_operator.api.backend import LLMBackend
from fabric_operator.api.v1alpha1 import SecretKeyRef

Manifest = dict[str, Any]

# Where a PVC model source is mounted (read-only) in the engine container.
MODEL_MOUNT = "/models"
PORT_NAME = "http"
# The volume the engine downloads weights to (spec.cache decides what backs it).
CACHE_VOLUME = "cache"
CACHE_PATH = "/cache"


@dataclass(frozen=True)
class EngineContainer:
    """The engine-specific part of the pod: the common code wraps it in a Deployment."""

    image: str
    port: int
    args: list[str]
    command: list[str] | None = None
    env: list[Manifest] = field(default_factory=list)
    volumes: list[Manifest] = field(default_factory=list)
    volume_mounts: list[Manifest] = field(default_factory=list)
    init_containers: list[Manifest] = field(default_factory=list)
    # Where the engine downloads weights (its env points there): the cache volume, backed
    # by what spec.cache asks for, is mounted here in the engine and its init containers.
    cache_path: str = CACHE_PATH
    # The image's Python, if it has huggingface_hub: spec.cache.preload runs it in an init
    # container to download the weights into the cache first. None: no preload.
    python: str | None = None
    # The image runs as any user once HOME and its caches are writable volumes (Pod
    # Security restricted by default); False: it needs its own user (often root), so the
    # default profile is baseline.
    non_root: bool = True
    # None: a TCP connect (for a server that listens only once its model is loaded and
    # has no health route).
    liveness_path: str | None = "/health"
    readiness_path: str | None = "/health"
    # Long first starts (weight downloads) must not trip the liveness probe: the startup
    # probe allows startup_seconds before liveness takes over.
    startup_seconds: int = 1800


def secret_env(name: str, ref: SecretKeyRef) -> Manifest:
    """An env var read from a Secret at pod start: the value never enters the spec."""
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def secrets_env(backend: LLMBackend, key_variable: str) -> list[Manifest]:
    """HF_TOKEN and the engine's API-key variable, from the spec's Secret references."""
    spec, out = backend.spec, []
    if spec.hf_token_secret_ref:
        out.append(secret_env("HF_TOKEN", spec.hf_token_secret_ref))
    if spec.api_key_secret_ref:
        out.append(secret_env(key_variable, spec.api_key_secret_ref))
    return out


def plain_env(name: str, value: str) -> Manifest:
    return {"name": name, "value": value}


def empty_dir(
    name: str, mount_path: str, medium: str | None = None, size: str | None = None
) -> tuple[Manifest, Manifest]:
    """An emptyDir volume and its mount."""
    source: Manifest = {}
    if medium:
        source["medium"] = medium
    if size:
        source["sizeLimit"] = size
    return {"name": name, "emptyDir": source}, {"name": name, "mountPath": mount_path}


def shm_volume(backend: LLMBackend) -> tuple[Manifest, Manifest]:
    """/dev/shm in memory: NCCL and PyTorch workers exchange tensors through it."""
    size = f"{max(1, backend.spec.gpu_count) * 2}Gi"
    return empty_dir("dshm", "/dev/shm", medium="Memory", size=size)


def pvc_model_path(backend: LLMBackend) -> str | None:
    """The in-container path of a PVC model source, or None for other sources."""
    pvc = backend.spec.source.pvc
    return f"{MODEL_MOUNT}/{pvc.path.strip('/')}" if pvc else None


def flag(args: list[str], name: str, value: object | None) -> None:
    """Append `name value` when value is set."""
    if value is not None:
        args.extend([name, str(value)])


def tensor_parallel(backend: LLMBackend) -> int:
    """Tensor parallelism: as asked, else one shard per GPU of the replica."""
    return backend.spec.options.tensor_parallel or max(1, backend.spec.gpu_count)
