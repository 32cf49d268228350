"""Property: whatever LLMBackend is sent, the API server refuses it (schema), or the operator
marks it InvalidSpec with a specific message and makes no children, or reconciles it into
children that pass Kubernetes' own validation; the operator never dies and never leaves a
Deployment without its Service or the reverse.

Hypothesis generates the specs (well-formed, mutated, random JSON, oversized, unicode,
odd names); they are sent in one batch, then checked together, to fit a CI budget.
FABRIC_HYPOTHESIS_EXAMPLES raises the count, FABRIC_HYPOTHESIS_SEED changes the draw
(default: fixed, so that a failure reproduces).

Refusals at apply time (ApplyFailed, no children) are accepted only for the free-form fields
the README says the API server checks (affinity, env valueFrom). Failures that match a known
operator bug are counted and printed, and each known bug has its own strict xfail test
elsewhere in tests/faults; FABRIC_FAULTS_STRICT=1 makes them fail this test too.
"""

from __future__ import annotations

import copy
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from kubernetes.client.exceptions import ApiException

from fabric_operator.api.v1alpha1 import GROUP, PLURAL, VERSION
from fabric_operator.controller.kube import child_versions, server_version
from tests.faults.conftest import start_operator
from tests.support.faults import (
    assert_alive,
    condition,
    expected,
    list_backends,
    list_children,
    manifest,
    say,
    tracebacks,
)
from tests.support.kube import Cluster

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("FABRIC_HYPOTHESIS_EXAMPLES", "2000"))
SEED = int(os.environ.get("FABRIC_HYPOTHESIS_SEED", "1"))
STRICT = os.environ.get("FABRIC_FAULTS_STRICT") == "1"

# --- strategies --------------------------------------------------------------------------

LABEL = r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?"
label = st.from_regex(rf"\A{LABEL}\Z")
label_key = st.from_regex(rf"\A({LABEL}\.)?{LABEL}/{LABEL}\Z") | label
env_name = st.from_regex(r"\A[A-Z_][A-Z0-9_]{0,20}\Z").filter(
    lambda n: n not in {"HF_TOKEN", "VLLM_API_KEY", "API_KEY", "LLAMA_API_KEY", "OLLAMA_HOST"}
)
short_text = st.text(max_size=30)
quantity = st.sampled_from(["100m", "500m", "1", "2", "4", "1Gi", "512Mi", "16Gi", "1.5"])
GPU_TYPES = ["H100-80GB", "A100-80GB", "L4", "T4", "MI300X", "B200-unknown"]


def _maybe(
    draw: st.DrawFn, spec: dict[str, Any], key: str, strategy: st.SearchStrategy[Any]
) -> None:
    if draw(st.booleans()):
        spec[key] = draw(strategy)


@st.composite
def model_source(draw: st.DrawFn, engine: str) -> dict[str, Any]:
    hf = st.builds(
        lambda repo, rev, file: {
            k: v for k, v in {"repo": repo, "revision": rev, "file": file}.items() if v
        },
        st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}(/[A-Za-z0-9][A-Za-z0-9._-]{0,20})?\Z"),
        st.none() | st.sampled_from(["main", "v1.0", "a1b2c3"]),
        st.none() | st.sampled_from(["model-q4_k_m.gguf"]) if engine == "llamacpp" else st.none(),
    )
    choices: dict[str, st.SearchStrategy[Any]] = {
        "huggingface": hf,
        "pvc": st.fixed_dictionaries(
            {"claimName": label, "path": st.from_regex(r"\A[a-z][a-z0-9./-]{0,20}\Z")}
        ),
        "url": st.from_regex(r"\Ahttps://[a-z]{1,10}\.invalid/[a-z0-9]{1,10}\.gguf\Z"),
        "ollama": st.sampled_from(["llama3.2:1b", "qwen2.5:0.5b", "library/phi3:mini"]),
    }
    allowed = {
        "vllm": ["huggingface", "pvc"],
        "tgi": ["huggingface", "pvc"],
        "llamacpp": ["huggingface", "url", "pvc"],
        "ollama": ["ollama"],
    }[engine]
    # Now and then a source the engine cannot load (InvalidSpec).
    kind = draw(
        st.sampled_from(allowed) if draw(st.integers(0, 9)) else st.sampled_from(list(choices))
    )
    return {kind: draw(choices[kind])}


REMOTE = st.fixed_dictionaries(
    {
        # A documented provider's host (allowed by default), and two the platform admin
        # did not allow (InvalidSpec): a host of one's own, an address over plain http.
        "baseURL": st.sampled_from(
            ["https://api.openai.com/v1", "https://api.example.com/v1", "http://10.0.0.9:8000/v1"]
        )
    },
    optional={
        "model": st.sampled_from(["gpt-4o-mini", "claude-x"]),
        "provider": st.sampled_from(
            ["openai", "azure", "anthropic", "google", "openai-compatible"]
        ),
    },
)
SECRET_REFS = st.sampled_from(
    [
        {"name": "creds", "key": "api-key"},  # exists
        {"name": "creds", "key": "absent"},  # InvalidSpec: no such key
        {"name": "missing", "key": "k"},  # InvalidSpec: no such Secret
    ]
)
TOLERATIONS = st.sampled_from(
    [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        {"key": "pool", "operator": "Equal", "value": "llm"},
        {"operator": "Exists"},
        {"key": "x", "effect": "NoExecute", "tolerationSeconds": 30},
    ]
)
AFFINITIES = st.sampled_from(
    [
        {
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 1, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}
                ]
            }
        },
        # Free-form: refused by the API server at apply (ApplyFailed, by design).
        {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}
            }
        },
        {"nodeAffinity": {"bogus": 1}},
    ]
)
STRATEGIES = st.sampled_from(
    [
        {"type": "Recreate"},
        {"type": "RollingUpdate", "maxSurge": 1, "maxUnavailable": 0},
        {"type": "RollingUpdate", "maxSurge": "25%"},
    ]
)
# Fields every engine takes, each present or not.
POD_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "replicas": st.integers(0, 3),
    "servedModelName": st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:/-]{0,40}\Z"),
    "env": st.lists(
        st.fixed_dictionaries({"name": env_name, "value": short_text}),
        max_size=3,
        unique_by=lambda e: e["name"],
    ),
    "service": st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]),
            "port": st.integers(1, 65535),
            "annotations": st.dictionaries(label_key, short_text, max_size=2),
        },
    ),
    "nodeSelector": st.dictionaries(label_key, label, max_size=2),
    "tolerations": st.lists(TOLERATIONS, max_size=2),
    "priorityClassName": label,
    "image": st.from_regex(r"\A[a-z0-9]{1,10}(/[a-z0-9._-]{1,20})?(:[a-z0-9.]{1,10})?\Z"),
    "imagePullPolicy": st.sampled_from(["Always", "IfNotPresent", "Never"]),
    "imagePullSecrets": st.lists(st.fixed_dictionaries({"name": label}), max_size=2),
    "strategy": STRATEGIES,
}


@st.composite
def resources(draw: st.DrawFn, gpu_engine: bool) -> dict[str, Any]:
    gpus = draw(st.integers(1, 8) if gpu_engine else st.sampled_from([0, 0, 0, 1, 2]))
    out: dict[str, Any] = {}
    if gpus or draw(st.booleans()):
        gpu: dict[str, Any] = {"count": gpus}
        _maybe(draw, gpu, "vendor", st.sampled_from(["nvidia", "amd"]))
        if draw(st.integers(0, 4)) == 0:
            gpu["type"] = draw(st.sampled_from(GPU_TYPES))
        out["gpu"] = gpu
    if draw(st.booleans()):
        out["requests"] = {"cpu": draw(quantity), "memory": draw(st.sampled_from(["1Gi", "512Mi"]))}
        if draw(st.booleans()):
            out["limits"] = {"memory": "16Gi"}
    return out


@st.composite
def engine_options(draw: st.DrawFn, engine: str, gpus: int) -> dict[str, Any]:
    options: dict[str, Any] = {}
    _maybe(draw, options, "contextLength", st.integers(1, 10_000_000))
    if engine in ("vllm", "tgi"):
        divisors = [d for d in range(1, max(gpus, 1) + 1) if max(gpus, 1) % d == 0]
        _maybe(draw, options, "tensorParallel", st.sampled_from(divisors))
    if engine == "vllm":
        _maybe(draw, options, "gpuMemoryUtilization", st.floats(0.05, 1.0))
        _maybe(draw, options, "quantization", st.sampled_from(["awq", "gptq", "fp8"]))
        _maybe(draw, options, "dtype", st.sampled_from(["auto", "float16", "bfloat16", "float32"]))
    elif engine == "tgi" and draw(st.booleans()):
        options["quantization"] = draw(st.sampled_from(["awq", "gptq", "eetq", "bitsandbytes"]))
    elif engine == "tgi":
        _maybe(draw, options, "dtype", st.sampled_from(["float16", "bfloat16"]))
    return options


@st.composite
def well_formed(draw: st.DrawFn) -> dict[str, Any]:
    """Specs a user could write: mostly valid, some InvalidSpec by design (a source the
    engine cannot load, an unknown GPU type, a missing Secret or key...)."""
    engine = draw(st.sampled_from(["vllm", "tgi", "llamacpp", "ollama", "remote"]))
    if engine == "remote":
        spec: dict[str, Any] = {"engine": "remote", "remote": draw(REMOTE)}
        _maybe(draw, spec, "apiKeySecretRef", SECRET_REFS)
        return spec
    spec = {"engine": engine, "model": draw(model_source(engine))}
    res = draw(resources(engine in ("vllm", "tgi")))
    if res:
        spec["resources"] = res
    options = draw(engine_options(engine, res.get("gpu", {}).get("count", 0)))
    if options:
        spec["engineOptions"] = options
    for key, strategy in POD_FIELDS.items():
        _maybe(draw, spec, key, strategy)
    if engine != "ollama":
        args = r"\A--[a-z][a-z-]{0,15}(=[A-Za-z0-9._-]{0,10})?\Z"
        _maybe(draw, spec, "extraArgs", st.lists(st.from_regex(args), max_size=3))
        if draw(st.integers(0, 3)) == 0:
            spec["apiKeySecretRef"] = draw(SECRET_REFS)
        if draw(st.integers(0, 5)) == 0:
            spec["hfTokenSecretRef"] = {"name": "creds", "key": "hf-token"}
    if draw(st.integers(0, 7)) == 0:
        spec["affinity"] = draw(AFFINITIES)
    return spec


json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3)
    ),
    max_leaves=8,
)
oversized = st.sampled_from([1_000, 20_000, 131_073, 300_000]).flatmap(
    lambda n: st.sampled_from(["x", "é", "模", "🦙", "\x00", "\u200b"]).map(
        lambda c: c * (n // len(c.encode()))
    )
)
odd_value = (
    json_value
    | st.sampled_from(
        [-1, 0, 65, 1001, 2**31, 2**63 - 1, -(2**63), 1.5, "1", "", " ", "-1", True, [], {}]
    )
    | oversized
    | st.text(min_size=1, max_size=200)
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _set(root: Any, path: tuple[Any, ...], value: Any, delete: bool = False) -> Any:
    if not path:
        return value
    parent = root
    for part in path[:-1]:
        parent = parent[part]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return root


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    spec = copy.deepcopy(draw(well_formed()))  # sampled constants must stay as they are
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(spec) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if action == "delete":
            spec = _set(spec, path, None, delete=True)
        elif action == "add":
            parent = path[:-1]
            target = spec
            for part in parent:
                target = target[part]
            if isinstance(target, dict):
                target[
                    draw(
                        st.sampled_from(["extra", "replica", "gpu", "x-y", "engine"])
                        | st.text(max_size=8)
                    )
                ] = draw(odd_value)
            elif isinstance(target, list):
                target.append(draw(odd_value))
        else:
            spec = _set(spec, path, draw(odd_value))
    return spec


@dataclass(frozen=True)
class Case:
    kind: str  # well-formed, mutated, random, oversized
    name_suffix: str
    spec: Any


def _oversize(parts: tuple[dict[str, Any], str, str]) -> dict[str, Any]:
    spec, field, big = parts
    spec = dict(spec)
    if field == "extraArgs":
        spec["extraArgs"] = ["--prompt=" + big]
    elif field == "env":
        spec["env"] = [{"name": "BIG", "value": big}]
    elif field == "service":
        spec["service"] = {"annotations": {"example.com/big": big}}
    else:
        spec[field] = big
    return spec


ODD_SUFFIXES = [".v2", "A", "ü", "_", "-", "-" + "a" * 57, "-" + "a" * 58, "-" + "a" * 246]
name_suffix = st.integers(0, 9).flatmap(
    lambda n: st.sampled_from(ODD_SUFFIXES) if n == 0 else st.just("")
)


def _weighted(*choices: tuple[int, st.SearchStrategy[Case]]) -> st.SearchStrategy[Case]:
    total = sum(w for w, _ in choices)

    def pick(n: int) -> st.SearchStrategy[Case]:
        for weight, strategy in choices:
            if n < weight:
                return strategy
            n -= weight
        raise AssertionError(n)

    return st.sampled_from(range(total)).flatmap(pick)


cases = _weighted(
    (40, st.builds(Case, st.just("well-formed"), name_suffix, well_formed())),
    (35, st.builds(Case, st.just("mutated"), name_suffix, mutated())),
    (
        15,
        st.builds(
            Case,
            st.just("random"),
            st.just(""),
            st.dictionaries(
                st.sampled_from(["engine", "model", "replicas", "resources", "spec", "x"])
                | st.text(max_size=8),
                json_value,
                max_size=5,
            )
            | json_value,
        ),
    ),
    (
        10,
        st.builds(
            Case,
            st.just("oversized"),
            st.just(""),
            well_formed()
            .flatmap(
                lambda s: st.tuples(
                    st.just(s),
                    st.sampled_from(["servedModelName", "image", "extraArgs", "env", "service"]),
                    oversized,
                )
            )
            .map(_oversize),
        ),
    ),
)


def generate(n: int, draw_seed: int) -> list[Case]:
    out: list[Case] = []

    @seed(draw_seed)
    @settings(
        max_examples=n,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(cases)
    def collect(case: Case) -> None:
        out.append(case)

    collect()
    return out


# --- outcomes ----------------------------------------------------------------------------

# An apply names the field (spec.template.spec.affinity); a create's decoder its Go type
# (v1.PodSpec.Affinity).
FREE_FORM = re.compile(r"\.affinity|\.valueFrom", re.IGNORECASE)
# None today. Fixed since, and no longer excused: characters beyond U+FFFF broke every
# apply (test_strange_values.py::test_characters_beyond_the_bmp_reach_the_children);
# Service annotations were measured in characters, not bytes
# (test_strange_values.py::test_service_annotations_too_large_leave_no_half_made_backend[annb]).
KNOWN_BUGS: dict[str, tuple[Callable[[str], bool], str]] = {}


def _clean(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    """A child from a list (no apiVersion and kind), without managedFields."""
    meta = {k: v for k, v in obj["metadata"].items() if k != "managedFields"}
    # A budget read as policy/v1beta1 (a 1.20 server) has v1's fields: checked as v1.
    api = {"Deployment": "apps/v1", "PodDisruptionBudget": "policy/v1"}.get(kind, "v1")
    return {**obj, "apiVersion": api, "kind": kind, "metadata": meta}


@dataclass
class Outcomes:
    counts: Counter[str]
    known: Counter[str]
    violations: list[str]


def _classify_one(
    obj: dict[str, Any], have: dict[str, dict[str, Any]], out: Outcomes, label_: str
) -> None:
    """One accepted LLMBackend, once the operator has settled."""
    degraded = condition(obj, "Degraded")
    reason, message = degraded.get("reason"), degraded.get("message") or ""
    spec = json.dumps(obj.get("spec"))[:300]
    if reason == "InvalidSpec":
        out.counts["InvalidSpec"] += 1
        if not re.search(r"\b(spec|metadata)\.", message):
            out.violations.append(f"{label_}: InvalidSpec without a field: {message[:200]}")
        if have:
            out.violations.append(f"{label_}: InvalidSpec but has {sorted(have)}")
        return
    if reason == "ApplyFailed":
        bug = next((b for b, (match, _) in KNOWN_BUGS.items() if match(message)), None)
        if bug is not None:
            out.known[bug] += 1
            out.counts[f"ApplyFailed: known bug ({bug})"] += 1
        elif FREE_FORM.search(message) and len(have) != 1:
            out.counts["ApplyFailed: free-form field refused by the API server"] += 1
        else:
            out.violations.append(
                f"{label_}: ApplyFailed {message[:250]} (children {sorted(have)}); {spec}"
            )
        return
    want = expected(obj)
    if not want.valid:
        out.violations.append(f"{label_}: reconciled ({reason}) but invalid: {want.problems}")
        return
    out.counts["reconciled" if want.children else "reconciled (remote: no children)"] += 1
    wanted = {m["kind"] for m in want.children}
    if set(have) != wanted:
        out.violations.append(f"{label_}: children {sorted(have)}, expected {sorted(wanted)}")
        return
    for child_kind, child in have.items():
        out.counts["children validated"] += 1
        try:
            kubernetes_validate.validate(_clean(child_kind, child), "1.33", strict=True)
        except kubernetes_validate.ValidationError as err:
            out.violations.append(f"{label_}: {child_kind} fails 1.33 validation: {err!s:.300}")


def list_budgets(cluster: Cluster, ns: str) -> list[dict[str, Any]]:
    """The namespace's PodDisruptionBudgets, in the API version the server has."""
    server = server_version(
        json.loads(cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]
    )
    version = child_versions(server).get("PodDisruptionBudget", "v1")
    path = f"/apis/policy/{version}/namespaces/{ns}/poddisruptionbudgets"
    items: list[dict[str, Any]] = json.loads(cluster.kubectl("get", "--raw", path).stdout)["items"]
    return items


def classify(cluster: Cluster, ns: str, accepted: dict[str, str]) -> Outcomes:
    out = Outcomes(Counter(), Counter(), [])
    backends = {b["metadata"]["name"]: b for b in list_backends(cluster, ns)}
    deployments, services = list_children(cluster, ns)
    children = {
        "Deployment": {d["metadata"]["name"]: d for d in deployments},
        "Service": {s["metadata"]["name"]: s for s in services},
        "PodDisruptionBudget": {b["metadata"]["name"]: b for b in list_budgets(cluster, ns)},
    }
    for name, kind in accepted.items():
        obj = backends.get(name)
        label_ = f"{name} ({kind})"
        if obj is None:
            out.violations.append(f"{label_}: accepted, then gone")
            continue
        status = obj.get("status") or {}
        if status.get("observedGeneration") != obj["metadata"].get("generation"):
            out.violations.append(f"{label_}: never reconciled ({json.dumps(status)[:200]})")
            continue
        have = {k: c[name] for k, c in children.items() if name in c}
        _classify_one(obj, have, out, label_)
    return out


def _submit(
    cluster: Cluster, ns: str, generated: list[Case]
) -> tuple[dict[str, str], Counter[str], list[str]]:
    accepted: dict[str, str] = {}
    refused: Counter[str] = Counter()
    odd: list[str] = []
    for i, case in enumerate(generated):
        name = f"h{i:05d}{case.name_suffix}"
        body = manifest(ns, name, case.spec)
        try:
            cluster.custom.create_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, body, _request_timeout=60
            )
        except ApiException as err:
            too_large = err.status == 500 and "request is too large" in str(err.body)
            if err.status in (400, 413, 422) or too_large:
                refused["500 too large for etcd" if too_large else str(err.status)] += 1
                message = (
                    json.loads(err.body or "{}").get("message", "")
                    if err.body and err.body.startswith("{")
                    else str(err.body)
                )
                if not message:
                    odd.append(f"{name}: refused {err.status} without a message")
            else:
                odd.append(f"{name} ({case.kind}): {err.status} {str(err.body)[:200]}")
            continue
        accepted[name] = case.kind
    return accepted, refused, odd


def test_any_llmbackend_is_refused_invalid_or_reconciled(
    cluster: Cluster, namespace: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    ns = namespace
    # No pods: thousands of Deployments must cost the 2-core machine nothing but objects.
    cluster.core.create_namespaced_resource_quota(
        ns,
        {"metadata": {"name": "no-replicasets"}, "spec": {"hard": {"count/replicasets.apps": "0"}}},
    )
    cluster.core.create_namespaced_secret(
        ns, {"metadata": {"name": "creds"}, "stringData": {"api-key": "k", "hf-token": "t"}}
    )
    op = start_operator(cluster, ns, tmp_path)
    request.addfinalizer(op.stop)  # a failed assertion must not leave it running
    started = time.monotonic()
    generated = generate(EXAMPLES, SEED)
    kinds = Counter(c.kind for c in generated)
    say(
        "INJECTED %d generated LLMBackends (seed %d): %s, generated in %.1fs",
        len(generated),
        SEED,
        dict(kinds),
        time.monotonic() - started,
    )

    sent = time.monotonic()
    accepted, refused, odd = _submit(cluster, ns, generated)
    say(
        "SAW the API server refuse %d (%s), accept %d, in %.1fs",
        sum(refused.values()),
        dict(refused),
        len(accepted),
        time.monotonic() - sent,
    )

    def settled() -> bool:
        backends = list_backends(cluster, ns)
        return all(
            (b.get("status") or {}).get("observedGeneration") == b["metadata"].get("generation")
            for b in backends
        ) and operator_queue_empty(op)

    waited = time.monotonic()
    deadline = waited + 180
    while not settled() and time.monotonic() < deadline:
        time.sleep(2)
    say("the operator settled %.1fs after the last create", time.monotonic() - waited)
    outcomes = classify(cluster, ns, accepted)
    counts = outcomes.counts
    say(
        "SAW outcomes of %d specs: refused by the API server %d; %s; known operator bugs %s; "
        "violations %d; total %.0fs",
        len(generated),
        sum(refused.values()),
        dict(counts),
        dict(outcomes.known) or "none",
        len(outcomes.violations),
        time.monotonic() - started,
    )
    for bug, hits in outcomes.known.items():
        say("  known bug %r: %d specs (pinned by %s)", bug, hits, KNOWN_BUGS[bug][1])
    for v in outcomes.violations[:30]:
        say("  VIOLATION %s", v)
    assert_alive(op)
    crashes = tracebacks(op)
    assert not crashes, crashes[:3]
    assert not odd, odd[:10]
    assert not outcomes.violations, outcomes.violations[:10]
    if STRICT:
        assert not outcomes.known, dict(outcomes.known)
    assert sum(refused.values()) > 0 and counts["InvalidSpec"] > 0 and counts["reconciled"] > 0
    op.stop()


def operator_queue_empty(op: Any) -> bool:
    try:
        return bool(op.metric("fabric_operator_queue_depth") == 0)
    except OSError:
        return False
