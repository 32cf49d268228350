"""Secrets reach pods only as secretKeyRef: a known, unique value is looked for (as is and
base64-encoded) in every Deployment, ReplicaSet, Service, Event and LLMBackend of the
namespace, in the operator's logs at DEBUG level and in its /healthz and /metrics."""

from __future__ import annotations

import json
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.faults.conftest import start_operator
from tests.support.faults import (
    assert_alive,
    condition,
    create,
    list_backends,
    list_children,
    operator_logs,
    say,
    secret_forms,
)
from tests.support.fixtures import settle
from tests.support.kube import Cluster, wait_for

pytestmark = pytest.mark.integration

HF = {"huggingface": {"repo": "meta-llama/Llama-3.2-1B-Instruct"}}
REFS = {
    "apiKeySecretRef": {"name": "creds", "key": "api-key"},
    "hfTokenSecretRef": {"name": "creds", "key": "hf-token"},
}
BACKENDS: dict[str, dict[str, Any]] = {
    "vllm": {"engine": "vllm", "model": HF, "resources": {"gpu": {"count": 1}}, **REFS},
    "tgi": {"engine": "tgi", "model": HF, "resources": {"gpu": {"count": 1}}, **REFS},
    "llamacpp": {
        "engine": "llamacpp",
        "model": {"huggingface": {"repo": "Qwen/Qwen2.5-0.5B-Instruct-GGUF"}},
        **REFS,
    },
    "wrong-key": {
        "engine": "llamacpp",
        "model": {"url": "https://models.invalid/m.gguf"},
        "apiKeySecretRef": {"name": "creds", "key": "nope"},
    },
}
# The variable each engine reads the key and the token from.
KEY_ENV = {"vllm": "VLLM_API_KEY", "tgi": "API_KEY", "llamacpp": "LLAMA_API_KEY"}


def _everything(cluster: Cluster, ns: str) -> dict[str, str]:
    """Every object of the namespace a value could leak into, as text."""
    deployments, services = list_children(cluster, ns)
    replicasets = json.loads(
        cluster.apps.list_namespaced_replica_set(ns, _preload_content=False).data
    )["items"]
    events = json.loads(cluster.core.list_namespaced_event(ns, _preload_content=False).data)[
        "items"
    ]
    texts = {}
    for kind, items in (
        ("Deployment", deployments),
        ("ReplicaSet", replicasets),
        ("Service", services),
        ("Event", events),
        ("LLMBackend", list_backends(cluster, ns)),
    ):
        for obj in items:
            texts[f"{kind} {obj['metadata']['name']}"] = json.dumps(obj)
    return texts


def _http(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def test_secret_values_never_leave_the_secret(
    cluster: Cluster, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = namespace
    values = {"api-key": f"sk-fabric-{uuid.uuid4().hex}", "hf-token": f"hf_{uuid.uuid4().hex}"}
    cluster.core.create_namespaced_secret(ns, {"metadata": {"name": "creds"}, "stringData": values})
    monkeypatch.setenv("FABRIC_LOG_LEVEL", "DEBUG")  # the most the operator ever logs
    op = start_operator(cluster, ns, tmp_path)
    try:
        for name, spec in BACKENDS.items():
            create(cluster, ns, name, spec)
        say(
            "INJECTED Secret creds {api-key: %s..., hf-token: %s...}, referenced by %s; "
            "operator at DEBUG",
            values["api-key"][:14],
            values["hf-token"][:7],
            list(BACKENDS),
        )
        for name in KEY_ENV:
            wait_for(f"{name}'s Deployment", lambda n=name: cluster.deployment(ns, n), 20)
        wrong = wait_for(
            "wrong-key's InvalidSpec",
            lambda: condition(cluster.backend(ns, "wrong-key"), "Degraded").get("message"),
            20,
        )
        # Rotate the values: the new ones must not show up anywhere either.
        rotated = {k: f"{v}-rotated-{uuid.uuid4().hex[:6]}" for k, v in values.items()}
        cluster.core.patch_namespaced_secret("creds", ns, {"stringData": rotated})
        cluster.kubectl("annotate", "llmb", "--all", "-n", ns, "touched=1")
        settle(3.0)

        for name, env_name in KEY_ENV.items():
            dep = cluster.deployment(ns, name)
            assert dep is not None
            env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
            assert env[env_name] == {
                "name": env_name,
                "valueFrom": {"secretKeyRef": {"name": "creds", "key": "api-key"}},
            }
            assert env["HF_TOKEN"] == {
                "name": "HF_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": "creds", "key": "hf-token"}},
            }
        forms = [f for v in [*values.values(), *rotated.values()] for f in secret_forms(v)]
        places = _everything(cluster, ns)
        places["operator logs"] = operator_logs(op)
        places["/healthz"] = _http(f"http://127.0.0.1:{op.port}/healthz")
        places["/metrics"] = _http(f"http://127.0.0.1:{op.metrics_port}/metrics")
        leaks = sorted({where for where, text in places.items() for f in forms if f in text})
        say(
            "SAW wrong-key refused: %s; looked for %d forms of 4 values in %d places (%d "
            "log lines): leaks %s",
            wrong,
            len(forms),
            len(places),
            len(places["operator logs"].splitlines()),
            leaks or "none",
        )
        assert "spec.apiKeySecretRef.key" in wrong and "nope" in wrong
        assert not leaks
        assert_alive(op)
    finally:
        op.stop()
