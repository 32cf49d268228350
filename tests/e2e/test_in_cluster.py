"""End to end on real nodes: the chart installed with Helm from the locally built image,
the operator and the gateway running as pods with their ServiceAccount tokens, and a CPU
llama.cpp LLMBackend whose engine pods (the local engine image) answer the official
`openai` client through their Service and through the gateway's Service.

What a user judges the operator by is checked against a real kubelet: probes, restarts
and back-off, the security context the kernel applies, Endpoints and kube-proxy, `helm
test`, upgrade and uninstall. Figures are printed (`pytest -s`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from fabric_operator.gateway.routes import KEY_LABEL
from fabric_operator.machinery import metrics
from tests.conftest import REPO
from tests.support.fixtures import temporary_namespace
from tests.support.kube import Cluster, hostpath_claim, wait_for
from tests.support.realcluster import RealCluster
from tests.support.tiny_model import write_tiny_gguf

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

CHART = REPO / "charts" / "fabric-operator"
RELEASE, SYSTEM = "fab", "fabric-system"
OPERATOR, GATEWAY = f"{RELEASE}-fabric-operator", f"{RELEASE}-fabric-operator-gateway"
CRD = "llmbackends.llm.fabric.dev"
OPERATOR_PODS, GATEWAY_PODS = (
    "app.kubernetes.io/name=fabric-operator",
    "app.kubernetes.io/name=fabric-gateway",
)
ENGINE_KEY = "sk-engine-e2e-5f1c"  # the backend's own key (apiKeySecretRef)
TENANT_KEY = "sk-tenant-e2e-93ab"  # a gateway tenant's key
MODEL, PORT = "tiny", 8080
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello."},
]


@dataclass
class Stack:
    real: RealCluster
    namespace: str
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def cluster(self) -> Cluster:
        return self.real.cluster

    def service_url(self, namespace: str, name: str, port: int) -> str:
        ip = self.cluster.core.read_namespaced_service(name, namespace).spec.cluster_ip
        return f"http://{ip}:{port}"

    @property
    def gateway(self) -> str:
        return self.service_url(SYSTEM, GATEWAY, 80)


def helm(real: RealCluster, *args: str | Path, timeout: float = 300) -> str:
    proc = subprocess.run(
        [str(_helm()), f"--kubeconfig={real.cluster.kubeconfig}", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"helm {args}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _helm() -> Path:
    out = subprocess.run(
        ["bash", str(REPO / "hack" / "get-helm.sh")], check=True, capture_output=True, text=True
    ).stdout
    return Path(out.strip().splitlines()[-1])


def image_values(real: RealCluster) -> list[str]:
    repository, tag = real.images["operator"].ref.rsplit(":", 1)
    return [
        *("--set", f"image.repository={repository}", "--set", f"image.tag={tag}"),
        *("--set", "image.pullPolicy=Never"),
    ]


@pytest.fixture(scope="module")
def stack(real: RealCluster) -> Iterator[Stack]:
    """The chart, installed and Ready (real probes), and a team namespace with the
    backend's key and a tenant key."""
    started = time.monotonic()
    helm(
        real,
        *("install", RELEASE, CHART, "-n", SYSTEM, "--create-namespace"),
        *image_values(real),
        *("--set", "gateway.enabled=true", "--wait", "--timeout=240s"),
    )
    installed = time.monotonic() - started
    try:
        with temporary_namespace(real.cluster) as ns:
            core = real.cluster.core
            core.create_namespaced_secret(
                ns, {"metadata": {"name": "engine-key"}, "stringData": {"api-key": ENGINE_KEY}}
            )
            core.create_namespaced_secret(
                ns,
                {
                    "metadata": {"name": "team-key", "labels": {KEY_LABEL: "true"}},
                    "stringData": {"key": TENANT_KEY, "models": "*", "tenant": "team"},
                },
            )
            result = Stack(real, ns, {"helm_install_wait_s": round(installed, 1)})
            yield result
            real.cluster.kubectl("delete", "llmb", "--all", "-n", ns, check=False)
            print(f"\nfigures: {json.dumps(result.figures, indent=1)}")
    finally:
        if real.cluster.kubectl("get", "ns", SYSTEM, check=False).returncode == 0:
            kube = f"--kubeconfig={real.cluster.kubeconfig}"
            subprocess.run(
                [str(_helm()), kube, "uninstall", RELEASE, "-n", SYSTEM],
                capture_output=True,
                check=False,
            )
            real.cluster.kubectl("delete", "namespace", SYSTEM, "--wait=false", check=False)


# ---- helpers ---------------------------------------------------------------------------


def backend(real: RealCluster, ns: str, replicas: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "llm.fabric.dev/v1alpha1",
        "kind": "LLMBackend",
        "metadata": {"name": MODEL, "namespace": ns},
        "spec": {
            "engine": "llamacpp",
            "image": real.images["engine"].ref,  # llama-server's CLI, on CPU, no registry
            "imagePullPolicy": "Never",
            "model": {"url": "https://models.invalid/tiny.gguf"},  # the image's tiny GGUF
            "replicas": replicas,
            "engineOptions": {"contextLength": 1024},
            "apiKeySecretRef": {"name": "engine-key", "key": "api-key"},
        },
    }


def pods(cluster: Cluster, ns: str, selector: str) -> list[Any]:
    items = cluster.core.list_namespaced_pod(ns, label_selector=selector).items
    return sorted(
        (p for p in items if not p.metadata.deletion_timestamp), key=lambda p: p.metadata.name
    )


def engine_pods(stack: Stack) -> list[Any]:
    return pods(stack.cluster, stack.namespace, f"llm.fabric.dev/backend={MODEL}")


def pod_json(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    resp = cluster.core.read_namespaced_pod(name, ns, _preload_content=False)
    data: dict[str, Any] = json.loads(resp.data)
    return data


def container_status(cluster: Cluster, ns: str, pod: str) -> dict[str, Any]:
    statuses = pod_json(cluster, ns, pod).get("status", {}).get("containerStatuses") or [{}]
    return dict(statuses[0])


def pod_ready(cluster: Cluster, ns: str, pod: str) -> bool:
    conditions = pod_json(cluster, ns, pod).get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def endpoint_ips(cluster: Cluster, ns: str, name: str) -> tuple[list[str], list[str]]:
    """(ready, not ready) pod addresses the Endpoints controller published."""
    try:
        ep = cluster.core.read_namespaced_endpoints(name, ns)
    except Exception:  # not created yet
        return [], []
    ready: list[str] = []
    not_ready: list[str] = []
    for subset in ep.subsets or []:
        ready += [a.ip for a in subset.addresses or []]
        not_ready += [a.ip for a in subset.not_ready_addresses or []]
    return sorted(ready), sorted(not_ready)


def status(cluster: Cluster, ns: str, name: str = MODEL) -> dict[str, Any]:
    return dict(cluster.backend(ns, name).get("status") or {})


def pod_events(cluster: Cluster, ns: str, pod: str) -> list[Any]:
    return list(
        cluster.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={pod}").items
    )


def client(base: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def check_chat(c: openai.OpenAI) -> openai.types.chat.ChatCompletion:
    """A completion of the OpenAI shape (the text of a random model is nonsense)."""
    answer = c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)
    assert answer.object == "chat.completion"
    assert answer.model == MODEL
    assert len(answer.choices) == 1
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason in {"stop", "length"}
    assert answer.usage is not None and answer.usage.prompt_tokens > 0
    return answer


def check_stream(c: openai.OpenAI) -> int:
    with c.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=8, stream=True
    ) as stream:
        chunks = list(stream)  # the client stops at `data: [DONE]`
    assert chunks and all(ch.object == "chat.completion.chunk" for ch in chunks)
    choices = [ch.choices[0] for ch in chunks if ch.choices]
    assert choices[0].delta.role == "assistant"
    assert choices[-1].finish_reason in {"stop", "length"}
    return len(chunks)


def answers(base: str, key: str = ENGINE_KEY) -> bool:
    try:
        check_chat(client(base, key))
        return True
    except (openai.APIConnectionError, openai.APITimeoutError):
        return False


def routed(stack: Stack, model: str = MODEL) -> Any:
    """A raw answer through the gateway, or None while it has no route yet."""
    try:
        return client(stack.gateway, TENANT_KEY).chat.completions.with_raw_response.create(
            model=model, messages=MESSAGES, max_tokens=8
        )
    except openai.APIConnectionError:  # kube-proxy has not programmed the Service yet
        return None
    except openai.APIStatusError as err:
        if err.status_code in {404, 502, 503}:  # not routed yet
            return None
        raise


def chats_served(ip: str) -> int:
    """Chat completions this engine answered, from its own /metrics."""
    r = httpx.get(f"http://{ip}:{PORT}/metrics", headers={"Authorization": f"Bearer {ENGINE_KEY}"})
    r.raise_for_status()
    samples = metrics.parse(r.text)
    return int(
        samples.get('fabric_engine_http_requests_total{path="/v1/chat/completions",code="200"}', 0)
    )


def gateway_status(stack: Stack) -> int:
    return httpx.post(
        f"{stack.gateway}/v1/chat/completions",
        json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2},
        headers={"authorization": f"Bearer {TENANT_KEY}"},
        timeout=60,
    ).status_code


@contextlib.contextmanager
def sampled(what: Callable[[], Any], interval: float = 0.1) -> Iterator[list[Any]]:
    """what() every interval while the block runs (a thread of its own): every value."""
    values: list[Any] = []
    done = threading.Event()

    def loop() -> None:
        while not done.is_set():
            try:
                values.append(what())
            except Exception as err:
                values.append(type(err).__name__)
            done.wait(interval)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield values
    finally:
        done.set()
        thread.join(timeout=70)


def transitions(values: list[Any]) -> list[Any]:
    return [v for i, v in enumerate(values) if i == 0 or values[i - 1] != v]


def proc_status(real: RealCluster, ns: str, pod: str, container: str) -> dict[str, str]:
    """/proc/PID/status of the container's first process, as the node's kernel reports it."""
    node, cid = real.container(ns, pod, container)
    pid = node.ctr("tasks", "ps", cid).stdout.split()[2]
    text = node.run("cat", f"/proc/{pid}/status").stdout
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


# ---- tests -------------------------------------------------------------------------------


def test_operator_and_gateway_run_as_pods_from_their_image(stack: Stack) -> None:
    real, cluster = stack.real, stack.cluster
    image = real.images["operator"].ref
    for name, selector in (
        ("operator", OPERATOR_PODS),
        ("gateway", GATEWAY_PODS),
    ):
        running = pods(cluster, SYSTEM, selector)
        assert running, f"no {name} pod"
        for pod in running:
            [cs] = pod.status.container_statuses
            assert cs.image == image and cs.ready and cs.restart_count == 0, (name, cs)
            assert pod_ready(cluster, SYSTEM, pod.metadata.name)
            # In-cluster configuration: the pod's own ServiceAccount token, nothing else.
            mounts = {m.mount_path for m in pod.spec.containers[0].volume_mounts or []}
            assert "/var/run/secrets/kubernetes.io/serviceaccount" in mounts
            st = proc_status(real, SYSTEM, pod.metadata.name, cs.name)
            assert st["Uid"].split()[:2] == ["65532", "65532"] and st["CapEff"] == "0" * 16
    # The operator talks to the API server from inside (the `kubernetes` Service).
    [op] = pods(cluster, SYSTEM, OPERATOR_PODS)
    log = cluster.kubectl("logs", "-n", SYSTEM, op.metadata.name).stdout
    assert "Traceback" not in log, log[-3000:]
    # `helm test`: a pod of its own checks the operator's health through its Service.
    out = helm(real, "test", RELEASE, "-n", SYSTEM, "--timeout=120s")
    assert "Phase:          Succeeded" in out, out


def test_backend_answers_through_its_service_and_the_gateway(stack: Stack) -> None:
    cluster, ns = stack.cluster, stack.namespace
    marks: dict[str, float] = {}
    applied = time.monotonic()
    assert cluster.apply(backend(stack.real, ns)).returncode == 0

    def first_answer() -> str | None:
        pods_now = engine_pods(stack)
        statuses = pods_now[0].status.container_statuses if pods_now else None
        if statuses and statuses[0].state.running and "running" not in marks:
            marks["running"] = time.monotonic() - applied
        ready, _ = endpoint_ips(cluster, ns, MODEL)
        if ready and "endpoints" not in marks:
            marks["endpoints"] = time.monotonic() - applied
            marks.setdefault("running", marks["endpoints"])  # both between two polls
        service = stack.service_url(ns, MODEL, PORT)
        if ready and answers(service):
            marks["answer"] = time.monotonic() - applied
            return service
        return None

    service = wait_for("the first answer through the Service", first_answer, 240, 0.1)
    print(
        "\napply -> engine container running {running:.2f}s, in the Endpoints "
        "{endpoints:.2f}s, first answer through the Service {answer:.2f}s".format(**marks)
    )
    stack.figures["apply_to"] = {k: round(v, 2) for k, v in marks.items()}
    st = wait_for(
        "phase Ready", lambda: (s := status(cluster, ns)).get("phase") == "Ready" and s, 60
    )
    assert st["endpoint"] == f"http://{MODEL}.{ns}.svc.cluster.local:{PORT}/v1"
    [pod] = engine_pods(stack)
    cs = container_status(cluster, ns, pod.metadata.name)
    assert cs["ready"] and cs["started"] and cs["restartCount"] == 0
    # Ready came from the real probes: the kubelet ran them against /health.
    assert cs["image"] == stack.real.images["engine"].ref

    # Through the Service, with the backend's own key; without it, refused.
    with client(service, ENGINE_KEY) as c:
        check_chat(c)
        check_stream(c)
        assert MODEL in [m.id for m in c.models.list().data]
    with client(service, "sk-wrong") as c, pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)

    # Through the gateway's Service, with the tenant's key (it sends the backend's own).
    raw = wait_for("the gateway to route", lambda: routed(stack), 60)
    assert raw.headers["x-fabric-backend"] == f"{ns}/{MODEL}"
    assert raw.parse().object == "chat.completion"
    with client(stack.gateway, TENANT_KEY) as c:
        chunks = check_stream(c)
    with client(stack.gateway, "sk-nobody") as c, pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    print(f"gateway stream: {chunks} chunks")


def test_the_engine_runs_as_rendered_and_the_kubelet_enforces_it(stack: Stack) -> None:
    """The security context the operator renders is what the kernel applies, and the
    kubelet refuses what runAsNonRoot forbids."""
    real, cluster, ns = stack.real, stack.cluster, stack.namespace
    [pod] = wait_for("the engine pod", lambda: engine_pods(stack), 30)
    rendered = pod.spec.containers[0].security_context
    assert rendered.allow_privilege_escalation is False
    assert rendered.capabilities.drop == ["ALL"]
    assert pod.spec.security_context.run_as_non_root is True
    st = proc_status(real, ns, pod.metadata.name, "engine")
    assert st["Uid"].split()[:2] == ["65532", "65532"]
    assert st["CapEff"] == "0" * 16 and st["CapPrm"] == "0" * 16
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"  # filter mode: RuntimeDefault

    # The same engine image without a user of its own: its user is root, and the kubelet
    # will not start it under runAsNonRoot.
    as_root = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "as-root", "namespace": ns},
        "spec": {
            "securityContext": {"runAsNonRoot": True},
            "containers": [
                {
                    "name": "engine",
                    "image": real.images["engine"].ref,
                    "imagePullPolicy": "Never",
                    "args": ["--model-url", "https://x.invalid/m.gguf"],
                }
            ],
        },
    }
    assert cluster.apply(as_root).returncode == 0

    def refused() -> dict[str, str] | None:
        waiting = (container_status(cluster, ns, "as-root").get("state") or {}).get("waiting")
        return waiting if waiting and waiting["reason"] != "ContainerCreating" else None

    waiting = wait_for("the kubelet to refuse the container", refused, 60)
    assert waiting["reason"] == "CreateContainerConfigError", waiting
    assert "runAsNonRoot and image will run as root" in waiting["message"], waiting
    cluster.core.delete_namespaced_pod("as-root", ns, grace_period_seconds=0)


def test_readiness_follows_the_real_probe(stack: Stack) -> None:
    """A frozen engine fails its readiness probe: the pod leaves the Endpoints, and comes
    back when the engine answers again; nothing restarts (liveness allows longer)."""
    real, cluster, ns = stack.real, stack.cluster, stack.namespace
    [pod] = engine_pods(stack)
    name, ip = pod.metadata.name, pod.status.pod_ip
    node, cid = real.container(ns, name, "engine")
    frozen = time.monotonic()
    node.ctr("tasks", "pause", cid)  # the cgroup freezer: every process of the container
    try:
        wait_for("the pod unready", lambda: not pod_ready(cluster, ns, name), 60)
        unready = time.monotonic() - frozen
        wait_for(
            "the address not ready", lambda: endpoint_ips(cluster, ns, MODEL) == ([], [ip]), 10
        )
    finally:
        node.ctr("tasks", "resume", cid)
    wait_for("the pod ready again", lambda: pod_ready(cluster, ns, name), 30)
    back = time.monotonic() - frozen
    wait_for("the address ready", lambda: endpoint_ips(cluster, ns, MODEL) == ([ip], []), 10)
    assert container_status(cluster, ns, name)["restartCount"] == 0
    failures = [e.message for e in pod_events(cluster, ns, name) if e.reason == "Unhealthy"]
    assert any(m.startswith("Readiness probe failed") for m in failures), failures
    print(f"\nfrozen -> unready {unready:.1f}s; thawed -> ready again {back - unready:.1f}s")


def test_two_replicas_share_the_requests(stack: Stack) -> None:
    cluster, ns = stack.cluster, stack.namespace
    cluster.kubectl("scale", f"llmb/{MODEL}", "-n", ns, "--replicas=2")
    ready = wait_for(
        "two ready addresses",
        lambda: len(ips := endpoint_ips(cluster, ns, MODEL)[0]) == 2 and ips,
        180,
    )
    wait_for(
        "phase Ready, 2/2",
        lambda: (
            status(cluster, ns).get("ready") == "2/2" and status(cluster, ns)["phase"] == "Ready"
        ),
        60,
    )
    wait_for("the gateway to know both", lambda: routed(stack), 30)
    before = {ip: chats_served(ip) for ip in ready}
    with client(stack.gateway, TENANT_KEY) as c:
        for _ in range(12):
            c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    served = {ip: chats_served(ip) - before[ip] for ip in ready}
    print(f"\n12 requests through the gateway, served per engine pod: {served}")
    assert sum(served.values()) == 12
    assert all(n >= 3 for n in served.values()), served
    stack.figures["requests_per_pod"] = list(served.values())


def test_a_killed_engine_is_restarted(stack: Stack) -> None:
    real, cluster, ns = stack.real, stack.cluster, stack.namespace
    pod = engine_pods(stack)[0]
    name, ip = pod.metadata.name, pod.status.pod_ip
    with (
        sampled(lambda: status(cluster, ns).get("phase")) as phases,
        sampled(lambda: gateway_status(stack), 0.2) as through,
    ):
        killed = time.monotonic()
        real.kill_container(ns, name)
        cs = wait_for(
            "the restart in the pod status",
            lambda: (cs := container_status(cluster, ns, name)).get("restartCount") == 1 and cs,
            30,
        )
        seen = time.monotonic() - killed
        assert cs["lastState"]["terminated"]["exitCode"] == 137  # 128 + SIGKILL
        assert cs["lastState"]["terminated"]["reason"] == "Error"
        wait_for("the pod ready again", lambda: pod_ready(cluster, ns, name), 60)
        wait_for("the pod to answer again", lambda: answers(f"http://{ip}:{PORT}"), 30)
        restart = time.monotonic() - killed
        print(
            f"\nSIGKILL -> restartCount 1 in the pod status in {seen:.1f}s, answering again "
            f"in {restart:.1f}s"
        )
        stack.figures["kill_to_restart_count_s"] = round(seen, 1)
        stack.figures["kill_to_answer_s"] = round(restart, 1)

        # A second crash soon after: the kubelet backs off (10 s), the operator says why.
        killed = time.monotonic()
        real.kill_container(ns, name)
        st = wait_for(
            "the operator to report CrashLoopBackOff",
            lambda: (s := status(cluster, ns)).get("phase") == "CrashLoopBackOff" and s,
            30,
        )
        degraded = next(c for c in st["conditions"] if c["type"] == "Degraded")
        assert degraded["reason"] == "CrashLoopBackOff"
        assert "code 137" in degraded["message"], degraded
        cs = container_status(cluster, ns, name)
        assert cs["state"]["waiting"]["reason"] == "CrashLoopBackOff"
        assert "back-off 10s" in cs["state"]["waiting"]["message"]
        # Meanwhile the other replica answers, once the Endpoints dropped the crashed one.
        wait_for(
            "the crashed pod out of the ready addresses",
            lambda: ip not in endpoint_ips(cluster, ns, MODEL)[0],
            10,
        )
        with client(stack.gateway, TENANT_KEY) as c:
            check_chat(c)
        wait_for(
            "the second restart",
            lambda: container_status(cluster, ns, name).get("restartCount") == 2,
            60,
        )
        wait_for("the pod to answer again", lambda: answers(f"http://{ip}:{PORT}"), 60)
        again = time.monotonic() - killed
        wait_for("phase Ready again", lambda: status(cluster, ns).get("phase") == "Ready", 60)
    reasons = {e.reason for e in pod_events(cluster, ns, name)}
    assert {"Started", "BackOff"} <= reasons, reasons
    codes = {code: through.count(code) for code in sorted(set(through), key=str)}
    print(
        f"second SIGKILL -> CrashLoopBackOff reported ({degraded['message']!r}), answering "
        f"again after the back-off in {again:.1f}s\n"
        f"operator phases meanwhile: {transitions(phases)}\n"
        f"gateway answers meanwhile (one request every 0.2 s): {codes}"
    )
    stack.figures["second_kill_to_answer_s"] = round(again, 1)
    stack.figures["gateway_during_kills"] = codes
    assert "CrashLoopBackOff" in phases


# ---- agents: tool calls from a real engine pod -----------------------------------------

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "London"]},
        "unit": {"type": "string", "enum": ["c", "f"]},
    },
    "required": ["city", "unit"],
}
TOOLS: list[Any] = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}
]
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED: Any = {"type": "function", "function": {"name": "get_weather"}}


def tool_call_of(c: openai.OpenAI, model: str, choice: Any) -> dict[str, Any]:
    """The one tool call of an answer, its arguments valid against the tool's schema."""
    answer = c.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=64
    )
    assert answer.choices[0].finish_reason == "tool_calls"
    [call] = answer.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    arguments: dict[str, Any] = json.loads(call.function.arguments)  # type: ignore[union-attr]
    jsonschema.validate(arguments, WEATHER)
    return arguments


def streamed_tool_call(c: openai.OpenAI, model: str) -> dict[str, Any]:
    with c.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS, tool_choice=NAMED, max_tokens=64, stream=True
    ) as stream:
        chunks = [ch.choices[0] for ch in stream if ch.choices]
    deltas = [d for ch in chunks for d in ch.delta.tool_calls or []]
    assert chunks[-1].finish_reason == "tool_calls"
    assert {d.function.name for d in deltas if d.function and d.function.name} == {"get_weather"}
    arguments: dict[str, Any] = json.loads(
        "".join(d.function.arguments or "" for d in deltas if d.function)
    )
    jsonschema.validate(arguments, WEATHER)
    return arguments


@contextlib.contextmanager
def weights_on_a_pvc(stack: Stack, name: str) -> Iterator[str]:
    """The tiny GGUF on a hostPath PersistentVolume bound to a claim of that name: what a
    team's own weights on a PVC look like to the engine pod."""
    cluster, ns = stack.cluster, stack.namespace
    folder = Path(tempfile.mkdtemp(prefix="fabric-weights-"))
    try:
        folder.chmod(0o755)  # the engine runs as 65532
        write_tiny_gguf(folder / "tiny.gguf").chmod(0o644)
        with hostpath_claim(cluster, ns, name, folder):
            yield "tiny.gguf"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_agents_get_tool_calls_from_engine_pods(stack: Stack) -> None:
    """Tool calling on by default for llama-server (--jinja), and named for a
    llama-cpp-python backend on a PVC: both engine pods answer tool calls through their
    Service and through the gateway, streamed too; `kubectl get llmb -o wide` says how."""
    cluster, ns = stack.cluster, stack.namespace
    jinja = backend(stack.real, ns)
    jinja["metadata"]["name"] = "tools-jinja"
    with weights_on_a_pvc(stack, "weights") as path:
        py = {
            "apiVersion": "llm.fabric.dev/v1alpha1",
            "kind": "LLMBackend",
            "metadata": {"name": "tools-py", "namespace": ns},
            "spec": {
                "engine": "llamacpp-python",
                "image": stack.real.images["engine"].ref,  # llama-cpp-python is in it
                "imagePullPolicy": "Never",
                "model": {"pvc": {"claimName": "weights", "path": path}},
                "toolCalling": {"parser": "chatml-function-calling"},
                "apiKeySecretRef": {"name": "engine-key", "key": "api-key"},
            },
        }
        try:
            for manifest in (jinja, py):
                assert cluster.apply(manifest).returncode == 0
            for name, port, how in (
                ("tools-jinja", PORT, "jinja"),
                ("tools-py", 8000, "chatml-function-calling"),
            ):
                st = wait_for(
                    f"{name} Ready",
                    lambda n=name: (s := status(cluster, ns, n)).get("phase") == "Ready" and s,
                    240,
                )
                assert st["toolCalling"] == how
                [cond] = [c for c in st["conditions"] if c["type"] == "ToolCalling"]
                assert cond["status"] == "True", cond
                service = stack.service_url(ns, name, port)
                wait_for(f"{name} to answer", lambda u=service: answers(u, ENGINE_KEY) or None, 60)
                with client(service, ENGINE_KEY) as c:
                    direct = tool_call_of(c, name, NAMED)
                raw = wait_for(
                    f"the gateway to route {name}",
                    lambda n=name: routed(stack, n),
                    60,
                )
                assert raw.headers["x-fabric-backend"] == f"{ns}/{name}"
                with client(stack.gateway, TENANT_KEY) as c:
                    auto = tool_call_of(c, name, "auto")
                    streamed = streamed_tool_call(c, name)
                print(f"{name} ({how}): direct {direct}, gateway auto {auto}, streamed {streamed}")
            wide = cluster.kubectl("get", "llmb", "-n", ns, "-o", "wide").stdout
            header, *rows = wide.splitlines()
            assert "TOOLS" in header.split()
            by_name = {row.split()[0]: row.split() for row in rows}
            assert by_name["tools-jinja"][-1] == "jinja"
            assert by_name["tools-py"][-1] == "chatml-function-calling"
        finally:
            cluster.kubectl("delete", "llmb", "tools-jinja", "tools-py", "-n", ns, check=False)
            wait_for(
                "the tool backends' pods to go",
                lambda: not pods(cluster, ns, "llm.fabric.dev/backend in (tools-jinja,tools-py)"),
                90,
            )


def checked_start(status: dict[str, Any], pod: str) -> int:
    """status.lastStart of `pod`, its steps adding up to its total (each rounded)."""
    start = status["lastStart"]
    assert start["pod"] == pod, start
    steps = ("scheduledSeconds", "initSeconds", "startedSeconds", "readySeconds")
    assert abs(sum(start[k] for k in steps) - start["totalSeconds"]) <= len(steps), start
    return int(start["totalSeconds"])


def engine_log(cluster: Cluster, ns: str, pod: str) -> str:
    return cluster.kubectl("logs", "-n", ns, pod, "-c", "engine").stdout


def test_weights_on_a_cache_claim_survive_a_pod_restart_and_go_when_turned_off(
    stack: Stack,
) -> None:
    """spec.cache.persistentVolumeClaim: the operator creates the backend's claim (owned),
    the engine downloads into it (the stand-in copies its tiny GGUF into LLAMA_CACHE, as
    llama-server does), a new pod finds the file there without downloading again; turned
    off, the claim is deleted and the pods go back to an emptyDir. status.lastStart says
    where each start went."""
    cluster, ns = stack.cluster, stack.namespace
    name = "cached"
    folder = Path(tempfile.mkdtemp(prefix="fabric-cache-"))
    folder.chmod(0o777)  # hostPath takes no fsGroup: the engine (uid 65532) writes here
    pv = f"{ns}-{name}-cache"
    cluster.core.create_persistent_volume(
        {
            "metadata": {"name": pv},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": "fabric-e2e-cache",
                "persistentVolumeReclaimPolicy": "Retain",
                "hostPath": {"path": str(folder), "type": "Directory"},
                # Pre-bound to the claim the operator is to create.
                "claimRef": {"namespace": ns, "name": name},
            },
        }
    )
    manifest = backend(stack.real, ns)
    manifest["metadata"]["name"] = name
    manifest["spec"]["cache"] = {
        "size": "1Gi",
        "persistentVolumeClaim": {"storageClassName": "fabric-e2e-cache"},
    }
    downloaded = folder / "tiny.gguf"  # the URL's file name, in LLAMA_CACHE
    try:
        assert cluster.apply(manifest).returncode == 0
        first = wait_for(
            "the cached backend Ready",
            lambda: (s := status(cluster, ns, name)).get("phase") == "Ready" and s,
            240,
        )
        claim = cluster.core.read_namespaced_persistent_volume_claim(name, ns)
        assert claim.status.phase == "Bound" and claim.spec.volume_name == pv
        [owner] = claim.metadata.owner_references
        assert (owner.kind, owner.name, owner.controller) == ("LLMBackend", name, True)
        assert claim.metadata.labels["app.kubernetes.io/component"] == "model-cache"
        [pod] = pods(cluster, ns, f"llm.fabric.dev/backend={name}")
        assert "downloaded to cache: /cache/tiny.gguf" in engine_log(cluster, ns, pod.metadata.name)
        assert downloaded.is_file() and downloaded.stat().st_size > 0
        written = downloaded.stat().st_mtime_ns
        stack.figures["cache_first_start_s"] = checked_start(first, pod.metadata.name)

        cluster.core.delete_namespaced_pod(pod.metadata.name, ns)
        [again] = wait_for(
            "a new pod Ready",
            lambda: (
                [
                    p
                    for p in pods(cluster, ns, f"llm.fabric.dev/backend={name}")
                    if p.metadata.name != pod.metadata.name
                    and pod_ready(cluster, ns, p.metadata.name)
                ]
                or None
            ),
            180,
        )
        log = engine_log(cluster, ns, again.metadata.name)
        assert "found in cache: /cache/tiny.gguf" in log and "downloaded" not in log, log
        assert downloaded.stat().st_mtime_ns == written  # the same file, not fetched again
        second = wait_for(
            "lastStart of the new pod",
            lambda: (
                (s := status(cluster, ns, name).get("lastStart") or {}).get("pod")
                == again.metadata.name
                and "totalSeconds" in s
                and s
            ),
            60,
        )
        stack.figures["cache_restart_s"] = second["totalSeconds"]

        off = cluster.kubectl(
            "patch", "llmb", name, "-n", ns, "--type=merge", "-p", '{"spec":{"cache":null}}'
        )
        assert off.returncode == 0, off.stderr

        def claim_gone() -> bool:
            try:
                cluster.core.read_namespaced_persistent_volume_claim(name, ns)
            except Exception as err:  # 404 once the pods using it have gone
                return getattr(err, "status", None) == 404
            return False

        wait_for("the claim to be pruned", claim_gone, 180)
        [plain] = wait_for(
            "a pod without the claim Ready",
            lambda: (
                [
                    p
                    for p in pods(cluster, ns, f"llm.fabric.dev/backend={name}")
                    if pod_ready(cluster, ns, p.metadata.name)
                    and not any(v.persistent_volume_claim for v in p.spec.volumes)
                ]
                or None
            ),
            180,
        )
        [cache] = [v for v in plain.spec.volumes if v.name == "cache"]
        assert cache.empty_dir is not None
        assert downloaded.stat().st_mtime_ns == written  # Retain: the volume keeps the file
    finally:
        cluster.kubectl("delete", "llmb", name, "-n", ns, check=False)
        wait_for(
            "the cached backend's pods to go",
            lambda: not pods(cluster, ns, f"llm.fabric.dev/backend={name}"),
            90,
        )
        cluster.kubectl("delete", "pv", pv, "--wait=false", check=False)
        shutil.rmtree(folder, ignore_errors=True)


def test_deleting_the_backend_leaves_nothing_running(stack: Stack) -> None:
    real, cluster, ns = stack.real, stack.cluster, stack.namespace
    running = {
        p.metadata.name: real.container(ns, p.metadata.name, "engine") for p in engine_pods(stack)
    }
    ips = [p.status.pod_ip for p in engine_pods(stack)]
    assert len(running) == 2
    deleted = time.monotonic()
    cluster.kubectl("delete", f"llmb/{MODEL}", "-n", ns)
    wait_for(
        "no pod left",
        lambda: (
            not engine_pods(stack)
            and not cluster.core.list_namespaced_pod(
                ns, label_selector=f"llm.fabric.dev/backend={MODEL}"
            ).items
        ),
        90,
    )
    gone = time.monotonic() - deleted
    for node, cid in running.values():
        tasks = node.ctr("tasks", "list", "--quiet").stdout.split()
        assert cid not in tasks, f"container {cid} still running on {node.name}"
    for ip in ips:
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://{ip}:{PORT}/health", timeout=2)
    assert cluster.deployment(ns, MODEL) is None and cluster.service(ns, MODEL) is None
    print(f"\ndelete -> both engine containers gone in {gone:.1f}s")
    stack.figures["delete_to_gone_s"] = round(gone, 1)


def spec_replicas(cluster: Cluster, ns: str, name: str) -> int:
    obj = cluster.custom.get_namespaced_custom_object(
        "llm.fabric.dev", "v1alpha1", ns, "llmbackends", name
    )
    return int(obj["spec"].get("replicas", 1))


def backend_events(cluster: Cluster, ns: str, name: str) -> list[tuple[str, str]]:
    items = cluster.core.list_namespaced_event(
        ns, field_selector=f"involvedObject.kind=LLMBackend,involvedObject.name={name}"
    ).items
    return [(e.reason, e.message) for e in items]


def test_scale_from_zero_through_the_gateway_and_back_to_zero(stack: Stack) -> None:
    """The chart's operator finds the chart's gateway pods (its RBAC, in-cluster), a
    request at zero is held by the gateway pod, the operator scales 0 -> 1 on it, the
    engine pod starts on the real node and the same request is answered; idle -> zero."""
    cluster, ns, name = stack.cluster, stack.namespace, "lazy"
    manifest = backend(stack.real, ns, replicas=0)
    manifest["metadata"]["name"] = name
    manifest["spec"]["autoscaling"] = {
        "minReplicas": 0,
        "maxReplicas": 1,
        "scaleDownDelaySeconds": 5,
        "holdTimeoutSeconds": 180,
    }
    cluster.apply(manifest)
    try:
        wait_for(
            "the autoscaler to hear the gateway replicas",
            lambda: (status(cluster, ns, name).get("autoscaling") or {}).get("gateways", 0) >= 1,
            90,
        )
        assert not pods(cluster, ns, f"llm.fabric.dev/backend={name}")
        with sampled(lambda: (time.monotonic(), spec_replicas(cluster, ns, name))) as seen:
            sent = time.monotonic()
            raw = (
                client(stack.gateway, TENANT_KEY)
                .with_options(timeout=240)
                .chat.completions.with_raw_response.create(
                    model=name, messages=MESSAGES, max_tokens=8
                )
            )
            answered = time.monotonic() - sent
        assert raw.headers["x-fabric-backend"] == f"{ns}/{name}"
        assert raw.parse().choices[0].message.content
        scaled = next(t for t, r in seen if isinstance(r, int) and r == 1) - sent
        reasons = [r for r, _ in backend_events(cluster, ns, name)]
        assert "ScaledUp" in reasons, reasons
        print(
            f"\nat zero: request -> spec.replicas 1 in {scaled:.2f}s (sampled every 0.1 s), "
            f"-> answered through the gateway in {answered:.1f}s (pod start included)"
        )
        stack.figures["zero_request_to_scale_s"] = round(scaled, 2)
        stack.figures["zero_request_to_answer_s"] = round(answered, 1)
        assert scaled < 2.0

        idle = time.monotonic()
        wait_for("idle -> zero", lambda: spec_replicas(cluster, ns, name) == 0, 150, interval=0.5)
        to_zero = time.monotonic() - idle
        wait_for(
            "the engine pod to go",
            lambda: not pods(cluster, ns, f"llm.fabric.dev/backend={name}"),
            90,
        )
        auto = status(cluster, ns, name).get("autoscaling") or {}
        assert "ScaledToZero" in [r for r, _ in backend_events(cluster, ns, name)]
        wait_for(
            "status to say ScaledToZero",
            lambda: (
                (status(cluster, ns, name).get("autoscaling") or {}).get("reason") == "ScaledToZero"
            ),
            10,
        )
        print(f"idle -> scaled to zero in {to_zero:.0f}s (delay 5 s; {auto.get('message')})")
        stack.figures["idle_to_zero_s"] = round(to_zero)
    finally:
        cluster.kubectl("delete", f"llmb/{name}", "-n", ns, check=False)


def test_upgrade_then_uninstall_keeps_the_users_backends(stack: Stack) -> None:
    real, cluster, ns = stack.real, stack.cluster, stack.namespace
    [before] = pods(cluster, SYSTEM, OPERATOR_PODS)
    helm(
        real,
        *("upgrade", RELEASE, CHART, "-n", SYSTEM, "--reuse-values"),
        *("--set", "operator.workers=2", "--wait", "--timeout=240s"),
    )
    [after] = wait_for(
        "the upgraded operator pod",
        lambda: (
            (p := pods(cluster, SYSTEM, OPERATOR_PODS))
            and p[0].metadata.name != before.metadata.name
            and p
        ),
        120,
    )
    assert "--workers=2" in after.spec.containers[0].args
    wait_for(
        "the upgraded operator ready", lambda: pod_ready(cluster, SYSTEM, after.metadata.name), 120
    )
    # It reconciles: a backend applied now gets its children and a status.
    assert cluster.apply(backend(real, ns)).returncode == 0
    wait_for("the new operator to reconcile", lambda: status(cluster, ns).get("phase"), 60)

    helm(real, "uninstall", RELEASE, "-n", SYSTEM, "--wait", "--timeout=120s")
    wait_for(
        "the operator and gateway pods gone",
        lambda: not cluster.core.list_namespaced_pod(SYSTEM).items,
        120,
    )
    cluster_wide = cluster.kubectl("get", "clusterrole,clusterrolebinding", "-o", "name").stdout
    assert OPERATOR not in cluster_wide
    # The CRD stays, and with it the users' LLMBackends and their running children.
    assert cluster.kubectl("get", "crd", CRD, check=False).returncode == 0
    assert cluster.backend(ns, MODEL)["metadata"]["name"] == MODEL
    assert cluster.deployment(ns, MODEL) is not None
    # No finalizer: with the operator gone, a user can still delete a backend.
    cluster.kubectl("delete", f"llmb/{MODEL}", "-n", ns, "--timeout=30s")
    cluster.kubectl("delete", "crd", CRD, "--timeout=60s")
