"""The weight cache (spec.cache): what backs the engine's download directory.

Unset, an emptyDir without a limit (as before). With a size, the emptyDir is capped and
the pod requests that much ephemeral storage, so the scheduler picks a node with the
room. With a claim, the weights survive pod restarts: the backend's own claim (named after
it, owned by it, pruned when the cache is turned off) or one claim per model shared by the
namespace's backends of that model (created once, never deleted by the operator).
"""

from __future__ import annotations

import hashlib
import json

from fabric_operator.api.backend import LLMBackend
from fabric_operator.render.engine import CACHE_VOLUME, EngineContainer, Manifest, plain_env

CACHE_COMPONENT = "model-cache"
SHARED_PREFIX = "fabric-cache-"
PRELOAD_CONTAINER = "preload-weights"

# Run by the image's own Python (huggingface_hub comes with every engine that reads the
# Hub): the files the engines load, not the duplicates some repositories carry (pickled
# .bin beside safetensors, original/ checkpoints), into HF_HOME on the cache volume, where
# the engine then finds them.
PRELOAD_SCRIPT = """\
import sys
from huggingface_hub import HfApi, snapshot_download
repo, revision = sys.argv[1], sys.argv[2] or None
skip = ["original/*", "*.pt", "*.pth", "*.gguf", "*.onnx", "*.msgpack", "*.h5"]
try:
    files = HfApi().list_repo_files(repo, revision=revision)
except Exception as err:  # the Hub unreachable: the weights may be in the cache already
    print("cannot list", repo, "on the Hub:", type(err).__name__, "- trying the cache")
    path = snapshot_download(repo, revision=revision, local_files_only=True)
    print("weights ready in", path)
    sys.exit(0)
if any(f.endswith(".safetensors") for f in files):
    skip.append("*.bin")
    if any(f.endswith("model.safetensors.index.json") for f in files):
        skip.append("consolidated*.safetensors")  # Mistral's second copy of the weights
print("weights ready in", snapshot_download(repo, revision=revision, ignore_patterns=skip))
"""


def claim_name(backend: LLMBackend) -> str | None:
    """The claim the cache lives on, or None for an emptyDir."""
    cache = backend.spec.cache
    claim = cache.persistent_volume_claim if cache else None
    if claim is None:
        return None
    return shared_claim_name(backend) if claim.shared else backend.name


def shared_claim_name(backend: LLMBackend) -> str:
    """One name per model source (repo, revision, file, URL, tag or claim path); a URL
    without its query, which for a presigned URL changes with every signature."""
    source = backend.spec.source.model_dump(by_alias=True, exclude_none=True)
    if "url" in source:
        source["url"] = source["url"].split("?", 1)[0].split("#", 1)[0]
    digest = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()
    return f"{SHARED_PREFIX}{digest[:16]}"


def cache_volume(backend: LLMBackend) -> Manifest:
    """The pod volume named CACHE_VOLUME."""
    name = claim_name(backend)
    if name is not None:
        return {"name": CACHE_VOLUME, "persistentVolumeClaim": {"claimName": name}}
    cache = backend.spec.cache
    source: Manifest = {"sizeLimit": str(cache.size)} if cache and cache.size else {}
    return {"name": CACHE_VOLUME, "emptyDir": source}


def ephemeral_request(backend: LLMBackend) -> str | None:
    """The ephemeral-storage request of a sized emptyDir cache."""
    cache = backend.spec.cache
    if cache is None or cache.size is None or cache.persistent_volume_claim is not None:
        return None
    return str(cache.size)


def _claim(backend: LLMBackend, name: str, labels: dict[str, str]) -> Manifest:
    cache = backend.spec.cache
    assert cache is not None and cache.persistent_volume_claim is not None
    claim = cache.persistent_volume_claim
    spec: Manifest = {
        "accessModes": [str(claim.access_mode)],
        "resources": {"requests": {"storage": str(cache.size)}},
    }
    if claim.storage_class_name:
        spec["storageClassName"] = claim.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": backend.namespace, "labels": labels},
        "spec": spec,
    }


def cache_claim(backend: LLMBackend, labels: dict[str, str]) -> Manifest | None:
    """The backend's own cache claim (a child like the Deployment), if it asks for one."""
    cache = backend.spec.cache
    claim = cache.persistent_volume_claim if cache else None
    if claim is None or claim.shared:
        return None
    return _claim(backend, backend.name, {**labels, "app.kubernetes.io/component": CACHE_COMPONENT})


def shared_cache_claim(backend: LLMBackend, managed_by: str) -> Manifest | None:
    """The namespace's claim for this model, if the backend shares one: no owner and no
    backend label (it outlives every backend that uses it)."""
    cache = backend.spec.cache
    claim = cache.persistent_volume_claim if cache else None
    if claim is None or not claim.shared:
        return None
    return _claim(
        backend,
        shared_claim_name(backend),
        {
            "app.kubernetes.io/name": "fabric-model-cache",
            "app.kubernetes.io/component": CACHE_COMPONENT,
            "app.kubernetes.io/managed-by": managed_by,
            "app.kubernetes.io/part-of": "fabric",
        },
    )


def preload_container(backend: LLMBackend, engine: EngineContainer) -> Manifest | None:
    """The init container that downloads the weights first (spec.cache.preload), for a
    Hugging Face source on an engine whose image has huggingface_hub."""
    spec = backend.spec
    cache = spec.cache
    hf = spec.model.huggingface if spec.model else None
    if cache is None or not cache.preload or hf is None or engine.python is None:
        return None
    env = [e for e in engine.env if e["name"] in ("HF_HOME", "HF_TOKEN")]
    env.append(plain_env("HF_HUB_DISABLE_PROGRESS_BARS", "1"))
    out: Manifest = {
        "name": PRELOAD_CONTAINER,
        "image": spec.image or engine.image,
        "command": [engine.python, "-c", PRELOAD_SCRIPT, hf.repo, hf.revision or ""],
        "env": env,
    }
    if spec.image_pull_policy:
        out["imagePullPolicy"] = spec.image_pull_policy
    return out
