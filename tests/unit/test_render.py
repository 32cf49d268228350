"""Rendering: every engine's Deployment and Service, field by field."""

from __future__ import annotations

import shlex
from typing import Any

import pytest

from fabric_operator.api.backend import LLMBackend
from fabric_operator.config import OperatorConfig
from fabric_operator.render import llamacpp, llamacpp_python, ollama, render, tgi, vllm
from fabric_operator.render.workload import endpoint
from fabric_operator.validation import validate

REPO = "Qwen/Qwen2.5-0.5B-Instruct"
URL = "https://h.invalid/m.gguf"
TAG = "llama3.2:1b"
GPU1 = {"gpu": {"count": 1}}
BASE: dict[str, dict[str, Any]] = {
    "vllm": {"engine": "vllm", "model": {"huggingface": {"repo": REPO}}, "resources": GPU1},
    "tgi": {"engine": "tgi", "model": {"huggingface": {"repo": REPO}}, "resources": GPU1},
    "llamacpp": {"engine": "llamacpp", "model": {"url": URL}},
    "llamacpp-python": {
        "engine": "llamacpp-python",
        "model": {"pvc": {"claimName": "weights", "path": "qwen2.5-0.5b-q4.gguf"}},
    },
    "ollama": {"engine": "ollama", "model": {"ollama": TAG}},
}
ENGINES = list(BASE)
PORTS = {"vllm": 8000, "tgi": 8080, "llamacpp": 8080, "llamacpp-python": 8000, "ollama": 11434}
API_KEY = {"name": "keys", "key": "api"}
HF_TOKEN = {"name": "hf", "key": "token"}


def backend(spec: dict[str, Any], name: str = "m", namespace: str = "ns") -> LLMBackend:
    """A backend that passed validation (rendering is only defined for those)."""
    manifest = {"metadata": {"name": name, "namespace": namespace, "uid": "u1"}, "spec": spec}
    parsed, problems = validate(manifest)
    assert problems == [], problems
    assert parsed is not None
    return LLMBackend.from_manifest(manifest)


def spec(engine: str, **fields: Any) -> dict[str, Any]:
    return {**BASE[engine], **fields}


def pod(engine: str, **fields: Any) -> dict[str, Any]:
    result: dict[str, Any] = render(backend(spec(engine, **fields))).deployment["spec"]["template"][
        "spec"
    ]
    return result


def container(engine: str, **fields: Any) -> dict[str, Any]:
    containers = pod(engine, **fields)["containers"]
    assert len(containers) == 1
    assert containers[0]["name"] == "engine"
    result: dict[str, Any] = containers[0]
    return result


def gpus(count: int, vendor: str = "nvidia") -> dict[str, Any]:
    return {"resources": {"gpu": {"count": count, "vendor": vendor}}}


def pvc(path: str) -> dict[str, Any]:
    return {"model": {"pvc": {"claimName": "weights", "path": path}}}


# --- image and command ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("engine", "fields", "image"),
    [
        ("vllm", gpus(1), "vllm/vllm-openai:v0.11.0"),
        ("vllm", gpus(2, "amd"), "rocm/vllm:rocm7.0.0_vllm_0.11.2_20251210"),
        ("tgi", gpus(1), "ghcr.io/huggingface/text-generation-inference:3.3.5"),
        ("tgi", gpus(1, "amd"), "ghcr.io/huggingface/text-generation-inference:3.3.5-rocm"),
        ("llamacpp", {}, "ghcr.io/ggml-org/llama.cpp:server-b10290"),
        ("llamacpp", gpus(0, "amd"), "ghcr.io/ggml-org/llama.cpp:server-b10290"),
        ("llamacpp", gpus(1), "ghcr.io/ggml-org/llama.cpp:server-cuda-b10290"),
        ("llamacpp", gpus(1, "amd"), "ghcr.io/ggml-org/llama.cpp:server-rocm-b10290"),
        ("llamacpp-python", {}, "ghcr.io/abetlen/llama-cpp-python:v0.3.2"),
        ("ollama", {}, "ollama/ollama:0.13.5"),
        ("ollama", gpus(1), "ollama/ollama:0.13.5"),
        ("ollama", gpus(1, "amd"), "ollama/ollama:0.13.5-rocm"),
    ],
)
def test_default_image_per_vendor(engine: str, fields: dict[str, Any], image: str) -> None:
    template = pod(engine, **fields)
    assert template["containers"][0]["image"] == image
    for init in template.get("initContainers", []):
        assert init["image"] == image
    assert "imagePullPolicy" not in template["containers"][0]


@pytest.mark.parametrize("engine", ENGINES)
def test_image_and_pull_policy_override(engine: str) -> None:
    template = pod(engine, image="registry.example/engine:1", imagePullPolicy="Always")
    for c in template["containers"] + template.get("initContainers", []):
        assert c["image"] == "registry.example/engine:1"
        assert c["imagePullPolicy"] == "Always"


@pytest.mark.parametrize(
    ("engine", "command"),
    [
        ("vllm", ["vllm", "serve"]),
        ("tgi", None),
        ("llamacpp", None),
        ("llamacpp-python", ["python3", "-m", "llama_cpp.server"]),
        ("ollama", ["/bin/ollama"]),
    ],
)
def test_command(engine: str, command: list[str] | None) -> None:
    assert container(engine).get("command") == command


# --- args -------------------------------------------------------------------------------

VLLM_HEAD = ["--host", "0.0.0.0", "--port", "8000", "--served-model-name"]
TGI_HEAD = ["--hostname", "0.0.0.0", "--port", "8080"]
LLAMA_HEAD = ["--host", "0.0.0.0", "--port", "8080", "--alias", "m", "--metrics"]
PY_HEAD = ["--host", "0.0.0.0", "--port", "8000", "--model_alias", "m"]
# Tool calling, as render/toolcalls.py adds it after the engine's own args.
HERMES = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
JINJA = ["--jinja"]
CHATML_FC = ["--chat_format", "chatml-function-calling"]


@pytest.mark.parametrize(
    ("engine", "fields", "args"),
    [
        pytest.param("vllm", {}, [REPO, *VLLM_HEAD, "m", *HERMES], id="vllm-hf"),
        pytest.param(
            "vllm",
            {"model": {"huggingface": {"repo": REPO, "revision": "abc123"}}},
            [REPO, *VLLM_HEAD, "m", "--revision", "abc123", *HERMES],
            id="vllm-hf-revision",
        ),
        pytest.param(
            "vllm",
            {**pvc("weights/qwen/"), "servedModelName": "chat"},
            ["/models/weights/qwen", *VLLM_HEAD, "chat"],
            id="vllm-pvc-served-name",
        ),
        pytest.param(
            "vllm",
            {
                **gpus(4),
                "engineOptions": {
                    "contextLength": 8192,
                    "gpuMemoryUtilization": 0.9,
                    "quantization": "awq",
                    "dtype": "bfloat16",
                },
            },
            [
                *[REPO, *VLLM_HEAD, "m"],
                *["--tensor-parallel-size", "4", "--max-model-len", "8192"],
                *["--gpu-memory-utilization", "0.9", "--quantization", "awq"],
                *["--dtype", "bfloat16", *HERMES],
            ],
            id="vllm-options-default-tp",
        ),
        pytest.param(
            "vllm",
            {**gpus(4), "engineOptions": {"tensorParallel": 2}},
            [REPO, *VLLM_HEAD, "m", "--tensor-parallel-size", "2", *HERMES],
            id="vllm-explicit-tp",
        ),
        pytest.param(
            "vllm",
            {**gpus(2), "engineOptions": {"tensorParallel": 1}},
            [REPO, *VLLM_HEAD, "m", *HERMES],
            id="vllm-tp1-no-flag",
        ),
        pytest.param("tgi", {}, ["--model-id", REPO, *TGI_HEAD, "--num-shard", "1"], id="tgi-hf"),
        pytest.param(
            "tgi",
            {
                "model": {"huggingface": {"repo": REPO, "revision": "v1"}},
                **gpus(2),
                "engineOptions": {"contextLength": 4096, "quantization": "awq"},
            },
            [
                *["--model-id", REPO, *TGI_HEAD, "--revision", "v1", "--num-shard", "2"],
                *["--max-total-tokens", "4096", "--quantize", "awq"],
            ],
            id="tgi-options-default-shards",
        ),
        pytest.param(
            "tgi",
            {"engineOptions": {"dtype": "bfloat16"}},
            ["--model-id", REPO, *TGI_HEAD, "--num-shard", "1", "--dtype", "bfloat16"],
            id="tgi-dtype",
        ),
        pytest.param(
            "tgi",
            pvc("q"),
            ["--model-id", "/models/q", *TGI_HEAD, "--num-shard", "1"],
            id="tgi-pvc",
        ),
        pytest.param("llamacpp", {}, [*LLAMA_HEAD, "--model-url", URL, *JINJA], id="llamacpp-url"),
        pytest.param(
            "llamacpp",
            {"model": {"huggingface": {"repo": REPO, "file": "q4.gguf"}}},
            [*LLAMA_HEAD, "--hf-repo", REPO, "--hf-file", "q4.gguf", *JINJA],
            id="llamacpp-hf-file",
        ),
        pytest.param(
            "llamacpp",
            {"model": {"huggingface": {"repo": REPO}}},
            [*LLAMA_HEAD, "--hf-repo", REPO, *JINJA],
            id="llamacpp-hf-no-file",
        ),
        pytest.param(
            "llamacpp",
            {**pvc("gguf/m.gguf"), **gpus(1), "engineOptions": {"contextLength": 4096}},
            [
                *[*LLAMA_HEAD, "--model", "/models/gguf/m.gguf"],
                *["--ctx-size", "4096", "--n-gpu-layers", "999", *JINJA],
            ],
            id="llamacpp-pvc-gpu-ctx",
        ),
        pytest.param(
            "llamacpp-python",
            {},
            [*PY_HEAD, "--model", "/models/qwen2.5-0.5b-q4.gguf", *CHATML_FC],
            id="llamacpp-python-pvc",
        ),
        pytest.param(
            "llamacpp-python",
            {
                "model": {"huggingface": {"repo": "bartowski/Llama-3.2-1B-GGUF", "file": "*q4*"}},
                "engineOptions": {"contextLength": 4096},
                "image": "registry.example/lcp-with-hf-hub:1",  # the pinned one cannot download
            },
            [
                *[*PY_HEAD, "--hf_model_repo_id", "bartowski/Llama-3.2-1B-GGUF"],
                *["--model", "*q4*", "--n_ctx", "4096"],
            ],
            id="llamacpp-python-hf-not-chatml",
        ),
        pytest.param(
            "llamacpp-python",
            {**gpus(1), "image": "registry.example/lcp:cuda"},
            [
                *PY_HEAD,
                "--model",
                "/models/qwen2.5-0.5b-q4.gguf",
                "--n_gpu_layers",
                "-1",
                *CHATML_FC,
            ],
            id="llamacpp-python-gpu",
        ),
        pytest.param("ollama", {}, ["serve"], id="ollama"),
        pytest.param(
            "ollama", {"engineOptions": {"contextLength": 4096}}, ["serve"], id="ollama-ctx-in-env"
        ),
    ],
)
def test_args(engine: str, fields: dict[str, Any], args: list[str]) -> None:
    assert container(engine, **fields)["args"] == args


@pytest.mark.parametrize("engine", ["vllm", "tgi", "llamacpp", "llamacpp-python"])
def test_extra_args_come_after_the_engine_args(engine: str) -> None:
    extra = ["--trust-remote-code", "--seed=7"]
    own = container(engine)["args"]
    assert container(engine, extraArgs=extra)["args"] == own + extra


# --- ports, Service, endpoint -----------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("override", [None, 80])
def test_ports_service_and_endpoint(engine: str, override: int | None) -> None:
    fields = {"service": {"port": override}} if override else {}
    b = backend(spec(engine, **fields))
    children = render(b)
    port = override or PORTS[engine]
    c = children.deployment["spec"]["template"]["spec"]["containers"][0]
    assert c["ports"] == [{"name": "http", "containerPort": PORTS[engine], "protocol": "TCP"}]
    svc = children.service
    assert (svc["apiVersion"], svc["kind"]) == ("v1", "Service")
    assert svc["metadata"]["name"] == "m" and svc["metadata"]["namespace"] == "ns"
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}
    ]
    assert svc["spec"]["type"] == "ClusterIP"
    assert "annotations" not in svc["metadata"]
    assert endpoint(b) == f"http://m.ns.svc.cluster.local:{port}/v1"
    assert endpoint(b, "corp.internal") == f"http://m.ns.svc.corp.internal:{port}/v1"


def test_service_type_and_annotations() -> None:
    annotations = {"service.beta.kubernetes.io/aws-load-balancer-internal": "true"}
    svc = render(
        backend(spec("llamacpp", service={"type": "LoadBalancer", "annotations": annotations}))
    ).service
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["metadata"]["annotations"] == annotations


def test_children_order_and_deployment_identity() -> None:
    children = render(backend(spec("vllm", replicas=3), name="qwen", namespace="ai"))
    assert children.all() == [children.deployment, children.service]
    dep = children.deployment
    assert (dep["apiVersion"], dep["kind"]) == ("apps/v1", "Deployment")
    assert dep["metadata"]["name"] == "qwen" and dep["metadata"]["namespace"] == "ai"
    assert dep["spec"]["replicas"] == 3


def test_namespace_defaults_to_default() -> None:
    b = LLMBackend.from_manifest({"metadata": {"name": "m"}, "spec": BASE["llamacpp"]})
    assert render(b).deployment["metadata"]["namespace"] == "default"
    assert endpoint(b) == "http://m.default.svc.cluster.local:8080/v1"


# --- probes -----------------------------------------------------------------------------


def _probe(path: str | None, period: int, failures: int) -> dict[str, Any]:
    # llama-cpp-python has no health route and listens only once the model is loaded.
    action = (
        {"httpGet": {"path": path, "port": "http"}} if path else {"tcpSocket": {"port": "http"}}
    )
    return {
        **action,
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


@pytest.mark.parametrize(
    ("engine", "live", "ready", "startup_failures"),
    [
        ("vllm", "/health", "/health", 900),
        ("tgi", "/health", "/health", 900),
        ("llamacpp", "/health", "/health", 900),
        ("llamacpp-python", None, None, 900),
        ("ollama", "/", "/api/tags", 300),
    ],
)
def test_probes(engine: str, live: str | None, ready: str | None, startup_failures: int) -> None:
    c = container(engine)
    assert c["startupProbe"] == _probe(live, 2, startup_failures)
    assert c["livenessProbe"] == _probe(live, 10, 3)
    assert c["readinessProbe"] == _probe(ready, 5, 3)


# --- volumes ----------------------------------------------------------------------------


def _shm(size: str) -> dict[str, Any]:
    return {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": size}}


SHM_MOUNT = {"name": "dshm", "mountPath": "/dev/shm"}
PVC_VOLUME = {"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}}
PVC_MOUNT = {"name": "model", "mountPath": "/models", "readOnly": True}


CACHE = {"name": "cache", "emptyDir": {}}
CACHE_MOUNT = {"name": "cache", "mountPath": "/cache"}
HOME_VOLUME = {"name": "home", "emptyDir": {}}
HOME_MOUNT = {"name": "home", "mountPath": "/home/fabric"}
# Restricted engines: HOME on a volume of its own, and a user name (no passwd entry).
HOME_ENV = [
    {"name": "HOME", "value": "/home/fabric"},
    {"name": "USER", "value": "fabric"},
    {"name": "LOGNAME", "value": "fabric"},
]


@pytest.mark.parametrize(
    ("engine", "count", "volumes", "mounts"),
    [
        ("vllm", 1, [_shm("2Gi"), CACHE, HOME_VOLUME], [SHM_MOUNT, CACHE_MOUNT, HOME_MOUNT]),
        ("vllm", 4, [_shm("8Gi"), CACHE, HOME_VOLUME], [SHM_MOUNT, CACHE_MOUNT, HOME_MOUNT]),
        # TGI keeps its image's user (root): no HOME volume; its cache is its /data.
        ("tgi", 2, [_shm("4Gi"), CACHE], [SHM_MOUNT, {"name": "cache", "mountPath": "/data"}]),
        ("llamacpp", 1, [CACHE, HOME_VOLUME], [CACHE_MOUNT, HOME_MOUNT]),
        (
            "llamacpp-python",
            0,
            [CACHE, HOME_VOLUME, PVC_VOLUME],
            [CACHE_MOUNT, HOME_MOUNT, PVC_MOUNT],
        ),
        ("ollama", 0, [CACHE, HOME_VOLUME], [CACHE_MOUNT, HOME_MOUNT]),
    ],
)
def test_volumes_and_mounts(engine: str, count: int, volumes: list[Any], mounts: list[Any]) -> None:
    template = pod(engine, **gpus(count))
    assert template["volumes"] == volumes
    assert template["containers"][0]["volumeMounts"] == mounts


@pytest.mark.parametrize("engine", ["vllm", "tgi", "llamacpp", "llamacpp-python"])
def test_pvc_model_is_mounted_read_only(engine: str) -> None:
    template = pod(engine, **pvc("models/x"))
    assert template["volumes"][-1] == PVC_VOLUME
    assert template["containers"][0]["volumeMounts"][-1] == PVC_MOUNT
    hf = {"model": {"huggingface": {"repo": REPO, "file": "x.gguf"}}, "image": "r/lcp:1"}
    other = hf if engine == "llamacpp-python" else {}
    assert "model" not in [v["name"] for v in pod(engine, **other)["volumes"]]


# --- env and secrets --------------------------------------------------------------------


def _secret(name: str, ref: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": dict(ref)}}


def _env(name: str, value: str) -> dict[str, str]:
    return {"name": name, "value": value}


@pytest.mark.parametrize(
    ("engine", "fields", "env"),
    [
        ("vllm", {}, [*HOME_ENV, _env("HF_HOME", "/cache/huggingface")]),
        (
            "vllm",
            {"apiKeySecretRef": API_KEY, "hfTokenSecretRef": HF_TOKEN},
            [
                *HOME_ENV,
                _env("HF_HOME", "/cache/huggingface"),
                _secret("HF_TOKEN", HF_TOKEN),
                _secret("VLLM_API_KEY", API_KEY),
            ],
        ),
        ("tgi", {}, [_env("HF_HOME", "/data")]),
        (
            "tgi",
            {"apiKeySecretRef": API_KEY, "hfTokenSecretRef": HF_TOKEN},
            [_env("HF_HOME", "/data"), _secret("HF_TOKEN", HF_TOKEN), _secret("API_KEY", API_KEY)],
        ),
        ("llamacpp", {}, [*HOME_ENV, _env("LLAMA_CACHE", "/cache")]),
        (
            "llamacpp",
            {"apiKeySecretRef": API_KEY, "hfTokenSecretRef": HF_TOKEN},
            [
                *HOME_ENV,
                _env("LLAMA_CACHE", "/cache"),
                _secret("HF_TOKEN", HF_TOKEN),
                _secret("LLAMA_API_KEY", API_KEY),
            ],
        ),
        ("llamacpp-python", {}, [*HOME_ENV, _env("HF_HOME", "/cache/huggingface")]),
        (
            "llamacpp-python",
            {"apiKeySecretRef": API_KEY, "hfTokenSecretRef": HF_TOKEN},
            [
                *HOME_ENV,
                _env("HF_HOME", "/cache/huggingface"),
                _secret("HF_TOKEN", HF_TOKEN),
                _secret("API_KEY", API_KEY),
            ],
        ),
        (
            "ollama",
            {},
            [
                *HOME_ENV,
                _env("OLLAMA_HOST", "0.0.0.0:11434"),
                _env("OLLAMA_MODELS", "/cache/models"),
                _env("OLLAMA_KEEP_ALIVE", "-1"),
            ],
        ),
        (
            "ollama",
            {"engineOptions": {"contextLength": 8192}},
            [
                *HOME_ENV,
                _env("OLLAMA_HOST", "0.0.0.0:11434"),
                _env("OLLAMA_MODELS", "/cache/models"),
                _env("OLLAMA_KEEP_ALIVE", "-1"),
                _env("OLLAMA_CONTEXT_LENGTH", "8192"),
            ],
        ),
    ],
)
def test_engine_env(engine: str, fields: dict[str, Any], env: list[Any]) -> None:
    assert container(engine, **fields)["env"] == env


@pytest.mark.parametrize("engine", ["vllm", "tgi", "llamacpp", "llamacpp-python"])
def test_secrets_are_never_literal_values(engine: str) -> None:
    env = container(engine, apiKeySecretRef=API_KEY, hfTokenSecretRef=HF_TOKEN)["env"]
    secret_names = {"HF_TOKEN", "VLLM_API_KEY", "API_KEY", "LLAMA_API_KEY"}
    secrets = [e for e in env if e["name"] in secret_names]
    assert len(secrets) == 2
    for e in secrets:
        assert "value" not in e
        assert set(e["valueFrom"]["secretKeyRef"]) == {"name", "key"}


@pytest.mark.parametrize("engine", ENGINES)
def test_user_env_comes_after_the_engine_env(engine: str) -> None:
    user = [
        {"name": "LOG_LEVEL", "value": "debug"},
        {"name": "CFG", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}},
    ]
    own = container(engine)["env"]
    assert container(engine, env=user)["env"] == own + user


# --- resources --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("engine", "resources", "expected"),
    [
        ("vllm", {"gpu": {"count": 2}}, {"limits": {"nvidia.com/gpu": "2"}}),
        ("tgi", {"gpu": {"count": 1, "vendor": "amd"}}, {"limits": {"amd.com/gpu": "1"}}),
        ("llamacpp", None, {}),
        ("llamacpp", {"gpu": {"count": 0}, "requests": {}}, {}),
        (
            "llamacpp",
            {"requests": {"cpu": "500m", "memory": 1024}, "limits": {"cpu": 4, "memory": "8Gi"}},
            {
                "requests": {"cpu": "500m", "memory": "1024"},
                "limits": {"cpu": "4", "memory": "8Gi"},
            },
        ),
        (
            "vllm",
            {"gpu": {"count": 1}, "requests": {"memory": "32Gi"}, "limits": {"memory": "40Gi"}},
            {"requests": {"memory": "32Gi"}, "limits": {"memory": "40Gi", "nvidia.com/gpu": "1"}},
        ),
        ("ollama", {"gpu": {"count": 1, "vendor": "amd"}}, {"limits": {"amd.com/gpu": "1"}}),
    ],
)
def test_resources(engine: str, resources: dict[str, Any] | None, expected: Any) -> None:
    fields = {"resources": resources} if resources is not None else {}
    assert container(engine, **fields)["resources"] == expected


# --- pod settings, labels, strategy -----------------------------------------------------


def test_pod_scheduling_fields_are_copied() -> None:
    affinity = {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    template = pod(
        "vllm",
        nodeSelector={"pool": "gpu"},
        tolerations=[
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
            {"key": "spot", "value": "yes", "effect": "NoExecute", "tolerationSeconds": 30},
        ],
        affinity=affinity,
        priorityClassName="inference",
        imagePullSecrets=[{"name": "regcred"}],
    )
    assert template["nodeSelector"] == {"pool": "gpu"}
    assert template["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "spot", "value": "yes", "effect": "NoExecute", "tolerationSeconds": 30},
    ]
    assert template["affinity"] == affinity
    assert template["priorityClassName"] == "inference"
    assert template["imagePullSecrets"] == [{"name": "regcred"}]


@pytest.mark.parametrize("engine", ENGINES)
def test_pod_defaults(engine: str) -> None:
    template = pod(engine)
    assert template["enableServiceLinks"] is False
    assert template["automountServiceAccountToken"] is False
    unset = {"nodeSelector", "affinity", "priorityClassName", "imagePullSecrets"}
    assert unset.isdisjoint(template)
    # GPU pools are usually tainted: GPU backends tolerate the vendor's taint, CPU ones don't.
    gpu_toleration = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert template.get("tolerations") == (gpu_toleration if engine in {"vllm", "tgi"} else None)
    assert ("initContainers" in template) == (engine == "ollama")


@pytest.mark.parametrize("engine", ENGINES)
def test_labels_and_selectors(engine: str) -> None:
    children = render(backend(spec(engine), name="chat"))
    dep, svc = children.deployment, children.service
    for labels in (
        dep["metadata"]["labels"],
        dep["spec"]["template"]["metadata"]["labels"],
        svc["metadata"]["labels"],
    ):
        assert labels["app.kubernetes.io/name"] == engine
        assert labels["app.kubernetes.io/instance"] == "chat"
        assert labels["app.kubernetes.io/component"] == "inference-server"
        assert labels["app.kubernetes.io/managed-by"] == "fabric-operator"
        assert labels["llm.fabric.dev/backend"] == "chat"
    assert dep["spec"]["selector"] == {"matchLabels": {"llm.fabric.dev/backend": "chat"}}
    assert svc["spec"]["selector"] == {"llm.fabric.dev/backend": "chat"}


@pytest.mark.parametrize(
    ("engine", "fields", "surge", "unavailable"),
    [
        ("vllm", gpus(1), 0, 1),
        ("tgi", gpus(2), 0, 1),
        ("llamacpp", gpus(1), 0, 1),
        ("ollama", gpus(1, "amd"), 0, 1),
        ("llamacpp", {}, 1, 0),
        ("ollama", {}, 1, 0),
    ],
)
def test_rolling_strategy(
    engine: str, fields: dict[str, Any], surge: int, unavailable: int
) -> None:
    dep = render(backend(spec(engine, **fields))).deployment
    assert dep["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": surge, "maxUnavailable": unavailable},
    }


@pytest.mark.parametrize("replicas", [0, 1, 5])
def test_replicas(replicas: int) -> None:
    assert render(backend(spec("ollama", replicas=replicas))).deployment["spec"]["replicas"] == (
        replicas
    )


# --- ollama's pull init container ------------------------------------------------------


def _init(**fields: Any) -> dict[str, Any]:
    inits = pod("ollama", **fields)["initContainers"]
    assert len(inits) == 1
    result: dict[str, Any] = inits[0]
    return result


def test_ollama_init_container_shape() -> None:
    init = _init()
    assert init["name"] == "pull-model"
    assert init["command"][:2] == ["/bin/sh", "-c"]
    # The engine's HOME and model store: what it pulls, the engine serves.
    assert init["env"] == [
        *HOME_ENV,
        _env("OLLAMA_HOST", "127.0.0.1:11434"),
        _env("OLLAMA_MODELS", "/cache/models"),
    ]
    assert init["volumeMounts"] == [CACHE_MOUNT, HOME_MOUNT]
    assert "imagePullPolicy" not in init


@pytest.mark.parametrize(
    ("served", "copy"),
    [
        (None, ["ollama", "cp", TAG, "m"]),
        (TAG, None),
        ("chat", ["ollama", "cp", TAG, "chat"]),
        ("it's$(reboot)", ["ollama", "cp", TAG, "it's$(reboot)"]),
    ],
)
def test_ollama_pull_script(served: str | None, copy: list[str] | None) -> None:
    fields = {"servedModelName": served} if served else {}
    lines = _init(**fields)["command"][2].splitlines()
    assert lines[0] == "set -e"
    assert shlex.split(lines[3]) == ["ollama", "pull", TAG]
    assert lines[-1] == 'kill "$server"'
    copies = [shlex.split(line) for line in lines if line.startswith("ollama cp")]
    assert copies == ([copy] if copy else [])


def test_pull_script_shell_quotes_both_names() -> None:
    script = ollama.pull_script("a b;x", "c'd")
    assert "ollama pull 'a b;x'" in script.splitlines()
    assert shlex.split(script.splitlines()[4]) == ["ollama", "cp", "a b;x", "c'd"]


@pytest.mark.parametrize("engine", ["vllm", "tgi", "llamacpp", "ollama"])
def test_inference_pods_are_locked_down(engine: str) -> None:
    spec = {"llamacpp": {}, "ollama": {}}.get(engine, {"resources": {"gpu": {"count": 1}}})
    spec_pod = pod(engine, **spec)
    assert spec_pod["automountServiceAccountToken"] is False
    assert spec_pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in spec_pod["containers"] + spec_pod.get("initContainers", []):
        assert c["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        }, c["name"]
    # Non-root wherever the image can run as another user (not TGI's: its Python is
    # under /root).
    assert spec_pod["securityContext"].get("runAsNonRoot", False) is (engine != "tgi")
    if engine != "tgi":
        assert (
            spec_pod["securityContext"]["fsGroup"]
            == spec_pod["securityContext"]["runAsUser"]
            == 65532
        )


def test_no_network_policy_unless_asked() -> None:
    assert render(backend(spec("llamacpp"))).network_policy is None
    assert len(render(backend(spec("llamacpp"))).all()) == 2


def test_default_network_policy_admits_the_gateway_and_labelled_clients() -> None:
    children = render(backend(spec("vllm", networkPolicy={})))
    policy = children.network_policy
    # Applied first: no engine pod serves before its policy exists.
    assert policy is not None and children.all() == [policy, children.deployment, children.service]
    assert policy["spec"] == {
        "podSelector": {"matchLabels": {"llm.fabric.dev/backend": "m"}},
        "policyTypes": ["Ingress"],
        "ingress": [
            {
                "from": [
                    {
                        # The gateway's pods in the gateway's namespace only, never a
                        # pod of another namespace that wears the gateway's label.
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": "default"}
                        },
                        "podSelector": {
                            "matchLabels": {"app.kubernetes.io/name": "fabric-gateway"}
                        },
                    },
                    {"podSelector": {"matchLabels": {"llm.fabric.dev/client": "true"}}},
                ],
                "ports": [{"port": 8000, "protocol": "TCP"}],
            }
        ],
    }


def test_the_gateway_namespace_comes_from_the_operator_config() -> None:
    config = OperatorConfig.model_validate({"gatewayNamespace": "fabric-system"})
    policy = render(backend(spec("ollama", networkPolicy={})), config).network_policy
    assert policy is not None
    [gateway, clients] = policy["spec"]["ingress"][0]["from"]
    assert gateway["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": "fabric-system"}
    }
    assert "namespaceSelector" not in clients  # labelled clients: the backend's namespace
    # The CLI fills in the operator's own namespace only when the file names none.
    assert config.with_gateway_namespace("ops").gateway_namespace == "fabric-system"
    assert OperatorConfig().with_gateway_namespace("ops").gateway_namespace == "ops"


def test_network_policy_peers_and_operator_default() -> None:
    peers = [
        {"namespaceSelector": {"matchLabels": {"team": "a"}}},
        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}},
    ]
    policy = render(backend(spec("llamacpp", networkPolicy={"from": peers}))).network_policy
    assert policy is not None and policy["spec"]["ingress"][0]["from"] == peers
    on = OperatorConfig.model_validate({"networkPolicy": True})
    assert render(backend(spec("llamacpp")), on).network_policy is not None
    off = spec("llamacpp", networkPolicy={"enabled": False})
    assert render(backend(off), on).network_policy is None


def test_user_env_overrides_engine_defaults_once() -> None:
    env = pod("vllm", env=[{"name": "HF_HOME", "value": "/models/hf"}])["containers"][0]["env"]
    assert [e for e in env if e["name"] == "HF_HOME"] == [
        {"name": "HF_HOME", "value": "/models/hf"}
    ]


def test_every_default_engine_image_is_pinned_by_version() -> None:
    """A floating tag (`latest`, llama.cpp's `server`) moves under running backends."""
    refs = [
        *vllm.IMAGE.values(),
        *tgi.IMAGE.values(),
        *llamacpp.IMAGE.values(),
        llamacpp_python.IMAGE,
        *ollama.IMAGE.values(),
    ]
    for ref in refs:
        tag = ref.rsplit(":", 1)[1]
        assert tag != "latest" and any(c.isdigit() for c in tag), ref
