"""The operator against a real API server: children, updates, drift, bad input, deletion."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from tests.support.fixtures import OperatorProcess, settle
from tests.support.kube import Cluster, run_pods, wait_for

pytestmark = pytest.mark.integration

CPU_BACKEND: dict[str, Any] = {
    "apiVersion": "llm.fabric.dev/v1alpha1",
    "kind": "LLMBackend",
    "metadata": {"name": "tiny"},
    "spec": {
        "engine": "llamacpp",
        "model": {"url": "https://example.invalid/tiny.gguf"},
        "servedModelName": "tiny-chat",
        "engineOptions": {"contextLength": 2048},
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}},
    },
}


def backend(namespace: str, name: str = "tiny", **spec: Any) -> dict[str, Any]:
    obj = copy.deepcopy(CPU_BACKEND)
    obj["metadata"] = {"name": name, "namespace": namespace}
    obj["spec"].update(spec)
    return obj


def children(cluster: Cluster, ns: str, name: str = "tiny") -> tuple[Any, Any] | None:
    dep, svc = cluster.deployment(ns, name), cluster.service(ns, name)
    return (dep, svc) if dep and svc else None


def test_apply_creates_owned_children_and_status(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    assert cluster.apply(backend(namespace)).returncode == 0
    dep, svc = wait_for("Deployment and Service", lambda: children(cluster, namespace), 10)
    owner = cluster.backend(namespace, "tiny")
    for child in (dep, svc):
        refs = child["metadata"]["ownerReferences"]
        assert refs == [
            {
                "apiVersion": "llm.fabric.dev/v1alpha1",
                "kind": "LLMBackend",
                "name": "tiny",
                "uid": owner["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        labels = child["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "fabric-operator"
        assert labels["app.kubernetes.io/instance"] == "tiny"
        assert labels["app.kubernetes.io/name"] == "llamacpp"
        assert labels["app.kubernetes.io/component"] == "inference-server"
    assert "--alias" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert svc["spec"]["ports"][0]["port"] == 8080

    status = wait_for("status", lambda: cluster.backend(namespace, "tiny").get("status"), 10)
    assert status["observedGeneration"] == owner["metadata"]["generation"]
    assert status["endpoint"] == f"http://tiny.{namespace}.svc.cluster.local:8080/v1"
    assert status["servedModelName"] == "tiny-chat"
    # No pod yet, or one scheduled onto the simulated node (no kubelet starts it).
    assert status["phase"] in {"Pending", "Starting"}
    assert {c["type"] for c in status["conditions"]} == {
        "Ready",
        "Progressing",
        "Degraded",
        "ToolCalling",
    }
    assert status["toolCalling"] == "jinja"  # llama-server: on by default
    reasons = [e["reason"] for e in cluster.events(namespace, "tiny")]
    assert "Created" in reasons
    # The operator's own counters are live (they prove the zero in the restart test).
    counted = operator.api_requests()
    assert counted['fabric_operator_api_requests_total{verb="create",resource="deployments"}'] >= 1


def test_status_follows_pods_to_ready(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    if not cluster.local:
        pytest.skip(
            "needs the local control plane's simulated node (no real kubelet runs "
            "the test's fake model URL)"
        )
    cluster.apply(backend(namespace))
    status = wait_for("status", lambda: cluster.backend(namespace, "tiny").get("status"), 10)
    assert status["phase"] in {"Pending", "Starting"}
    # Scheduled onto the simulated node, whose kubelet never starts it: Starting, saying so.
    wait_for(
        "phase Starting",
        lambda: cluster.backend(namespace, "tiny")["status"]["phase"] == "Starting",
        20,
    )
    ready = cluster.condition(namespace, "tiny", "Ready")
    assert ready["reason"] == "Starting" and "is scheduled" in ready["message"], ready
    # A kubelet stand-in runs the pod: the status follows the Deployment to Ready.
    wait_for(
        "a scheduled pod", lambda: run_pods(cluster, namespace, "llm.fabric.dev/backend=tiny"), 20
    )
    wait_for(
        "phase Ready", lambda: cluster.backend(namespace, "tiny")["status"]["phase"] == "Ready", 20
    )
    ready = cluster.condition(namespace, "tiny", "Ready")
    assert ready["status"] == "True" and ready["reason"] == "ReplicasReady"
    table = cluster.kubectl("get", "llmb", "-n", namespace).stdout
    header, row = table.splitlines()[:2]
    assert header.split() == ["NAME", "ENGINE", "MODEL", "READY", "STATUS", "ENDPOINT", "AGE"]
    assert row.split()[:6] == ["tiny", "llamacpp", "tiny-chat", "1/1", "Ready", status["endpoint"]]


def test_spec_update_rolls_deployment(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.apply(backend(namespace))
    wait_for("children", lambda: children(cluster, namespace), 10)
    cluster.apply(backend(namespace, engineOptions={"contextLength": 8192}))

    def args() -> list[str]:
        dep = cluster.deployment(namespace, "tiny") or {}
        return list(dep["spec"]["template"]["spec"]["containers"][0]["args"])

    new_args = wait_for("the new context length", lambda: "8192" in args() and args(), 10)
    assert new_args[new_args.index("--ctx-size") + 1] == "8192"
    obj = wait_for(
        "observedGeneration 2",
        lambda: (
            (o := cluster.backend(namespace, "tiny"))["status"].get("observedGeneration") == 2 and o
        ),
        10,
    )
    assert obj["metadata"]["generation"] == 2
    wait_for(
        "an Updated event",
        lambda: "Updated" in [e["reason"] for e in cluster.events(namespace, "tiny")],
        5,
    )


def test_scale_subresource(cluster: Cluster, operator: OperatorProcess, namespace: str) -> None:
    cluster.apply(backend(namespace))
    wait_for("children", lambda: children(cluster, namespace), 10)
    cluster.kubectl("scale", "llmb/tiny", "-n", namespace, "--replicas=3")
    wait_for(
        "3 replicas",
        lambda: (cluster.deployment(namespace, "tiny") or {})["spec"]["replicas"] == 3,
        10,
    )


def test_drift_and_deleted_children_are_restored(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.apply(backend(namespace))
    _, svc = wait_for("children", lambda: children(cluster, namespace), 10)
    cluster.core.delete_namespaced_service("tiny", namespace, _preload_content=False)
    new_svc = wait_for(
        "a new Service",
        lambda: (
            (s := cluster.service(namespace, "tiny"))
            and s["metadata"]["uid"] != svc["metadata"]["uid"]
            and s
        ),
        10,
    )
    assert new_svc["metadata"]["ownerReferences"][0]["name"] == "tiny"

    cluster.apps.patch_namespaced_deployment("tiny", namespace, {"spec": {"replicas": 5}})
    cluster.apps.patch_namespaced_deployment(
        "tiny", namespace, {"metadata": {"labels": {"app.kubernetes.io/name": "hijacked"}}}
    )
    wait_for(
        "replicas and labels restored",
        lambda: (
            (d := cluster.deployment(namespace, "tiny"))
            and d["spec"]["replicas"] == 1
            and d["metadata"]["labels"]["app.kubernetes.io/name"] == "llamacpp"
        ),
        10,
    )
    wait_for(
        "a Restored event",
        lambda: "Restored" in [e["reason"] for e in cluster.events(namespace, "tiny")],
        5,
    )


@pytest.mark.parametrize(
    ("spec", "field", "words"),
    [
        (
            {"engine": "ollama", "model": {"huggingface": {"repo": "Qwen/Qwen2.5-0.5B"}}},
            "spec.model.huggingface",
            "engine ollama cannot load",
        ),
        (
            {"engine": "vllm", "model": {"huggingface": {"repo": "Qwen/Qwen2.5-0.5B"}}},
            "spec.resources.gpu.count",
            "needs at least 1 GPU",
        ),
        (
            {
                "engine": "vllm",
                "model": {"huggingface": {"repo": "Qwen/Qwen2.5-0.5B"}},
                "resources": {"gpu": {"count": 1}},
                "engineOptions": {"tensorParallel": 2},
            },
            "spec.engineOptions.tensorParallel",
            "more than the 1 GPU",
        ),
        (
            {"apiKeySecretRef": {"name": "nope", "key": "api-key"}},
            "spec.apiKeySecretRef",
            "Secret 'nope' not found",
        ),
    ],
)
def test_invalid_spec_is_refused_with_condition_and_event(
    cluster: Cluster,
    operator: OperatorProcess,
    namespace: str,
    spec: dict[str, Any],
    field: str,
    words: str,
) -> None:
    assert cluster.apply(backend(namespace, **spec)).returncode == 0
    degraded = wait_for("Degraded", lambda: cluster.condition(namespace, "tiny", "Degraded"), 10)
    assert degraded["status"] == "True"
    assert degraded["reason"] == "InvalidSpec"
    assert field in degraded["message"] and words in degraded["message"]
    assert cluster.backend(namespace, "tiny")["status"]["phase"] == "Invalid"
    warnings = [e for e in cluster.events(namespace, "tiny") if e["type"] == "Warning"]
    assert [e["reason"] for e in warnings] == ["InvalidSpec"]
    assert field in warnings[0]["message"]
    settle()
    assert children(cluster, namespace) is None
    assert (
        cluster.deployment(namespace, "tiny") is None and cluster.service(namespace, "tiny") is None
    )
    # Once per transition: more reconciles add no second Warning.
    assert len([e for e in cluster.events(namespace, "tiny") if e["type"] == "Warning"]) == 1


def test_missing_secret_then_created(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.apply(backend(namespace, apiKeySecretRef={"name": "key", "key": "api-key"}))
    wait_for(
        "InvalidSpec",
        lambda: cluster.condition(namespace, "tiny", "Degraded").get("reason") == "InvalidSpec",
        10,
    )
    cluster.core.create_namespaced_secret(
        namespace, {"metadata": {"name": "key"}, "stringData": {"api-key": "s3cr3t-v4lue"}}
    )
    cluster.kubectl("annotate", "llmb/tiny", "-n", namespace, "touched=1")
    dep, _ = wait_for("children", lambda: children(cluster, namespace), 10)
    env = dep["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {
        "name": "LLAMA_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "key", "key": "api-key"}},
    } in env
    assert "s3cr3t-v4lue" not in str(dep)
    wait_for(
        "Degraded False",
        lambda: cluster.condition(namespace, "tiny", "Degraded").get("status") == "False",
        10,
    )
    assert "s3cr3t-v4lue" not in operator.logs()
    assert "s3cr3t-v4lue" not in str(cluster.backend(namespace, "tiny"))
    assert "s3cr3t-v4lue" not in str(cluster.events(namespace, "tiny"))


def test_invalid_update_leaves_running_children_alone(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.apply(backend(namespace))
    dep, _ = wait_for("children", lambda: children(cluster, namespace), 10)
    cluster.apply(backend(namespace, engine="ollama"))
    wait_for(
        "InvalidSpec",
        lambda: cluster.condition(namespace, "tiny", "Degraded").get("reason") == "InvalidSpec",
        10,
    )
    settle()
    after = cluster.deployment(namespace, "tiny")
    assert after is not None
    # generation moves with spec changes only (status writes by the Deployment controller
    # do not count): the running Deployment was left exactly as it was.
    assert after["metadata"]["generation"] == dep["metadata"]["generation"]
    assert after["spec"]["template"] == dep["spec"]["template"]


def test_refused_apply_is_reported_and_leaves_no_children(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    # Free-form affinity is checked by the API server, not the schema: the refusal names
    # the field, and the Service (applied after the Deployment) is not created either.
    empty_terms = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}
        }
    }
    cluster.apply(backend(namespace, affinity=empty_terms))
    degraded = wait_for(
        "ApplyFailed",
        lambda: (
            (c := cluster.condition(namespace, "tiny", "Degraded")).get("reason") == "ApplyFailed"
            and c
        ),
        10,
    )
    assert "nodeSelectorTerms" in degraded["message"]
    assert "Deployment tiny" in degraded["message"]
    assert cluster.backend(namespace, "tiny")["status"]["phase"] == "Degraded"
    wait_for(
        "a Warning event",
        lambda: (
            "ApplyFailed"
            in [e["reason"] for e in cluster.events(namespace, "tiny") if e["type"] == "Warning"]
        ),
        5,
    )
    assert cluster.deployment(namespace, "tiny") is None
    assert cluster.service(namespace, "tiny") is None


def test_deleting_backend_removes_children(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.apply(backend(namespace))
    wait_for("children", lambda: children(cluster, namespace), 10)
    cluster.kubectl("delete", "llmb/tiny", "-n", namespace, "--wait=true", "--timeout=20s")
    wait_for(
        "garbage collection",
        lambda: cluster.children_gone(namespace, "tiny"),
        30,
    )


def test_unchanged_backends_cost_no_writes_on_restart(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    for name in ("a", "b", "c"):
        cluster.apply(backend(namespace, name=name))
    for name in ("a", "b", "c"):
        wait_for(
            f"{name} reconciled",
            lambda n=name: (cluster.backend(namespace, n).get("status") or {}).get(
                "observedGeneration"
            ),
            10,
        )
    wait_for(
        "earlier tests' namespaces to be gone",
        lambda: (
            not [n for n in cluster.core.list_namespace().items if n.status.phase == "Terminating"]
        ),
        60,
        interval=0.5,
    )
    settle(2)
    before = cluster.write_counts()
    operator.restart()
    wait_for(
        "the restarted operator to reconcile everything",
        lambda: (
            operator.metric("fabric_operator_backends") >= 3
            and operator.metric("fabric_operator_reconciles_total") >= 3
            and operator.metric("fabric_operator_queue_depth") == 0
        ),
        20,
    )
    settle(2)
    assert operator.metric("fabric_operator_reconciles_total") >= 3
    assert operator.api_requests() == {}
    after = cluster.write_counts()
    changed = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    # The verbs the operator writes with (apply = PATCH, create = POST) on its resources;
    # DELETEs come from earlier tests' namespace clean-up.
    ours = {
        k: v
        for k, v in changed.items()
        if k.split()[0] in {"PATCH", "POST", "APPLY"}
        and k.split()[1].split("/")[0] in {"deployments", "services", "llmbackends"}
    }
    assert ours == {}, changed


def test_someone_elses_deployment_with_the_name_is_left_alone(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    theirs = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "tiny", "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": {"app": "theirs"}},
            "template": {
                "metadata": {"labels": {"app": "theirs"}},
                "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]},
            },
        },
    }
    cluster.apply(theirs)
    cluster.apply(backend(namespace))
    wait_for(
        "NameConflict",
        lambda: cluster.condition(namespace, "tiny", "Degraded").get("reason") == "NameConflict",
    )
    message = cluster.condition(namespace, "tiny", "Degraded")["message"]
    print("refused:", message)
    assert "Deployment tiny already exists and does not belong" in message
    dep = cluster.deployment(namespace, "tiny")
    assert dep is not None
    assert [c["name"] for c in dep["spec"]["template"]["spec"]["containers"]] == ["web"]
    assert not dep["metadata"].get("ownerReferences")
    assert dep["metadata"]["generation"] == 1  # never written to
    assert not any(m["manager"] == "fabric-operator" for m in dep["metadata"]["managedFields"])
    assert cluster.service(namespace, "tiny") is None  # nothing half-applied


def test_network_policy_follows_the_spec(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    def policy() -> Any:
        try:
            return cluster.networking.read_namespaced_network_policy("tiny", namespace)
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    cluster.apply(backend(namespace, networkPolicy={}))
    created = wait_for("the NetworkPolicy", policy)
    assert created.metadata.owner_references[0].kind == "LLMBackend"
    assert created.spec.pod_selector.match_labels == {"llm.fabric.dev/backend": "tiny"}
    [rule] = created.spec.ingress
    assert rule.ports[0].port == 8080
    assert [p.pod_selector.match_labels for p in rule._from] == [
        {"app.kubernetes.io/name": "fabric-gateway"},
        {"llm.fabric.dev/client": "true"},
    ]
    # The gateway's pods in the gateway's namespace only (by default the operator's own:
    # this one runs outside the cluster, in "default"); labelled clients in this one.
    gateway_ns = os.environ.get("POD_NAMESPACE", "default")
    gateway, clients = rule._from
    assert gateway.namespace_selector.match_labels == {"kubernetes.io/metadata.name": gateway_ns}
    assert clients.namespace_selector is None
    # Written before the Deployment: no pod serves before its policy exists.
    [created_event] = wait_for(
        "the Created event",
        lambda: [e for e in cluster.events(namespace, "tiny") if e["reason"] == "Created"],
        5,
    )
    print("event:", created_event["message"])
    assert created_event["message"] == (
        "Created NetworkPolicy tiny and Deployment tiny and Service tiny"
    )
    cluster.apply(backend(namespace, networkPolicy={"enabled": False}))
    wait_for("the NetworkPolicy removed", lambda: policy() is None)
    assert children(cluster, namespace) is not None  # the rest stays


def test_someone_elses_service_with_the_name_is_never_taken_over(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """Another app's Service `qwen` (owned by a ConfigMap of theirs); a team creates the
    LLMBackend `qwen`. The Service is not written to at all (same resourceVersion: its
    selector, labels and owners as they were), the backend says NameConflict, no pod is
    asked for; and deleting the backend leaves the Service to its owner."""
    app = cluster.core.create_namespaced_config_map(namespace, {"metadata": {"name": "app"}})
    their_owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": "app", "uid": app.metadata.uid}
    cluster.core.create_namespaced_service(
        namespace,
        {
            "metadata": {
                "name": "qwen",
                "labels": {"app": "theirs"},
                "ownerReferences": [their_owner],
            },
            "spec": {
                "selector": {"app": "theirs"},
                "ports": [{"name": "web", "port": 80, "targetPort": 8080}],
            },
        },
    )
    before = cluster.service(namespace, "qwen")
    assert before is not None
    cluster.apply(backend(namespace, "qwen", networkPolicy={}))
    degraded = wait_for(
        "NameConflict",
        lambda: (
            (c := cluster.condition(namespace, "qwen", "Degraded")).get("reason") == "NameConflict"
            and c
        ),
        15,
    )
    print("refused:", degraded["message"])
    assert degraded["message"].startswith("Service qwen already exists and does not belong")
    assert "left alone" in degraded["message"]
    assert cluster.backend(namespace, "qwen")["status"]["phase"] == "Degraded"
    after = cluster.service(namespace, "qwen")
    assert after is not None
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert after["spec"]["selector"] == {"app": "theirs"}
    assert after["metadata"]["labels"] == {"app": "theirs"}
    assert after["metadata"]["ownerReferences"] == [their_owner]
    # Settled before anything is written: no Deployment beside their Service, no policy.
    assert cluster.deployment(namespace, "qwen") is None
    policies = cluster.networking.list_namespaced_network_policy(namespace).items
    assert policies == []
    warnings = [e["reason"] for e in cluster.events(namespace, "qwen") if e["type"] == "Warning"]
    assert warnings == ["NameConflict"]

    # A witness the garbage collector deletes with the backend: once it is gone, the
    # collector has handled the backend's deletion (and left their Service alone).
    uid = cluster.backend(namespace, "qwen")["metadata"]["uid"]
    ref = {"apiVersion": "llm.fabric.dev/v1alpha1", "kind": "LLMBackend", "name": "qwen"}
    cluster.core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "witness", "ownerReferences": [{**ref, "uid": uid}]}}
    )
    cluster.kubectl("delete", "llmb/qwen", "-n", namespace, "--wait=true", "--timeout=20s")
    if cluster.garbage_collector:

        def witness_gone() -> bool:
            try:
                cluster.core.read_namespaced_config_map("witness", namespace)
            except ApiException as err:
                if err.status == 404:
                    return True
                raise
            return False

        wait_for("the garbage collector to handle the deletion", witness_gone, 60)
    left = cluster.service(namespace, "qwen")
    assert left is not None and left["metadata"]["uid"] == before["metadata"]["uid"]
    assert left["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


REMOTE = {"apiVersion": "llm.fabric.dev/v1alpha1", "kind": "LLMBackend"}


def test_a_remote_backend_calls_only_an_allowed_host(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """A team points remote backends, with the namespace's Secret as their key, at a server
    of theirs and at another team's Service: InvalidSpec, one Warning each, never Remote.
    A documented provider's host (the default allow-list) becomes Remote."""
    cluster.core.create_namespaced_secret(
        namespace, {"metadata": {"name": "team-key"}, "stringData": {"key": "sk-x"}}
    )
    key = {"name": "team-key", "key": "key"}
    urls = {
        "exfil": "https://collector.evil.example/v1",
        "lateral": "http://qwen.team-b.svc.cluster.local:8000/v1",
        "openai": "https://api.openai.com/v1",
    }
    for name, url in urls.items():
        spec = {"engine": "remote", "remote": {"baseURL": url}, "apiKeySecretRef": key}
        cluster.apply({**REMOTE, "metadata": {"name": name, "namespace": namespace}, "spec": spec})

    def phase(name: str) -> str | None:
        return (cluster.backend(namespace, name).get("status") or {}).get("phase")

    wait_for("the three statuses", lambda: all(phase(n) for n in urls), 15)
    assert phase("openai") == "Remote"
    for name, host in (("exfil", "collector.evil.example"), ("lateral", "qwen.team-b.svc")):
        assert phase(name) == "Invalid"
        degraded = cluster.condition(namespace, name, "Degraded")
        print(f"{name}: {degraded['message']}")
        assert (degraded["status"], degraded["reason"]) == ("True", "InvalidSpec")
        assert degraded["message"].startswith(f"spec.remote.baseURL: host {host}")
        assert cluster.condition(namespace, name, "Ready")["status"] == "False"
        wait_for(
            f"{name}'s Warning",
            lambda n=name: [e["reason"] for e in cluster.events(namespace, n)] == ["InvalidSpec"],
            5,
        )


def test_a_field_dropped_from_the_spec_leaves_a_created_child(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """Children are created (POST), then recorded as applied: a field the rendering stops
    setting is taken out by the next apply, as if the child had been applied."""
    cluster.apply(backend(namespace, service={"annotations": {"keep": "1", "drop": "2"}}))
    svc = wait_for("the Service", lambda: cluster.service(namespace, "tiny"), 10)
    ours = [m for m in svc["metadata"]["managedFields"] if m["manager"] == "fabric-operator"]
    assert [m["operation"] for m in ours] == ["Apply"]
    assert "f:sessionAffinity" not in ours[0]["fieldsV1"]["f:spec"]  # a server default
    cluster.apply(backend(namespace, service={"annotations": {"keep": "1"}}))
    wait_for(
        "the annotation gone",
        lambda: (
            "drop" not in ((cluster.service(namespace, "tiny") or {})["metadata"]["annotations"])
        ),
        10,
    )
    annotations = (cluster.service(namespace, "tiny") or {})["metadata"]["annotations"]
    assert annotations["keep"] == "1"


def test_tool_calling_off_for_want_of_a_parser_is_a_warning_then_on_when_named(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """A vLLM backend of a family with no known parser serves chats, but an agent's first
    request would fail: status and a Warning Event say what to set; naming a parser turns
    it on, in the Deployment and in status."""
    vllm = {
        "engine": "vllm",
        "model": {"huggingface": {"repo": "google/gemma-2-9b-it"}},
        "resources": {"gpu": {"count": 1}},
    }
    obj = backend(namespace, "gemma")
    obj["spec"] = vllm
    assert cluster.apply(obj).returncode == 0
    off = wait_for(
        "ToolCalling False",
        lambda: (
            (c := cluster.condition(namespace, "gemma", "ToolCalling")).get("status") == "False"
            and c
        ),
        10,
    )
    assert off["reason"] == "NoParserKnown" and "spec.toolCalling.parser" in off["message"]
    assert cluster.backend(namespace, "gemma")["status"]["toolCalling"] == "off"
    warned = wait_for(
        "a ToolCallingOff Warning",
        lambda: [e for e in cluster.events(namespace, "gemma") if e["reason"] == "ToolCallingOff"],
        10,
    )
    assert warned[0]["type"] == "Warning"
    dep = wait_for("the Deployment", lambda: cluster.deployment(namespace, "gemma"), 10)
    assert (
        "--enable-auto-tool-choice" not in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    )

    obj["spec"] = {**vllm, "toolCalling": {"parser": "pythonic"}}
    assert cluster.apply(obj).returncode == 0
    wait_for(
        "status.toolCalling pythonic",
        lambda: cluster.backend(namespace, "gemma")["status"].get("toolCalling") == "pythonic",
        10,
    )
    args = wait_for(
        "the parser in the Deployment",
        lambda: (
            (
                a := cluster.deployment(namespace, "gemma")["spec"]["template"]["spec"][
                    "containers"
                ][0]["args"]
            )
            and "--tool-call-parser" in a
            and a
        ),
        10,
    )
    assert args[args.index("--tool-call-parser") + 1] == "pythonic"
    assert "--enable-auto-tool-choice" in args
    reasons = [(e["type"], e["reason"]) for e in cluster.events(namespace, "gemma")]
    assert ("Normal", "ToolCallingOn") in reasons


def test_a_disruption_budget_while_more_than_one_replica(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """policy/v1 from Kubernetes 1.21, v1beta1 before: the API version the server has."""
    version = cluster.kubectl("version", "-o", "json").stdout
    minor = int("".join(c for c in json.loads(version)["serverVersion"]["minor"] if c.isdigit()))
    group_version = "policy/v1" if minor >= 21 else "policy/v1beta1"
    path = f"/apis/{group_version}/namespaces/{namespace}/poddisruptionbudgets/tiny"

    def budget() -> dict[str, Any] | None:
        got = cluster.kubectl("get", "--raw", path, check=False)
        return json.loads(got.stdout) if got.returncode == 0 else None

    cluster.apply(backend(namespace, replicas=2))
    created = wait_for("the PodDisruptionBudget", budget)
    assert created["spec"]["maxUnavailable"] == 1
    assert created["spec"]["selector"] == {"matchLabels": {"llm.fabric.dev/backend": "tiny"}}
    [owner] = created["metadata"]["ownerReferences"]
    assert owner["kind"] == "LLMBackend" and owner["controller"] is True
    scaled = cluster.kubectl("scale", "llmb", "tiny", "-n", namespace, "--replicas=1")
    assert scaled.returncode == 0, scaled.stderr
    wait_for("the PodDisruptionBudget pruned at one replica", lambda: budget() is None)
    assert children(cluster, namespace) is not None  # the rest stays
    cluster.kubectl("scale", "llmb", "tiny", "-n", namespace, "--replicas=3")
    assert wait_for("the budget back at three", budget)["spec"]["maxUnavailable"] == 1
