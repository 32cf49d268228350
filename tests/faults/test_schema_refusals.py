"""Bad input stops at the API server, whose message names the field.

tests/integration/test_schema.py covers an unknown engine, replicas -1 and "two", a
missing or empty model, two model sources, gpu.count -2, gpuMemoryUtilization 1.5 and a
bad memory quantity; these are the other types, ranges and enums of the schema, sent
straight to the API (dry run: nothing is stored), plus what the schema lets through.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from fabric_operator.api.v1alpha1 import GROUP, PLURAL, VERSION
from tests.support.faults import condition, create, manifest, say
from tests.support.fixtures import OperatorProcess, settle
from tests.support.kube import Cluster, wait_for

pytestmark = pytest.mark.integration

HF = {"huggingface": {"repo": "Qwen/Qwen2.5-0.5B"}}
VLLM: dict[str, Any] = {"engine": "vllm", "model": HF, "resources": {"gpu": {"count": 1}}}
CPU: dict[str, Any] = {"engine": "llamacpp", "model": {"url": "https://models.invalid/m.gguf"}}

# (spec, the field the API server must name)
REFUSED: dict[str, tuple[Any, str]] = {
    "engine-int": ({**VLLM, "engine": 7}, "spec.engine"),
    "engine-null": ({**VLLM, "engine": None}, "spec.engine"),
    "engine-list": ({**VLLM, "engine": ["vllm"]}, "spec.engine"),
    "engine-uppercase": ({**VLLM, "engine": "VLLM"}, "spec.engine"),
    "spec-missing": (None, "spec"),
    "spec-string": ("vllm", "spec"),
    "model-string": ({**VLLM, "model": "Qwen/Qwen2.5"}, "spec.model"),
    "model-url-ftp": ({**CPU, "model": {"url": "ftp://h/m.gguf"}}, "spec.model.url"),
    "hf-repo-missing": ({**VLLM, "model": {"huggingface": {}}}, "spec.model.huggingface.repo"),
    "hf-repo-empty": (
        {**VLLM, "model": {"huggingface": {"repo": ""}}},
        "spec.model.huggingface.repo",
    ),
    "hf-repo-space": (
        {**VLLM, "model": {"huggingface": {"repo": "a b"}}},
        "spec.model.huggingface.repo",
    ),
    "pvc-path-missing": ({**VLLM, "model": {"pvc": {"claimName": "w"}}}, "spec.model.pvc.path"),
    "pvc-path-absolute": (
        {**VLLM, "model": {"pvc": {"claimName": "w", "path": "/etc"}}},
        "spec.model.pvc.path",
    ),
    "ollama-tag": ({"engine": "ollama", "model": {"ollama": "-x y"}}, "spec.model.ollama"),
    "replicas-float": ({**VLLM, "replicas": 1.5}, "spec.replicas"),
    "replicas-bool": ({**VLLM, "replicas": True}, "spec.replicas"),
    "replicas-1001": ({**VLLM, "replicas": 1001}, "spec.replicas"),
    "gpu-count-string": (
        {**VLLM, "resources": {"gpu": {"count": "1"}}},
        "spec.resources.gpu.count",
    ),
    "gpu-count-65": ({**VLLM, "resources": {"gpu": {"count": 65}}}, "spec.resources.gpu.count"),
    "gpu-count-negative": (
        {**CPU, "resources": {"gpu": {"count": -1}}},
        "spec.resources.gpu.count",
    ),
    "gpu-vendor": (
        {**VLLM, "resources": {"gpu": {"count": 1, "vendor": "intel"}}},
        "spec.resources.gpu.vendor",
    ),
    "gpu-type-space": (
        {**VLLM, "resources": {"gpu": {"count": 1, "type": "H100 80GB"}}},
        "spec.resources.gpu.type",
    ),
    "cpu-word": ({**CPU, "resources": {"requests": {"cpu": "two"}}}, "spec.resources.requests.cpu"),
    "context-0": ({**VLLM, "engineOptions": {"contextLength": 0}}, "engineOptions.contextLength"),
    "tensor-parallel-0": (
        {**VLLM, "engineOptions": {"tensorParallel": 0}},
        "spec.engineOptions.tensorParallel",
    ),
    "dtype": ({**VLLM, "engineOptions": {"dtype": "int4"}}, "spec.engineOptions.dtype"),
    "quantization": (
        {**VLLM, "engineOptions": {"quantization": "AWQ!"}},
        "spec.engineOptions.quantization",
    ),
    "port-0": ({**CPU, "service": {"port": 0}}, "spec.service.port"),
    "port-70000": ({**CPU, "service": {"port": 70000}}, "spec.service.port"),
    "service-type": ({**CPU, "service": {"type": "Ingress"}}, "spec.service.type"),
    "annotation-int": ({**CPU, "service": {"annotations": {"a": 1}}}, "spec.service.annotations"),
    "pull-policy": ({**CPU, "imagePullPolicy": "Sometimes"}, "spec.imagePullPolicy"),
    "image-empty": ({**CPU, "image": ""}, "spec.image"),
    "pull-secrets-strings": ({**CPU, "imagePullSecrets": ["regcred"]}, "spec.imagePullSecrets"),
    "extra-args-string": ({**CPU, "extraArgs": "--x"}, "spec.extraArgs"),
    "extra-args-int": ({**CPU, "extraArgs": [1]}, "spec.extraArgs"),
    "env-object": ({**CPU, "env": {"A": "1"}}, "spec.env"),
    "env-no-name": ({**CPU, "env": [{"value": "1"}]}, "spec.env.name"),
    "env-bad-name": ({**CPU, "env": [{"name": "1X", "value": "a"}]}, "spec.env.name"),
    "secret-ref-no-key": ({**CPU, "apiKeySecretRef": {"name": "s"}}, "spec.apiKeySecretRef.key"),
    "secret-ref-empty-name": (
        {**CPU, "hfTokenSecretRef": {"name": "", "key": "k"}},
        "spec.hfTokenSecretRef.name",
    ),
    "toleration-operator": (
        {**CPU, "tolerations": [{"key": "a", "operator": "Maybe"}]},
        "spec.tolerations.operator",
    ),
    "toleration-effect": (
        {**CPU, "tolerations": [{"key": "a", "effect": "Always"}]},
        "spec.tolerations.effect",
    ),
    "node-selector-int": ({**CPU, "nodeSelector": {"a": 1}}, "spec.nodeSelector"),
    "affinity-string": ({**CPU, "affinity": "near"}, "spec.affinity"),
    "strategy-type": ({**CPU, "strategy": {"type": "BlueGreen"}}, "spec.strategy.type"),
    "max-surge-negative": (
        {**CPU, "strategy": {"type": "RollingUpdate", "maxSurge": "-1"}},
        "spec.strategy.maxSurge",
    ),
    "served-name-space": ({**CPU, "servedModelName": "a b"}, "spec.servedModelName"),
    "served-name-1MiB": ({**CPU, "servedModelName": "x" * (1 << 20)}, "spec.servedModelName"),
}


def _dry_run_create(cluster: Cluster, name: str, spec: Any) -> ApiException | None:
    body = manifest("default", name, spec)
    if spec is None:
        del body["spec"]
    try:
        cluster.custom.create_namespaced_custom_object(
            GROUP, VERSION, "default", PLURAL, body, dry_run="All"
        )
    except ApiException as err:
        return err
    return None


@pytest.mark.parametrize("case", list(REFUSED))
def test_api_server_refuses_naming_the_field(cluster: Cluster, case: str) -> None:
    spec, field = REFUSED[case]
    err = _dry_run_create(cluster, f"bad-{case.lower()}", spec)
    message = json.loads(err.body)["message"] if err is not None and err.body else ""
    say(
        "%s: INJECTED spec %s; SAW %s %s",
        case,
        json.dumps(spec)[:120],
        err.status if err else "accepted",
        message[:300],
    )
    assert err is not None, "accepted"
    assert err.status in (400, 422)
    assert field in message


def test_unknown_fields_refused_by_kubectl_and_never_stored(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A typo ("replica") is an error for kubectl (client-side validation against the CRD's
    published schema); the v1.20 API server has no strict field validation (1.25+): it
    prunes unknown fields, so the typo is dropped and never reaches the operator."""
    # kubectl validates against /openapi/v2, where the API server publishes the CRD's
    # schema asynchronously (v1.20: up to a minute after the CRD is established).
    published = time.monotonic()
    wait_for(
        "the CRD's schema in /openapi/v2",
        lambda: (
            "dev.fabric.llm.v1alpha1.LLMBackend"
            in cluster.kubectl("get", "--raw", "/openapi/v2").stdout
        ),
        90,
        interval=1.0,
    )
    say("typo: the CRD's schema was in /openapi/v2 after %.1fs more", time.monotonic() - published)
    typo = manifest("default", "typo", {**CPU, "replica": 3, "resources": {"gpu": {"x": 1}}})
    # A cache of its own: kubectl's default one may hold an older cluster's schema when the
    # loopback port is reused.
    refused = cluster.kubectl(
        "apply",
        f"--cache-dir={tmp_path / 'kubectl-cache'}",
        "--dry-run=server",
        "-f",
        "-",
        stdin=json.dumps(typo),
        check=False,
    )
    say("typo: INJECTED spec.replica and spec.resources.gpu.x; kubectl: %s", refused.stderr[:300])
    assert refused.returncode != 0 and 'unknown field "replica"' in refused.stderr
    stored: dict[str, Any] = cluster.custom.create_namespaced_custom_object(
        GROUP, VERSION, "default", PLURAL, typo, dry_run="All"
    )
    say("typo: SAW the API server store spec %s", json.dumps(stored["spec"]))
    assert "replica" not in stored["spec"]
    assert "x" not in (stored["spec"].get("resources") or {}).get("gpu", {})


@pytest.mark.parametrize(
    ("resources", "field"),
    [
        ({"requests": {"cpu": "-1"}}, "spec.resources.requests.cpu"),
        ({"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}, "spec.resources"),
    ],
    ids=["negative-cpu", "requests-above-limits"],
)
def test_resources_the_api_server_refuses_never_reach_apply(
    cluster: Cluster,
    operator: OperatorProcess,
    namespace: str,
    resources: dict[str, Any],
    field: str,
) -> None:
    try:
        create(cluster, namespace, "res", {**CPU, "replicas": 0, "resources": resources})
    except ApiException as err:
        say("res: INJECTED %s; SAW refused by the schema: %s", resources, err.body)
        assert err.status == 422 and field in (err.body or "")
        return
    degraded = wait_for(
        "a Degraded condition", lambda: condition(cluster.backend(namespace, "res"), "Degraded"), 15
    )
    settle(1.0)
    say(
        "res: INJECTED %s; SAW Degraded %s: %s; Deployment %s",
        resources,
        degraded.get("reason"),
        degraded.get("message"),
        "present" if cluster.deployment(namespace, "res") else "absent",
    )
    assert degraded.get("reason") == "InvalidSpec" and field in degraded.get("message", "")
    assert cluster.deployment(namespace, "res") is None
    assert cluster.service(namespace, "res") is None


DUPLICATE_KEYS_GAP = (
    "validation gap: spec.imagePullSecrets may name a Secret twice (the CRD list has no "
    "x-kubernetes-list-type: map, validation.py does not check it); the rendered pod "
    "template then has duplicate keys in a list server-side apply merges by name, the API "
    "server answers 500 'failed to create typed patch object: ... duplicate entries for key "
    "[name=...]', which reconciler.RETRYABLE treats as transient: ApplyFailed '(retrying)' "
    "with backoff forever, no children. Fix: refuse duplicates (list-type map keyed by name "
    "in api/v1alpha1.py, or a Problem in validation.py), and do not retry a 500 whose "
    "message says the patch itself is malformed"
)


def test_duplicate_list_keys_never_reach_apply(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    spec = {**CPU, "replicas": 0, "imagePullSecrets": [{"name": "regcred"}, {"name": "regcred"}]}
    try:
        create(cluster, namespace, "dup", spec)
    except ApiException as err:
        say("dup: INJECTED imagePullSecrets twice; SAW refused by the schema: %s", err.body)
        assert err.status == 422 and "spec.imagePullSecrets" in (err.body or "")
        return
    degraded = wait_for(
        "a Degraded condition",
        lambda: condition(cluster.backend(namespace, "dup"), "Degraded"),
        15,
    )
    say(
        "dup: INJECTED imagePullSecrets [regcred, regcred]; SAW Degraded %s: %s",
        degraded.get("reason"),
        degraded.get("message"),
    )
    assert degraded.get("reason") == "InvalidSpec"
    assert "spec.imagePullSecrets" in degraded.get("message", "")


@pytest.mark.parametrize(
    "strategy",
    [
        {"type": "RollingUpdate", "maxSurge": -1},
        {"type": "RollingUpdate", "maxSurge": 0, "maxUnavailable": 0},
        {"type": "RollingUpdate", "maxUnavailable": "150%"},
    ],
    ids=["surge-negative", "both-zero", "unavailable-150%"],
)
def test_rollout_strategies_the_api_server_refuses_never_reach_apply(
    cluster: Cluster, operator: OperatorProcess, namespace: str, strategy: dict[str, Any]
) -> None:
    try:
        create(cluster, namespace, "roll", {**CPU, "replicas": 0, "strategy": strategy})
    except ApiException as err:
        say("roll: INJECTED %s; SAW refused by the schema: %s", strategy, err.body)
        assert err.status == 422 and "spec.strategy" in (err.body or "")
        return
    degraded = wait_for(
        "a Degraded condition",
        lambda: condition(cluster.backend(namespace, "roll"), "Degraded"),
        15,
    )
    say(
        "roll: INJECTED %s; SAW Degraded %s: %s",
        strategy,
        degraded.get("reason"),
        degraded.get("message"),
    )
    assert degraded.get("reason") == "InvalidSpec"
    assert "spec.strategy" in degraded.get("message", "")
    assert cluster.deployment(namespace, "roll") is None
