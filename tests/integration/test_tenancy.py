"""Tenancy on a real API server, as hostile teams would try it (issue 15, gateway side).

Three namespaces the gateway serves or knows: team A's (`a-…`, which sorts first: before
scoping, its backends came first for every team's model), team B's (`b-…`), and the
gateway's own (`gw-…`, the admin's keys); a fourth, team C's, it does not serve. The
gateway runs as its own process with a token of the chart's gateway ServiceAccount, the
chart's RBAC applied as `helm template` renders it for these namespaces. Upstreams are
recording processes on 127.0.0.0/8, and B's engine pod one in a network namespace of
this test's: each test asserts on what the upstreams received.

Allowed remote hosts here: `localhost` over https only, `127.0.0.1` over http (B's
provider, and A's own). Team keys say `models: *` as they would have before (that it is
now the default is a unit test's): these tests fail on the gateway before issue 15 for
the holes themselves.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes.client.exceptions import ApiException

from fabric_operator.gateway.routes import KEY_LABEL
from tests.support.fixtures import OperatorProcess
from tests.support.gateway import gateway
from tests.support.kube import Cluster, run_pods, wait_for
from tests.support.tenancy import (
    Recording,
    chart_gateway_rbac,
    recorder,
    service_account_kubeconfig,
)
from tests.support.testhost import netns_host
from tests.support.upstream import Process

pytestmark = pytest.mark.integration

RELEASE = "fab"
ACCOUNT = f"{RELEASE}-fabric-operator-gateway"
B_KEY = "sk-team-b-5c1f0e"  # B's everyday key
B_FILE_KEY = "sk-team-b-file-77ad"  # made with --from-file: a newline after it
B_LIMITED = "sk-team-b-limited-0b3e"  # rpm 2, tenant team-b
A_KEY = "sk-team-a-hostile-9e21"  # models *, namespaces *, rpm 1000000, tenant team-b
A_DRAIN = "sk-team-a-drain-41c7"  # rpm 1, tenant team-b
ADMIN_KEY = "sk-admin-qwen-d00d"  # in the gateway's namespace: namespaces a, b; models qwen
C_KEY = "sk-team-c-unserved-3a3a"
BAD_KEY = "sk-bad-never-logged-6f6f"
B_PROVIDER = "sk-b-provider-1234"  # B's remote provider key
B_ENGINE = "sk-b-engine-5678"  # B's engine pod key
A_LOOT = "sk-payroll-db-password"  # a Secret of A's namespace its members cannot read
ALL_KEYS = [B_KEY, B_FILE_KEY, B_LIMITED, A_KEY, A_DRAIN, ADMIN_KEY, C_KEY, BAD_KEY]


@dataclass
class World:
    cluster: Cluster
    a: str
    b: str
    c: str
    gw_ns: str
    gw: Process
    log: Path
    kubeconfig: Path  # the gateway ServiceAccount's
    a_provider: Recording  # A's own provider: serves A's qwen and a-only
    b_provider: Recording  # B's provider: serves B's qwen
    b_pod: Recording  # B's engine pod, in the test host
    evil: Recording  # 127.0.0.2: no allowed host
    https_only: Recording  # localhost: allowed over https only

    def recorders(self) -> list[Recording]:
        return [self.a_provider, self.b_provider, self.b_pod, self.evil, self.https_only]


def key_secret(name: str, **data: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {KEY_LABEL: "true"}}, "stringData": data}


def remote(name: str, url: str, model: str, key: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "engine": "remote",
        "servedModelName": model,
        "remote": {"baseURL": url},
    }
    if key:
        spec["apiKeySecretRef"] = {"name": key, "key": "api-key"}
    return {
        "apiVersion": "llm.fabric.dev/v1alpha1",
        "kind": "LLMBackend",
        "metadata": {"name": name},
        "spec": spec,
    }


def create(cluster: Cluster, namespace: str, obj: dict[str, Any]) -> None:
    obj = {**obj, "metadata": {**obj["metadata"], "namespace": namespace}}
    if obj.get("kind") == "LLMBackend":
        result = cluster.apply(obj)
        assert result.returncode == 0, result.stderr
    else:
        cluster.core.create_namespaced_secret(namespace, obj)


def chat(world: World, key: str, model: str, text: str = "hi") -> httpx.Response:
    return httpx.post(
        world.gw.url + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": text}]},
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )


def models(world: World, key: str) -> list[str]:
    resp = httpx.get(
        world.gw.url + "/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=10
    )
    assert resp.status_code == 200, resp.text
    return [m["id"] for m in resp.json()["data"]]


def error_of(resp: httpx.Response) -> dict[str, Any]:
    assert resp.headers["content-type"] == "application/json"
    error: dict[str, Any] = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def can_i(world: World, verb: str, resource: str, *where: str) -> bool:
    account = f"system:serviceaccount:{world.gw_ns}:{ACCOUNT}"
    answer = world.cluster.kubectl(
        "auth", "can-i", verb, resource, *where, f"--as={account}", check=False
    ).stdout.strip()
    assert answer in {"yes", "no"}, answer
    return answer == "yes"


@contextlib.contextmanager
def namespaces(cluster: Cluster, *prefixes: str) -> Iterator[list[str]]:
    suffix = uuid.uuid4().hex[:6]
    names = [f"{p}-{suffix}" for p in prefixes]
    for name in names:
        cluster.core.create_namespace({"metadata": {"name": name}})
    try:
        yield names
    finally:
        for name in names:
            with contextlib.suppress(ApiException):
                cluster.core.delete_namespace(name)
            # No kubelet confirms pod deletions on simulated nodes: remove them here.
            for pod in cluster.core.list_namespaced_pod(name).items:
                with contextlib.suppress(ApiException):
                    cluster.core.delete_namespaced_pod(
                        pod.metadata.name, name, grace_period_seconds=0
                    )


@pytest.fixture(scope="module")
def world(
    cluster: Cluster,
    operator: OperatorProcess,
    helm: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[World]:
    workdir = tmp_path_factory.mktemp("tenancy")
    with contextlib.ExitStack() as stack:
        a, b, c, gw_ns = stack.enter_context(namespaces(cluster, "a", "b", "c", "gw"))
        rbac = chart_gateway_rbac(helm, RELEASE, gw_ns, [a, b])
        assert sorted(d["kind"] for d in rbac) == ["Role"] * 3 + ["RoleBinding"] * 3 + [
            "ServiceAccount"
        ]
        for doc in rbac:
            result = cluster.kubectl("apply", "-f", "-", stdin=json.dumps(doc), check=False)
            assert result.returncode == 0, result.stderr
        kubeconfig = service_account_kubeconfig(cluster, gw_ns, ACCOUNT, workdir / "gw.kubeconfig")

        host = stack.enter_context(netns_host(workdir))
        rec = {
            "a_provider": stack.enter_context(recorder("a-provider", workdir)),
            "b_provider": stack.enter_context(recorder("b-provider", workdir, key=B_PROVIDER)),
            "b_pod": stack.enter_context(
                recorder("b-pod", workdir, key=B_ENGINE, host=host.ip, port=8080, enter=host.enter)
            ),
            "evil": stack.enter_context(recorder("evil", workdir, host="127.0.0.2")),
            "https_only": stack.enter_context(recorder("https-only", workdir)),
        }
        https_only_port = rec["https_only"].url.rsplit(":", 1)[1].split("/")[0]

        # Team B: its provider (remote qwen), its engine (local), its keys.
        for obj in [
            {"metadata": {"name": "b-provider"}, "stringData": {"api-key": B_PROVIDER}},
            {"metadata": {"name": "engine"}, "stringData": {"k": B_ENGINE}},
            key_secret("b-key", key=B_KEY, models="*"),
            key_secret("b-file-key", key=B_FILE_KEY + "\n", models="*"),
            key_secret("b-limited", key=B_LIMITED, models="*", rpm="2", tenant="team-b"),
            remote("qwen", rec["b_provider"].url, "qwen", key="b-provider"),
            {
                "apiVersion": "llm.fabric.dev/v1alpha1",
                "kind": "LLMBackend",
                "metadata": {"name": "local"},
                "spec": {
                    "engine": "llamacpp",
                    "model": {"url": "https://example.invalid/tiny.gguf"},
                    "apiKeySecretRef": {"name": "engine", "key": "k"},
                },
            },
        ]:
            create(cluster, b, obj)
        # Team A: hostile. Its own qwen and a-only, then remote backends that try to send
        # a Secret of its namespace out, to B's pod, or over plain http; its keys.
        for obj in [
            {"metadata": {"name": "payroll"}, "stringData": {"api-key": A_LOOT}},
            key_secret(
                "a-key",
                key=A_KEY,
                models="*",
                namespaces="*",
                rpm="1000000",
                tenant="team-b",
            ),
            key_secret("a-drain", key=A_DRAIN, models="*", rpm="1", tenant="team-b"),
            key_secret("a-bad", key=BAD_KEY, rpm="lots"),
            remote("qwen", rec["a_provider"].url, "qwen"),
            remote("a-only", rec["a_provider"].url, "a-only"),
            remote("exfil", rec["evil"].url, "exfil", key="payroll"),
            remote("downgrade", f"http://localhost:{https_only_port}/v1", "down", key="payroll"),
            remote("lateral", f"http://{host.ip}:8080/v1", "lateral", key="payroll"),
        ]:
            create(cluster, a, obj)
        # The admin's key, and a key in a namespace the gateway does not serve.
        create(
            cluster, gw_ns, key_secret("admin", key=ADMIN_KEY, namespaces=f"{a},{b}", models="qwen")
        )
        create(cluster, c, key_secret("c-key", key=C_KEY, namespaces="*"))

        gw = stack.enter_context(
            gateway(
                f"--kubeconfig={kubeconfig}",
                f"--namespace={a},{b}",
                f"--namespace-of-gateway={gw_ns}",
                "--remote-hosts=localhost",
                "--remote-http-hosts=127.0.0.1",
                workdir=workdir,
                ready_path="/readyz",
            )
        )
        world = World(cluster, a, b, c, gw_ns, gw, workdir / "gateway.log", kubeconfig, **rec)
        # B's engine pod runs at the test host's address, as the Endpoints say.
        wait_for(
            "B's pod to run",
            lambda: run_pods(cluster, b, "llm.fabric.dev/backend=local", [host.ip]),
            30,
        )
        wait_for(
            "B's engine through the gateway",
            lambda: chat(world, B_KEY, "local").status_code == 200,
            30,
        )
        wait_for("A's key", lambda: chat(world, A_KEY, "a-only").status_code == 200, 10)
        yield world


def no_request_carries(recording: Recording, *values: str) -> bool:
    return not [r for r in recording.requests() if any(v in json.dumps(r) for v in values)]


# ---- hole 1: cross-namespace capture -----------------------------------------------------------


def test_a_teams_qwen_never_receives_another_teams_qwen_prompts(world: World) -> None:
    """A serves `qwen` too, from a namespace that sorts first: B's prompts still go to B's
    backend only, and A's to A's; each team's /v1/models is its own namespace's."""
    for i in range(3):
        resp = chat(world, B_KEY, "qwen", f"from-team-b-{i}")
        assert resp.status_code == 200, resp.text
        assert resp.headers["x-fabric-backend"] == f"{world.b}/qwen"
        assert resp.headers["x-seen-authorization"] == f"Bearer {B_PROVIDER}"
    resp = chat(world, A_KEY, "qwen", "from-team-a")
    assert resp.status_code == 200 and resp.headers["x-fabric-backend"] == f"{world.a}/qwen"
    b_prompts = [r for r in world.b_provider.requests() if "from-team-b" in r["body"]]
    assert len(b_prompts) == 3
    assert no_request_carries(world.a_provider, "from-team-b", B_KEY, B_PROVIDER)
    assert no_request_carries(world.b_provider, "from-team-a", A_KEY)
    assert models(world, B_KEY) == ["local", "qwen"]
    assert models(world, A_KEY) == ["a-only", "qwen"]  # none of its refused remotes


def test_another_namespaces_model_is_a_404_like_one_that_does_not_exist(world: World) -> None:
    """No oracle: B asking for A's model gets exactly the answer for a made-up one."""
    theirs, nothing = chat(world, B_KEY, "a-only"), chat(world, B_KEY, "zz-none")
    assert theirs.status_code == nothing.status_code == 404
    mine, made_up = error_of(theirs), error_of(nothing)
    assert mine["code"] == "model_not_found" and mine["type"] == "invalid_request_error"
    assert mine["message"].replace("a-only", "X") == made_up["message"].replace("zz-none", "X")
    assert world.a not in mine["message"]
    assert no_request_carries(world.a_provider, B_KEY)


# ---- hole 2: self-granted keys --------------------------------------------------------------


def test_a_team_key_grants_nothing_outside_its_namespace(world: World) -> None:
    """A's key says models *, namespaces *: it reaches A's backends, and not B's (404, no
    request upstream), nor does the gateway read keys of a namespace it does not serve."""
    before = len(world.b_pod.requests()) + len(world.b_provider.requests())
    for model in ["local", "zz-none"]:
        resp = chat(world, A_KEY, model, "a-wants-b")
        assert resp.status_code == 404 and error_of(resp)["code"] == "model_not_found"
    assert len(world.b_pod.requests()) + len(world.b_provider.requests()) == before
    resp = chat(world, C_KEY, "qwen")
    assert resp.status_code == 401 and error_of(resp)["code"] == "invalid_api_key"


def test_only_the_admins_key_reaches_across_namespaces(world: World) -> None:
    """The admin's key (gateway namespace) lists A and B and the model qwen: it reaches
    both teams' qwen, in a fixed order (A's sorts first), and nothing else."""
    wait_for("the admin's key", lambda: chat(world, ADMIN_KEY, "qwen").status_code != 401, 5)
    assert models(world, ADMIN_KEY) == ["qwen"]
    resp = chat(world, ADMIN_KEY, "qwen", "from-admin")
    assert resp.status_code == 200 and resp.headers["x-fabric-backend"] == f"{world.a}/qwen"
    denied = chat(world, ADMIN_KEY, "local")
    assert denied.status_code == 403 and error_of(denied)["code"] == "model_not_allowed"


def test_rate_limits_are_the_keys_own_whatever_its_tenant_entry_says(world: World) -> None:
    """A's keys say `tenant: team-b`, like B's limited key: A's rpm-1 key cannot use up
    B's allowance, nor can its rpm-1000000 key refill it."""
    assert chat(world, A_DRAIN, "qwen").status_code == 200  # its one request a minute
    assert chat(world, A_DRAIN, "qwen").status_code == 429
    codes = [chat(world, B_LIMITED, "qwen").status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    assert [chat(world, A_KEY, "qwen").status_code for _ in range(5)] == [200] * 5
    over = chat(world, B_LIMITED, "qwen")
    assert over.status_code == 429
    assert error_of(over)["message"].startswith(
        f"Rate limit reached for tenant '{world.b}/b-limited' on requests per min (RPM): "
        "Limit 2, Used 2."
    )
    with urllib.request.urlopen(world.gw.metrics_url) as r:  # type: ignore[attr-defined]
        metrics = r.read().decode()
    assert f'tenant="{world.b}/b-limited"' in metrics and f'tenant="{world.a}/a-drain"' in metrics
    assert 'tenant="team-b"' not in metrics  # never a name a team writes


# ---- hole 3: remote endpoints anywhere ---------------------------------------------------------


def test_remote_backends_call_only_allowed_hosts_and_never_send_the_secret(world: World) -> None:
    """A points remote backends, with a Secret of its namespace as their key, at a host
    not allowed (127.0.0.2), at B's engine pod, and over plain http at a host allowed
    over https only: none is routed, none called; B's own remote and pod still work."""
    for model in ["exfil", "lateral", "down"]:
        resp = chat(world, A_KEY, model, "exfiltrate")
        assert resp.status_code == 404, (model, resp.text)
    assert world.evil.requests() == [] and world.https_only.requests() == []
    assert no_request_carries(world.b_pod, A_LOOT, "exfiltrate")
    for recording in world.recorders():
        assert no_request_carries(recording, A_LOOT)
    log = world.log.read_text()
    assert f"LLMBackend {world.a}/exfil is not routed: spec.remote.baseURL host 127.0.0.2" in log
    https_only = "spec.remote.baseURL host localhost is allowed over https only"
    assert f"LLMBackend {world.a}/downgrade is not routed: {https_only}" in log
    assert f"LLMBackend {world.a}/lateral is not routed" in log
    assert A_LOOT not in log
    # The legitimate paths: B's provider over http (allowed) and B's pod, with their keys.
    remote_ok, pod_ok = chat(world, B_KEY, "qwen"), chat(world, B_KEY, "local")
    assert remote_ok.status_code == pod_ok.status_code == 200
    assert pod_ok.headers["x-seen-authorization"] == f"Bearer {B_ENGINE}"


# ---- hole 6 and key hygiene ---------------------------------------------------------------------


def test_the_gateway_account_reads_secrets_only_where_it_must(world: World) -> None:
    """Namespaced install: Secrets in the served namespaces (key Secrets are found by
    label, which RBAC cannot express; backends' keys by name) and list/watch in its own
    (the admin's keys); nothing in a namespace it does not serve, nothing cluster-wide,
    and it writes nothing."""
    a, b, c, own = world.a, world.b, world.c, world.gw_ns
    for ns in (a, b):
        assert can_i(world, "list", "secrets", "-n", ns)
        assert can_i(world, "get", "secrets", "-n", ns)
        assert can_i(world, "watch", "llmbackends.llm.fabric.dev", "-n", ns)
    assert can_i(world, "list", "secrets", "-n", own) and can_i(
        world, "watch", "secrets", "-n", own
    )
    assert not can_i(world, "get", "secrets", "-n", own)
    assert not can_i(world, "list", "llmbackends.llm.fabric.dev", "-n", own)
    for verb in ("get", "list", "watch"):
        assert not can_i(world, verb, "secrets", "-n", c)
        assert not can_i(world, verb, "secrets", "-A")
    for verb, resource in [
        ("create", "secrets"),
        ("update", "secrets"),
        ("delete", "secrets"),
        ("patch", "llmbackends.llm.fabric.dev"),
        ("get", "llmbackends.llm.fabric.dev"),  # it lists and watches; it never gets one
    ]:
        assert not can_i(world, verb, resource, "-n", a)
    denied = subprocess.run(
        ["kubectl", f"--kubeconfig={world.kubeconfig}", "get", "secrets", "-n", c],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert denied.returncode != 0 and "forbidden" in denied.stderr


def test_key_values_from_files_work_and_bad_keys_are_named_not_quoted(world: World) -> None:
    """A key Secret made with --from-file ends with a newline: the key works. A broken
    key Secret is logged by namespace/name and why; no key value is ever logged."""
    resp = chat(world, B_FILE_KEY, "qwen")
    assert resp.status_code == 200, resp.text
    assert chat(world, BAD_KEY, "qwen").status_code == 401
    deadline = time.monotonic() + 5
    while f"key Secret {world.a}/a-bad: rpm is not a whole number" not in world.log.read_text():
        assert time.monotonic() < deadline, "the bad key Secret was not reported"
        time.sleep(0.1)
    log = world.log.read_text()
    assert f"key Secret {world.a}/a-key: 'namespaces' ignored" in log
    for value in [*ALL_KEYS, B_PROVIDER, B_ENGINE, A_LOOT]:
        assert value not in log
