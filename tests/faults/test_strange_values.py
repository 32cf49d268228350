"""Oversized and strange values: 1 MiB strings, unicode, names too long for the children.
Each gives a clear error naming the field, never truncated, colliding or half-made children.
"""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest
from kubernetes.client.exceptions import ApiException

from tests.support.faults import (
    assert_alive,
    condition,
    cpu_spec,
    create,
    list_children,
    say,
)
from tests.support.fixtures import OperatorProcess, settle
from tests.support.kube import Cluster, wait_for

pytestmark = pytest.mark.integration

MiB = 1 << 20


def _settled(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    """The LLMBackend once its status is for its generation."""
    return wait_for(
        f"{name}'s status",
        lambda: (
            (o := cluster.backend(ns, name)).get("status", {}).get("observedGeneration")
            == o["metadata"]["generation"]
            and o
        ),
        20,
    )


def test_names_too_long_or_not_dns_labels(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    """LLMBackend names are DNS subdomains (up to 253 characters, dots allowed); the
    Service and pod labels need DNS-1035 labels (63, no dots, a leading letter)."""
    ok63 = "a" * 63
    names = {
        "253 chars": "n" * 253,
        "64 chars": "a" * 63 + "b",
        "64 chars, same 63-char prefix": "a" * 63 + "c",
        "dotted": "model.v2",
        "leading digit": "1model",
        "63 chars": ok63,
    }
    for name in names.values():
        create(cluster, namespace, name, cpu_spec())
    say("INJECTED LLMBackends named: %s", {k: f"{v[:20]}... ({len(v)})" for k, v in names.items()})
    seen = {}
    for what, name in names.items():
        obj = _settled(cluster, namespace, name)
        degraded = condition(obj, "Degraded")
        seen[what] = (degraded.get("reason"), degraded.get("message", "")[:110])
        if name == ok63:
            assert degraded.get("reason") == "AsExpected"
            continue
        assert degraded.get("reason") == "InvalidSpec", degraded
        assert "metadata.name" in degraded["message"] and "63" in degraded["message"]
    settle(1.0)
    deployments, services = list_children(cluster, namespace)
    children = sorted({c["metadata"]["name"] for c in deployments + services})
    say("SAW conditions %s", json.dumps(seen, indent=1))
    say("SAW children named %s", [f"{n[:10]}... ({len(n)})" for n in children])
    # No child under a truncated or shared name: only the 63-character one has children.
    assert children == [ok63]
    assert_alive(operator)


def test_unicode_values(cluster: Cluster, operator: OperatorProcess, namespace: str) -> None:
    served = "模型-ü-Ω"
    create(
        cluster,
        namespace,
        "uni",
        cpu_spec(
            servedModelName=served,
            env=[{"name": "GREETING", "value": "grüß dich ☺\u200b"}],
            extraArgs=["--system-prompt", "Réponds en français ✓"],
        ),
    )
    create(cluster, namespace, "uni-selector", cpu_spec(nodeSelector={"pool": "gpü"}))
    create(cluster, namespace, "uni-annotation", cpu_spec(service={"annotations": {"ключ": "v"}}))
    refused = None
    try:
        create(cluster, namespace, "modèle", cpu_spec())
    except ApiException as err:
        refused = err
    say(
        "INJECTED unicode in servedModelName %r, env, args; a nodeSelector value; a Service "
        "annotation key; the name 'modèle'",
        served,
    )
    assert refused is not None and refused.status == 422
    assert "metadata.name" in (refused.body or "")
    obj = _settled(cluster, namespace, "uni")
    dep = wait_for("uni's Deployment", lambda: cluster.deployment(namespace, "uni"), 10)
    svc = wait_for("uni's Service", lambda: cluster.service(namespace, "uni"), 10)
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--alias") + 1] == served
    assert obj["status"]["servedModelName"] == served
    for child in (dep, svc):
        kubernetes_validate.validate(_clean(child), "1.33", strict=True)
    sel = condition(_settled(cluster, namespace, "uni-selector"), "Degraded")
    ann = condition(_settled(cluster, namespace, "uni-annotation"), "Degraded")
    say(
        "SAW uni reconciled (args %s); name 'modèle' refused: %s; nodeSelector: %s %s; "
        "annotation: %s %s",
        args[-2:],
        json.loads(refused.body or "{}").get("message", "")[:120],
        sel.get("reason"),
        sel.get("message"),
        ann.get("reason"),
        ann.get("message"),
    )
    assert sel.get("reason") == "InvalidSpec" and "spec.nodeSelector" in sel["message"]
    assert ann.get("reason") == "InvalidSpec" and "spec.service.annotations" in ann["message"]
    for name in ("uni-selector", "uni-annotation"):
        assert cluster.deployment(namespace, name) is None
        assert cluster.service(namespace, name) is None


def _clean(obj: dict[str, Any]) -> dict[str, Any]:
    """A child as read back, without the server's bookkeeping, for schema validation."""
    meta = {k: v for k, v in obj["metadata"].items() if k != "managedFields"}
    return {**obj, "metadata": meta}


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (cpu_spec(image="x" * MiB), "spec.image"),
        (cpu_spec(model={"huggingface": {"repo": "a/" + "b" * MiB}}), "spec.model.huggingface"),
        (cpu_spec(model={"url": "https://h.invalid/" + "m" * MiB}), "spec.model.url"),
        (cpu_spec(apiKeySecretRef={"name": "s" * MiB, "key": "k"}), "spec.apiKeySecretRef.name"),
    ],
    ids=["image", "hf-repo", "url", "secret-name"],
)
def test_one_mib_strings_refused_by_the_schema(
    cluster: Cluster, namespace: str, spec: dict[str, Any], field: str
) -> None:
    with pytest.raises(ApiException) as refused:
        create(cluster, namespace, "huge", spec)
    message = json.loads(refused.value.body or "{}").get("message", "")
    say("INJECTED a 1 MiB %s; SAW %s %s", field, refused.value.status, message[:160])
    assert refused.value.status == 422 and field in message


EXEC_GAP = (
    "validation gap: spec.extraArgs items and spec.env values have no length or character "
    "limit (api/v1alpha1.py) and validation.py checks neither, so a 1 MiB argument or env "
    "value (Linux refuses any single argv/env string over MAX_ARG_STRLEN = 128 KiB with "
    "E2BIG) or one with a NUL byte (argv strings are C strings) becomes a Deployment whose "
    "container can never start. Fix: maxLength (e.g. 32 KiB) on extraArgs items and env "
    "values in the CRD, a total-size check (ARG_MAX) and no NUL in validation.py, as "
    "InvalidSpec naming the field"
)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (cpu_spec(extraArgs=["--system-prompt=" + "x" * MiB]), "spec.extraArgs[0]"),
        (cpu_spec(env=[{"name": "BIG", "value": "x" * MiB}]), "spec.env[0]"),
        (cpu_spec(extraArgs=["--x=a\u0000b"]), "spec.extraArgs[0]"),
    ],
    ids=["arg-1MiB", "env-1MiB", "arg-NUL"],
)
def test_values_no_container_can_exec_are_refused(
    cluster: Cluster,
    operator: OperatorProcess,
    namespace: str,
    spec: dict[str, Any],
    field: str,
) -> None:
    try:
        create(cluster, namespace, "exec", spec)
    except ApiException as err:
        say("INJECTED %s; SAW refused by the schema: %s", field, (err.body or "")[:200])
        assert err.status == 422 and field.split("[", maxsplit=1)[0] in (err.body or "")
        return
    degraded = condition(_settled(cluster, namespace, "exec"), "Degraded")
    dep = cluster.deployment(namespace, "exec")
    say(
        "INJECTED %s; SAW Degraded %s: %s; Deployment %s",
        field,
        degraded.get("reason"),
        degraded.get("message", "")[:200],
        f"created ({len(json.dumps(dep))} bytes)" if dep else "absent",
    )
    assert degraded.get("reason") == "InvalidSpec" and field in degraded["message"]
    assert dep is None


PARTIAL_CHILDREN_BUG = (
    "operator bug: validation.check_kubernetes_syntax checks annotation keys but not their "
    "total size (the API server allows 256 KiB of annotations per object), so with 300 KiB "
    "of spec.service.annotations reconciler._apply applies the Deployment, the API server "
    "refuses the Service, and the backend is left with a Deployment and no Service "
    "(ApplyFailed), against the README's promise that a refusal never leaves one child "
    "without the other. Fix: check the total size of spec.service.annotations (256 KiB, as "
    "apimachinery ValidateAnnotationsSize) in check_kubernetes_syntax, and more generally "
    "dry-run (dryRun=All) every child before applying any"
)


@pytest.mark.parametrize(
    ("name", "char", "count"),
    [
        ("ann", "x", 60_000),  # 300,000 characters, 300 KB
        # The API server's limit (256 KiB) is in bytes of UTF-8, so is the operator's check:
        # 150,000 'é' are 300 KB. Found by the property test once specs with characters
        # beyond U+FFFF stopped failing earlier, at the apply.
        ("annb", "é", 30_000),
    ],
)
def test_service_annotations_too_large_leave_no_half_made_backend(
    cluster: Cluster, operator: OperatorProcess, namespace: str, name: str, char: str, count: int
) -> None:
    big = {f"a{i}.example.com/note": char * count for i in range(5)}
    create(cluster, namespace, name, cpu_spec(service={"annotations": big}))
    degraded = condition(_settled(cluster, namespace, name), "Degraded")
    settle(1.0)
    dep, svc = cluster.deployment(namespace, name), cluster.service(namespace, name)
    say(
        "INJECTED 5 x %d %r (%d bytes) of Service annotations; SAW Degraded %s: %s; "
        "Deployment %s, Service %s",
        count,
        char,
        5 * count * len(char.encode()),
        degraded.get("reason"),
        degraded.get("message", "")[:200],
        "present" if dep else "absent",
        "present" if svc else "absent",
    )
    assert (dep is None) == (svc is None), "a Deployment without its Service (or vice versa)"
    assert degraded.get("reason") == "InvalidSpec"
    assert "spec.service.annotations" in degraded["message"]


def test_characters_beyond_the_bmp_reach_the_children(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    served = "llama-🦙"
    create(cluster, namespace, "emoji", cpu_spec(servedModelName=served))
    degraded = condition(_settled(cluster, namespace, "emoji"), "Degraded")
    dep = cluster.deployment(namespace, "emoji")
    say(
        "INJECTED servedModelName %r; SAW Degraded %s: %s; Deployment %s",
        served,
        degraded.get("reason"),
        degraded.get("message", "")[:200],
        "present" if dep else "absent",
    )
    assert dep is not None
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--alias") + 1] == served
