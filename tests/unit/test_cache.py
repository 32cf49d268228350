"""spec.cache: what backs each engine's download directory, the claims, the preload."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from fabric_operator.api.backend import LLMBackend
from fabric_operator.render import render
from fabric_operator.render.cache import PRELOAD_SCRIPT, shared_cache_claim, shared_claim_name
from fabric_operator.validation import validate

REPO = "Qwen/Qwen2.5-0.5B-Instruct"
GPU1 = {"resources": {"gpu": {"count": 1}}}
BASE: dict[str, dict[str, Any]] = {
    "vllm": {"engine": "vllm", "model": {"huggingface": {"repo": REPO}}, **GPU1},
    "tgi": {"engine": "tgi", "model": {"huggingface": {"repo": REPO}}, **GPU1},
    "sglang": {"engine": "sglang", "model": {"huggingface": {"repo": REPO}}, **GPU1},
    "llamacpp": {"engine": "llamacpp", "model": {"url": "https://h.invalid/m.gguf"}},
    "ollama": {"engine": "ollama", "model": {"ollama": "qwen3:4b"}},
}
# Where each engine downloads (its env points there): the cache volume is mounted there.
CACHE_PATHS = {"vllm": "/cache", "tgi": "/data", "sglang": "/cache", "llamacpp": "/cache"}
CACHE_PATHS["ollama"] = "/cache"
CACHE_ENV = {
    "vllm": ("HF_HOME", "/cache/huggingface"),
    "tgi": ("HF_HOME", "/data"),
    "sglang": ("HF_HOME", "/cache/huggingface"),
    "llamacpp": ("LLAMA_CACHE", "/cache"),
    "ollama": ("OLLAMA_MODELS", "/cache/models"),
}


def manifest(spec: dict[str, Any], name: str = "m") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns", "uid": "u1"}, "spec": spec}


def backend(spec: dict[str, Any], name: str = "m") -> LLMBackend:
    parsed, problems = validate(manifest(spec, name))
    assert problems == [] and parsed is not None, problems
    return parsed


def pod(spec: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = render(backend(spec)).deployment["spec"]["template"]["spec"]
    return result


def volume(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    [found] = [v for v in pod_spec["volumes"] if v["name"] == name]
    return found


def problems(spec: dict[str, Any]) -> list[tuple[str, str]]:
    _, found = validate(manifest(spec))
    return [(p.field, p.message) for p in found]


@pytest.mark.parametrize("engine", list(BASE))
def test_the_cache_volume_is_where_each_engine_downloads(engine: str) -> None:
    spec = pod(BASE[engine])
    assert volume(spec, "cache") == {"name": "cache", "emptyDir": {}}  # unbounded, as before
    for c in spec["containers"] + spec.get("initContainers", []):
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert mounts["cache"] == CACHE_PATHS[engine], c["name"]
    name, value = CACHE_ENV[engine]
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert env[name] == value and value.startswith(CACHE_PATHS[engine])


@pytest.mark.parametrize("engine", list(BASE))
def test_a_sized_cache_is_a_capped_empty_dir_and_an_ephemeral_storage_request(
    engine: str,
) -> None:
    spec = pod({**BASE[engine], "cache": {"size": "40Gi"}})
    assert volume(spec, "cache") == {"name": "cache", "emptyDir": {"sizeLimit": "40Gi"}}
    requests = spec["containers"][0]["resources"]["requests"]
    assert requests["ephemeral-storage"] == "40Gi"
    assert render(backend({**BASE[engine], "cache": {"size": "40Gi"}})).cache_claim is None


def test_an_own_claim_is_named_after_the_backend_owned_and_applied_before_the_pods() -> None:
    cache = {
        "size": "100Gi",
        "persistentVolumeClaim": {"storageClassName": "fast", "accessMode": "ReadWriteMany"},
    }
    children = render(backend({**BASE["vllm"], "cache": cache}))
    claim = children.cache_claim
    assert claim == {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": "m",
            "namespace": "ns",
            "labels": {
                "app.kubernetes.io/name": "vllm",
                "app.kubernetes.io/instance": "m",
                "app.kubernetes.io/component": "model-cache",
                "app.kubernetes.io/managed-by": "fabric-operator",
                "app.kubernetes.io/part-of": "fabric",
                "llm.fabric.dev/backend": "m",
            },
        },
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "resources": {"requests": {"storage": "100Gi"}},
            "storageClassName": "fast",
        },
    }
    kinds = [m["kind"] for m in children.all()]
    assert kinds.index("PersistentVolumeClaim") < kinds.index("Deployment")
    spec = children.deployment["spec"]["template"]["spec"]
    assert volume(spec, "cache") == {"name": "cache", "persistentVolumeClaim": {"claimName": "m"}}
    # No ephemeral-storage request: the weights are on the claim.
    assert "requests" not in spec["containers"][0]["resources"] or (
        "ephemeral-storage" not in spec["containers"][0]["resources"]["requests"]
    )


def test_a_shared_claim_is_one_per_model_never_owned_nor_a_child() -> None:
    cache = {"size": "100Gi", "persistentVolumeClaim": {"shared": True}}
    a = backend({**BASE["vllm"], "cache": cache}, name="a")
    b = backend({**BASE["sglang"], "cache": cache}, name="b")
    assert render(a).cache_claim is None
    assert shared_claim_name(a) == shared_claim_name(b)  # same model, one claim
    other = backend(
        {**BASE["vllm"], "model": {"huggingface": {"repo": REPO, "revision": "v2"}}, "cache": cache}
    )
    assert shared_claim_name(other) != shared_claim_name(a)  # another revision, another claim
    claim = shared_cache_claim(a, "fabric-operator")
    assert claim is not None
    assert claim["metadata"]["name"] == shared_claim_name(a)
    assert claim["metadata"]["name"].startswith("fabric-cache-")
    assert "llm.fabric.dev/backend" not in claim["metadata"]["labels"]
    assert claim["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "100Gi"}},
    }
    spec = render(a).deployment["spec"]["template"]["spec"]
    assert volume(spec, "cache")["persistentVolumeClaim"] == {"claimName": shared_claim_name(a)}


def test_preload_downloads_into_the_engines_hf_home_before_it_starts() -> None:
    spec = pod(
        {
            **BASE["vllm"],
            "model": {"huggingface": {"repo": REPO, "revision": "abc123"}},
            "hfTokenSecretRef": {"name": "hf", "key": "t"},
            "apiKeySecretRef": {"name": "k", "key": "v"},
            "imagePullPolicy": "IfNotPresent",
            "cache": {"preload": True},
        }
    )
    [init] = spec["initContainers"]
    assert init["name"] == "preload-weights"
    assert init["image"] == spec["containers"][0]["image"]
    assert init["command"] == ["python3", "-c", PRELOAD_SCRIPT, REPO, "abc123"]
    env = {e["name"]: e for e in init["env"]}
    assert env["HF_HOME"]["value"] == "/cache/huggingface"
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "t"}}
    assert "VLLM_API_KEY" not in env  # the serving key is not the downloader's
    assert init["imagePullPolicy"] == "IfNotPresent"
    assert {"name": "cache", "mountPath": "/cache"} in init["volumeMounts"]
    assert init["securityContext"] == spec["containers"][0]["securityContext"]


def test_the_preload_script_is_valid_python_that_reads_its_arguments() -> None:
    compile(PRELOAD_SCRIPT, "<preload>", "exec")
    # Without huggingface_hub (as here) it fails at the import, not on a syntax error.
    run = subprocess.run(
        [sys.executable, "-I", "-S", "-c", PRELOAD_SCRIPT, "o/r", ""],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode != 0 and "huggingface_hub" in run.stderr


@pytest.mark.parametrize(
    ("spec", "field", "says"),
    [
        ({**BASE["vllm"], "cache": {"persistentVolumeClaim": {}}}, "spec.cache.size", "required"),
        ({**BASE["vllm"], "cache": {"size": "0"}}, "spec.cache.size", "more than 0"),
        ({**BASE["llamacpp"], "cache": {"preload": True}}, "spec.cache.preload", "Hugging Face"),
        ({**BASE["ollama"], "cache": {"preload": True}}, "spec.cache.preload", "ollama"),
        (
            {**BASE["vllm"], "model": {"pvc": {"claimName": "w", "path": "m"}}}
            | {"cache": {"preload": True}},
            "spec.cache.preload",
            "pvc",
        ),
        (
            {"engine": "llamacpp", "model": {"huggingface": {"repo": "o/r", "file": "f.gguf"}}}
            | {"cache": {"preload": True}},
            "spec.cache.preload",
            "no downloader",
        ),
        (
            {**BASE["vllm"], "model": {"pvc": {"claimName": "m", "path": "x"}}}
            | {"cache": {"size": "1Gi", "persistentVolumeClaim": {}}},
            "spec.cache.persistentVolumeClaim",
            "the claim the model is read from",
        ),
    ],
)
def test_cache_refusals(spec: dict[str, Any], field: str, says: str) -> None:
    found = problems(spec)
    assert any(f == field and says in m for f, m in found), found


def test_a_shared_claim_beside_a_model_claim_of_the_backends_name_is_fine() -> None:
    spec = {**BASE["vllm"], "model": {"pvc": {"claimName": "m", "path": "x"}}}
    spec["cache"] = {"size": "1Gi", "persistentVolumeClaim": {"shared": True}}
    assert problems(spec) == []


@pytest.mark.parametrize(
    ("mode", "surge"),
    [("ReadWriteOnce", 0), ("ReadWriteOncePod", 0), ("ReadWriteMany", 1)],
)
def test_a_single_node_claim_rolls_without_a_surge_pod(mode: str, surge: int) -> None:
    cache = {"size": "1Gi", "persistentVolumeClaim": {"accessMode": mode}}
    strategy = render(backend({**BASE["llamacpp"], "cache": cache})).deployment["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxSurge"] == surge
    assert strategy["rollingUpdate"]["maxUnavailable"] == 1 - surge
    # The user's own strategy still wins.
    own = {"type": "Recreate"}
    spec = {**BASE["llamacpp"], "cache": cache, "strategy": own}
    assert render(backend(spec)).deployment["spec"]["strategy"] == own


@pytest.mark.parametrize(
    "fields",
    [
        {"replicas": 2},
        {"autoscaling": {"minReplicas": 0, "maxReplicas": 3}},
        {
            "cache": {
                "size": "1Gi",
                "persistentVolumeClaim": {"accessMode": "ReadWriteOncePod", "shared": True},
            }
        },
    ],
)
def test_read_write_once_pod_serves_one_pod_only(fields: dict[str, Any]) -> None:
    cache = {"size": "1Gi", "persistentVolumeClaim": {"accessMode": "ReadWriteOncePod"}}
    found = problems({**BASE["llamacpp"], "cache": cache, **fields})
    assert [f for f, _ in found] == ["spec.cache.persistentVolumeClaim.accessMode"]
    assert problems({**BASE["llamacpp"], "cache": cache}) == []  # one replica: fine


def test_a_presigned_url_keeps_its_claim_when_its_signature_changes() -> None:
    cache = {"size": "1Gi", "persistentVolumeClaim": {"shared": True}}
    url = "https://bucket.invalid/m.gguf"
    a = backend({"engine": "llamacpp", "model": {"url": f"{url}?X-Sig=1"}, "cache": cache})
    b = backend({"engine": "llamacpp", "model": {"url": f"{url}?X-Sig=2"}, "cache": cache})
    c = backend({"engine": "llamacpp", "model": {"url": f"{url}2"}, "cache": cache})
    assert shared_claim_name(a) == shared_claim_name(b) != shared_claim_name(c)


def test_preload_takes_the_users_hub_settings() -> None:
    spec = pod(
        {
            **BASE["vllm"],
            "cache": {"preload": True},
            "env": [
                {"name": "HF_HOME", "value": "/cache/hf"},
                {"name": "HF_ENDPOINT", "value": "https://hub-mirror.invalid"},
            ],
        }
    )
    [init] = spec["initContainers"]
    env = {e["name"]: e.get("value") for e in init["env"]}
    assert env["HF_HOME"] == "/cache/hf"  # where the engine (with the same env) reads
    assert env["HF_ENDPOINT"] == "https://hub-mirror.invalid"
    names = [e["name"] for e in init["env"]]
    assert len(names) == len(set(names))
    engine_env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert engine_env["HF_HOME"] == "/cache/hf"
