"""End to end, a CPU llama.cpp LLMBackend installed with Helm answers for real.

There is no kubelet here: `tests.support.procsim` runs the backend's pods as real
llama-cpp-python engine processes (on the suite's generated tiny GGUF), each on an address
of its own that the real Endpoints controller publishes, and executes their rendered
probes for real. So what a user judges the operator by is checked: the official `openai`
client gets completions from the backend's endpoint and through the gateway, replicas
share the load, a killed engine comes back, and deleting the backend leaves nothing
running. The figures (apply -> first answer, RSS, restart) are printed (`pytest -s`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from fabric_operator.api.backend import LLMBackend
from fabric_operator.gateway.routes import KEY_LABEL
from fabric_operator.render import workload
from tests.conftest import REPO
from tests.support.engine import tiny_gguf_fixture  # noqa: F401 (a fixture, found by name)
from tests.support.fixtures import OperatorProcess, temporary_namespace
from tests.support.gateway import gateway
from tests.support.kube import Cluster, run_pods, wait_for
from tests.support.procsim import (
    BACKOFF_MAX,
    Backoff,
    ProcessNodeSimulator,
    UntranslatableError,
    listening,
    process_node_simulator,
    resolve_env,
    rss_kb,
    translate,
)
from tests.support.upstream import Process

# Generous: the first use may build the engine (~3 min on 2 busy cores), and the probes
# run at their rendered periods (startup every 2 s, readiness every 5 s).
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

CHART = REPO / "charts" / "fabric-operator"
RELEASE, SYSTEM = "answers", "fabric-answers"
CRD = "llmbackends.llm.fabric.dev"
ENGINE_KEY = "sk-engine-answers-5f1c"  # the backend's own key (apiKeySecretRef)
TENANT_KEY = "sk-tenant-answers-93ab"  # a gateway tenant's key
MODEL = "tiny"
PORT = 8080
MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello."},
]


@dataclass
class Stack:
    cluster: Cluster
    namespace: str
    operator: OperatorProcess
    sim: ProcessNodeSimulator
    gateway: Process
    figures: dict[str, Any] = field(default_factory=dict)


def helm_run(*cmd: str | Path) -> None:
    proc = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"{cmd}: {proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def stack(
    e2e_cluster: Cluster,
    helm: Path,
    tiny_gguf: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    """The chart installed with Helm, the operator (as a process: no kubelet runs the
    chart's pod), the process-backed node simulator, the gateway, and the two keys."""
    cluster = e2e_cluster
    kube = f"--kubeconfig={cluster.kubeconfig}"
    workdir = tmp_path_factory.mktemp("answers")
    # Another release may have left the CRD (kept on uninstall): then install without it.
    had_crd = cluster.kubectl("get", "crd", CRD, check=False).returncode == 0
    helm_run(
        *(helm, "install", RELEASE, CHART, kube, "-n", SYSTEM, "--create-namespace"),
        *("--wait=false", *(["--set", "crds.install=false"] if had_crd else [])),
    )
    try:
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{CRD}")
        wait_for(
            "the chart's operator pod scheduled",
            lambda: run_pods(cluster, SYSTEM, "app.kubernetes.io/name=fabric-operator"),
            60,
        )
        with contextlib.ExitStack() as stack, temporary_namespace(cluster) as ns:
            operator = OperatorProcess(cluster.kubeconfig, workdir, f"--namespace={ns}")
            operator.start()
            stack.callback(operator.stop)
            sim = stack.enter_context(
                process_node_simulator(cluster, workdir / "procsim", tiny_gguf, namespaces=[ns])
            )
            gw = stack.enter_context(
                gateway(kube, f"--namespace={ns}", workdir=workdir, ready_path="/readyz")
            )
            cluster.core.create_namespaced_secret(
                ns, {"metadata": {"name": "engine-key"}, "stringData": {"api-key": ENGINE_KEY}}
            )
            cluster.core.create_namespaced_secret(
                ns,
                {
                    "metadata": {"name": "team-key", "labels": {KEY_LABEL: "true"}},
                    "stringData": {"key": TENANT_KEY, "models": "*", "tenant": "team"},
                },
            )
            result = Stack(cluster, ns, operator, sim, gw)
            yield result
            # Backends left by a failed test: their processes stop with their pods.
            cluster.kubectl("delete", "llmb", "--all", "-n", ns, "--wait=false", check=False)
            with contextlib.suppress(AssertionError):
                wait_for("the engine processes to stop", lambda: not sim.pods(ns), 60)
            print(f"\nfigures: {json.dumps(result.figures, indent=1)}")
            assert not sim.errors, sim.errors
    finally:
        helm_run(helm, "uninstall", RELEASE, kube, "-n", SYSTEM)
        if not had_crd:  # kept by the chart on uninstall; the next release brings its own
            cluster.kubectl("delete", "crd", CRD, "--timeout=60s", check=False)
        cluster.kubectl("delete", "namespace", SYSTEM, "--wait=false", check=False)


# ---- helpers ---------------------------------------------------------------------------


def backend(ns: str, name: str = MODEL, replicas: int = 1, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "llm.fabric.dev/v1alpha1",
        "kind": "LLMBackend",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "engine": "llamacpp",
            "model": {"url": "https://models.invalid/tiny.gguf"},  # procsim: the tiny GGUF
            "replicas": replicas,
            "engineOptions": {"contextLength": 1024},
            "apiKeySecretRef": {"name": "engine-key", "key": "api-key"},
            **spec,
        },
    }


def endpoint_ips(cluster: Cluster, ns: str, name: str) -> tuple[list[str], list[str]]:
    """(ready, not ready) pod addresses the Endpoints controller published."""
    try:
        ep = cluster.core.read_namespaced_endpoints(name, ns)
    except Exception:  # not created yet
        return [], []
    ready: list[str] = []
    not_ready: list[str] = []
    for subset in ep.subsets or []:
        assert [p.port for p in subset.ports or []] == [PORT]
        ready += [a.ip for a in subset.addresses or []]
        not_ready += [a.ip for a in subset.not_ready_addresses or []]
    return sorted(ready), sorted(not_ready)


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


def status(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    return dict(cluster.backend(ns, name).get("status") or {})


def pod_events(cluster: Cluster, ns: str, pod: str) -> list[Any]:
    return list(
        cluster.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={pod}").items
    )


def engine(ip: str, key: str = ENGINE_KEY) -> openai.OpenAI:
    """The official client, straight at a pod address (ClusterIPs do not route here)."""
    return openai.OpenAI(base_url=f"http://{ip}:{PORT}/v1", api_key=key, max_retries=0, timeout=60)


def through_gateway(gw: Process, key: str = TENANT_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, timeout=60)


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


def answers(ip: str) -> bool:
    try:
        check_chat(engine(ip))
        return True
    except (openai.APIConnectionError, openai.APITimeoutError):
        return False


def chats_served(ip: str) -> int:
    """Chat completions this engine process answered (the procsim shim's /metrics)."""
    request = urllib.request.Request(
        f"http://{ip}:{PORT}/metrics", headers={"Authorization": f"Bearer {ENGINE_KEY}"}
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        text = r.read().decode()
    prefix = 'procsim_http_requests_total{path="/v1/chat/completions",code="200"} '
    return sum(int(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def refused(ip: str, port: int = PORT) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


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


def gateway_status(gw: Process) -> int:
    return httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2},
        headers={"authorization": f"Bearer {TENANT_KEY}"},
        timeout=60,
    ).status_code


def live_pods(stack: Stack, name: str = MODEL) -> list[Any]:
    """The backend's process-backed pods with a running engine, by pod name."""
    return sorted(
        (w for w in stack.sim.pods(stack.namespace, name) if w.process is not None),
        key=lambda w: w.name,
    )


# ---- tests -------------------------------------------------------------------------------


def test_rendered_containers_translate(tmp_path: Path) -> None:
    """What the operator renders for each model source runs, with the mapped flags."""
    tiny = tmp_path / "tiny.gguf"
    settings = frozenset({"model", "host", "port", "api_key", "n_ctx"})
    sources: list[tuple[dict[str, Any], Path]] = [
        ({"url": "https://h.invalid/m.gguf"}, tiny),
        ({"huggingface": {"repo": "org/m-GGUF", "file": "m.Q4_K_M.gguf"}}, tiny),
        (
            {"pvc": {"claimName": "weights", "path": "llama/m.gguf"}},
            tmp_path / "pvc" / "ns" / "weights" / "llama" / "m.gguf",
        ),
    ]
    for source, expected in sources:
        b = LLMBackend.from_manifest(backend("ns", "chat", model=source))
        pod = workload.deployment(b)["spec"]["template"]["spec"]
        [container] = pod["containers"]
        env = resolve_env(container, lambda name, key: ENGINE_KEY)
        launch = translate(
            container,
            env,
            pod_ip="198.18.0.99",
            model=tiny,
            namespace="ns",
            volumes=pod["volumes"],
            pvc_root=tmp_path / "pvc",
            settings=settings,
        )
        assert launch.args[:2] == ["-m", "llama_cpp.server"]
        flags = dict(zip(launch.args[2::2], launch.args[3::2], strict=True))
        assert flags == {
            "--model": str(expected),
            "--host": "198.18.0.99",
            "--port": "8080",
            "--model_alias": "chat",
            "--n_ctx": "1024",
            "--verbose": "false",
            "--interrupt_requests": "false",
        }, source
        assert launch.model_on_volume == ("pvc" in source)
        # The key reaches the engine through its environment, never its command line.
        assert launch.env["API_KEY"] == ENGINE_KEY
        assert ENGINE_KEY not in " ".join(launch.args)
        assert launch.env["FABRIC_PROCSIM_METRICS"] == "1"  # --metrics
        assert launch.env["LLAMA_CACHE"] == "/cache"  # passed through, harmless

    container = {"args": ["--host", "0.0.0.0", "--model-url", "u"]}
    ok = translate(
        {"args": [*container["args"], "--parallel=1", "-c", "64"]}, {}, pod_ip="ip", model=tiny
    )
    assert ok.args[ok.args.index("--n_ctx") + 1] == "64"
    refusals = [
        (
            {"args": [*container["args"], "--reasoning-format", "deepseek"]},
            {},
            "--reasoning-format",
        ),
        ({"args": [*container["args"], "--parallel", "4"]}, {}, "parallel slots"),
        ({"args": ["--host", "127.0.0.1", "--model-url", "u"]}, {}, "wildcard"),
        ({"args": ["--host", "0.0.0.0"]}, {}, "no model"),
        ({"args": ["--host", "0.0.0.0", "-m", "/app/m.gguf"]}, {}, "not on a volume"),
        ({"args": [*container["args"], "-c", "big"]}, {}, "not a valid int"),
        (container, {"LLAMA_ARG_FLASH_ATTN": "on"}, "LLAMA_ARG_FLASH_ATTN"),
        (container, {"PORT": "9000"}, "would configure the stand-in"),
        ({**container, "command": ["/bin/sh"]}, {}, "only llama-server"),
    ]
    for spec, env, why in refusals:
        with pytest.raises(UntranslatableError, match=why):
            translate(spec, env, pod_ip="ip", model=tiny, settings=settings)


def test_restart_back_off_is_the_kubelets() -> None:
    """At once after the first exit, then 10 s doubling to 300 s; reset after 10 min."""
    backoff, t, waits = Backoff(), 0.0, []
    for _ in range(8):
        waits.append(backoff.waiting(t, t))
        backoff.next(t, t + waits[-1])
        t += waits[-1] + 1  # runs 1 s, exits again
    assert waits == [0, 10, 20, 40, 80, 160, 300, 300]
    assert backoff.waiting(t + 2 * BACKOFF_MAX + 1000, t + 2 * BACKOFF_MAX + 1000) == 0


def test_an_untranslatable_argument_fails_the_pod_visibly(stack: Stack) -> None:
    cluster, ns = stack.cluster, stack.namespace
    applied = cluster.apply(backend(ns, "odd", extraArgs=["--reasoning-format", "deepseek"]))
    assert applied.returncode == 0, applied.stderr
    [worker] = wait_for("the pod on the node", lambda: stack.sim.pods(ns, "odd"), 60)

    failed = wait_for(
        "a Failed event on the pod",
        lambda: [e for e in pod_events(cluster, ns, worker.name) if e.reason == "Failed"],
        30,
    )
    assert "--reasoning-format" in failed[0].message and failed[0].type == "Warning"
    cs = wait_for(
        "CrashLoopBackOff after a StartError",
        lambda: (
            (cs := container_status(cluster, ns, worker.name))
            .get("state", {})
            .get("waiting", {})
            .get("reason")
            == "CrashLoopBackOff"
            and cs
        ),
        30,
    )
    last = cs["lastState"]["terminated"]
    assert last["reason"] == "StartError" and last["exitCode"] == 128
    assert "--reasoning-format" in last["message"]
    assert cs["ready"] is False and cs["restartCount"] >= 1
    st = wait_for(
        "the operator to report it",
        lambda: (s := status(cluster, ns, "odd")).get("phase") == "CrashLoopBackOff" and s,
        30,
    )
    degraded = next(c for c in st["conditions"] if c["type"] == "Degraded")
    print(f"\nuntranslatable: event {failed[0].message!r}; operator: {degraded['message']!r}")
    assert stack.sim.every_pid(ns, "odd") == []  # nothing ever ran

    cluster.kubectl("delete", "llmb/odd", "-n", ns)
    wait_for("its pod gone", lambda: not stack.sim.pods(ns, "odd"), 60)


def test_other_engines_stay_simulated(stack: Stack) -> None:
    """An Ollama backend's pod is only marked running, as before: no process, no address."""
    cluster, ns = stack.cluster, stack.namespace
    applied = cluster.apply(
        {
            "apiVersion": "llm.fabric.dev/v1alpha1",
            "kind": "LLMBackend",
            "metadata": {"name": "other", "namespace": ns},
            "spec": {"engine": "ollama", "model": {"ollama": "llama3.2:1b"}},
        }
    )
    assert applied.returncode == 0, applied.stderr
    wait_for("phase Ready", lambda: status(cluster, ns, "other").get("phase") == "Ready", 60)
    [pod] = cluster.core.list_namespaced_pod(
        ns, label_selector="llm.fabric.dev/backend=other"
    ).items
    assert pod.status.pod_ip is None
    assert stack.sim.pods(ns, "other") == [] and stack.sim.every_pid(ns, "other") == []
    cluster.kubectl("delete", "llmb/other", "-n", ns)
    wait_for(
        "its pod gone",
        lambda: (
            not cluster.core.list_namespaced_pod(
                ns, label_selector="llm.fabric.dev/backend=other"
            ).items
        ),
        60,
    )


def test_backend_answers_directly_and_through_the_gateway(stack: Stack) -> None:
    cluster, ns, sim = stack.cluster, stack.namespace, stack.sim
    marks: dict[str, float] = {}
    applied = time.monotonic()
    assert cluster.apply(backend(ns)).returncode == 0

    def first_answer() -> str | None:
        for w in sim.pods(ns, MODEL):
            if w.process is not None and "process" not in marks:
                marks["process"] = w.started_mono - applied
            if w.ip and "listening" not in marks and not refused(w.ip):
                marks["listening"] = time.monotonic() - applied
        ready, _ = endpoint_ips(cluster, ns, MODEL)
        if ready and "endpoints" not in marks:
            marks["endpoints"] = time.monotonic() - applied
        for ip in ready:
            if answers(ip):
                marks["answer"] = time.monotonic() - applied
                return ip
        return None

    ip = wait_for("the first answer at the Endpoints' address", first_answer, 180, 0.05)
    [worker] = sim.pods(ns, MODEL)
    assert worker.ip == ip
    print(
        "\napply -> engine process started {process:.2f}s, listening {listening:.2f}s, "
        "in the Endpoints {endpoints:.2f}s, first answer {answer:.2f}s".format(**marks)
    )
    stack.figures["apply_to_first_answer_s"] = round(marks["answer"], 2)
    stack.figures["apply_to"] = {k: round(v, 2) for k, v in marks.items()}

    # Ready came from the real probes: startup, then readiness, both against /health.
    kinds = [(kind, ok) for _, kind, ok, _ in worker.probe_history]
    assert ("startup", True) in kinds and ("readiness", True) in kinds
    assert kinds.index(("startup", True)) < kinds.index(("readiness", True))
    assert pod_ready(cluster, ns, worker.name)
    cs = container_status(cluster, ns, worker.name)
    assert cs["ready"] and cs["started"] and cs["restartCount"] == 0
    st = wait_for(
        "phase Ready",
        lambda: (s := status(cluster, ns, MODEL)).get("phase") == "Ready" and s,
        60,
    )
    assert st["endpoint"] == f"http://{MODEL}.{ns}.svc.cluster.local:{PORT}/v1"

    # Straight at the pod, with the backend's own key.
    with engine(ip) as c:
        check_chat(c)
        check_stream(c)
        assert MODEL in [m.id for m in c.models.list().data]
    with engine(ip, "sk-wrong") as c, pytest.raises(openai.AuthenticationError):
        c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    assert httpx.get(f"http://{ip}:{PORT}/v1/models").status_code == 401

    # Through the gateway, with the tenant's key (the gateway sends the backend's own).
    with through_gateway(stack.gateway) as c:
        raw = wait_for(
            "the gateway to route",
            lambda: _gateway_chat(c),
            30,
        )
        assert raw.headers["x-fabric-backend"] == f"{ns}/{MODEL}"
        answer = raw.parse()
        assert answer.object == "chat.completion" and answer.model == MODEL
        chunks = check_stream(c)
    with (
        through_gateway(stack.gateway, "sk-nobody") as c,
        pytest.raises(openai.AuthenticationError),
    ):
        c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
    bare = httpx.post(
        f"{stack.gateway.url}/v1/chat/completions",
        json={"model": MODEL, "messages": MESSAGES},
    )
    assert bare.status_code == 401 and bare.json()["error"]["code"]

    assert worker.process is not None
    rss = rss_kb(worker.process.pid)
    print(
        f"engine pid {worker.process.pid} RSS {rss / 1024:.1f} MiB; gateway stream {chunks} chunks"
    )
    stack.figures["rss_one_replica_mib"] = round(rss / 1024, 1)
    assert not sim.errors


def _gateway_chat(c: openai.OpenAI) -> Any:
    try:
        return c.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=8
        )
    except openai.APIStatusError as err:
        if err.status_code in {404, 502, 503}:  # not routed yet
            return None
        raise


def test_readiness_follows_the_real_probe(stack: Stack) -> None:
    """A frozen engine fails its readiness probe: the pod leaves the Endpoints, and comes
    back when the engine answers again; nothing restarts (liveness allows longer)."""
    cluster, ns = stack.cluster, stack.namespace
    [worker] = wait_for("the running engine", lambda: live_pods(stack), 30)
    assert worker.process is not None
    pid, ip = worker.process.pid, worker.ip
    stopped = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for("the pod unready", lambda: not pod_ready(cluster, ns, worker.name), 60)
        unready = time.monotonic() - stopped
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for("the address not ready", lambda: endpoint_ips(cluster, ns, MODEL) == ([], [ip]), 10)
    wait_for("the pod ready again", lambda: pod_ready(cluster, ns, worker.name), 30)
    back = time.monotonic() - stopped
    wait_for("the address ready", lambda: endpoint_ips(cluster, ns, MODEL) == ([ip], []), 10)
    assert worker.process is not None and worker.process.pid == pid
    assert container_status(cluster, ns, worker.name)["restartCount"] == 0
    failures = [e.message for e in pod_events(cluster, ns, worker.name) if e.reason == "Unhealthy"]
    assert any(m.startswith("Readiness probe failed") for m in failures), failures
    print(f"\nSIGSTOP -> unready {unready:.1f}s; SIGCONT -> ready again {back - unready:.1f}s")


def test_two_replicas_share_the_requests(stack: Stack) -> None:
    cluster, ns = stack.cluster, stack.namespace
    cluster.kubectl("scale", f"llmb/{MODEL}", "-n", ns, "--replicas=2")
    workers = wait_for(
        "two engine processes", lambda: len(live_pods(stack)) == 2 and live_pods(stack), 120
    )
    ips = sorted(w.ip for w in workers)
    assert len(set(ips)) == 2
    wait_for("both in the Endpoints", lambda: endpoint_ips(cluster, ns, MODEL)[0] == ips, 120)
    wait_for(
        "phase Ready, 2/2",
        lambda: (
            status(cluster, ns, MODEL).get("ready") == "2/2"
            and status(cluster, ns, MODEL).get("phase") == "Ready"
        ),
        60,
    )
    pids = [w.process.pid for w in workers if w.process is not None]
    assert len(set(pids)) == 2

    before = {ip: chats_served(ip) for ip in ips}
    with through_gateway(stack.gateway) as c:
        for _ in range(10):
            c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    served = {ip: chats_served(ip) - before[ip] for ip in ips}
    print(f"\n10 requests through the gateway, served per engine process: {served}")
    assert sum(served.values()) == 10
    assert all(n >= 3 for n in served.values()), served  # round-robin: about 5 each
    rss = {pid: round(rss_kb(pid) / 1024, 1) for pid in pids}
    print(f"RSS per engine process (MiB): {rss}")
    stack.figures["rss_two_replicas_mib"] = list(rss.values())
    stack.figures["requests_per_process"] = list(served.values())
    assert not stack.sim.errors


def test_a_killed_engine_is_restarted(stack: Stack) -> None:
    cluster, ns, gw = stack.cluster, stack.namespace, stack.gateway
    workers = wait_for("two engines", lambda: len(live_pods(stack)) == 2 and live_pods(stack), 30)
    worker = workers[0]
    assert worker.process is not None and worker.ip is not None
    ip, first = worker.ip, worker.process.pid

    with (
        sampled(lambda: status(cluster, ns, MODEL).get("phase")) as phases,
        sampled(lambda: gateway_status(gw), 0.2) as through,
    ):
        killed = time.monotonic()
        os.kill(first, signal.SIGKILL)
        cs = wait_for(
            "the restart in the pod status",
            lambda: (
                (cs := container_status(cluster, ns, worker.name)).get("restartCount") == 1 and cs
            ),
            30,
        )
        seen = time.monotonic() - killed
        assert cs["lastState"]["terminated"]["exitCode"] == 137  # 128 + SIGKILL
        assert cs["lastState"]["terminated"]["reason"] == "Error"
        wait_for("the pod ready again", lambda: pod_ready(cluster, ns, worker.name), 60)
        wait_for("the endpoint to answer again", lambda: answers(ip), 30)
        restart = time.monotonic() - killed
        assert worker.process is not None
        second = worker.process.pid
        assert second != first and not stack.sim.alive(first)
        print(
            f"\nSIGKILL -> restartCount 1 in the pod status in {seen:.1f}s, answering again "
            f"in {restart:.1f}s"
        )
        stack.figures["kill_to_restart_count_s"] = round(seen, 1)
        stack.figures["kill_to_answer_s"] = round(restart, 1)

        # A second crash soon after: the kubelet backs off (10 s), the operator says why.
        killed = time.monotonic()
        os.kill(second, signal.SIGKILL)
        st = wait_for(
            "the operator to report CrashLoopBackOff",
            lambda: (s := status(cluster, ns, MODEL)).get("phase") == "CrashLoopBackOff" and s,
            30,
        )
        degraded = next(c for c in st["conditions"] if c["type"] == "Degraded")
        assert degraded["reason"] == "CrashLoopBackOff"
        assert "code 137" in degraded["message"] and "(1 restarts)" in degraded["message"]
        cs = container_status(cluster, ns, worker.name)
        assert cs["state"]["waiting"]["reason"] == "CrashLoopBackOff"
        assert "back-off 10s" in cs["state"]["waiting"]["message"]
        # Meanwhile the other replica answers, once the Endpoints dropped the crashed one.
        wait_for(
            "the crashed pod out of the ready addresses",
            lambda: ip not in endpoint_ips(cluster, ns, MODEL)[0],
            10,
        )
        with through_gateway(gw) as c:
            check_chat(c)
        wait_for(
            "the second restart",
            lambda: container_status(cluster, ns, worker.name).get("restartCount") == 2,
            60,
        )
        wait_for("the endpoint to answer again", lambda: answers(ip), 60)
        again = time.monotonic() - killed
        wait_for(
            "phase Ready again", lambda: status(cluster, ns, MODEL).get("phase") == "Ready", 60
        )
    reasons = {e.reason for e in pod_events(cluster, ns, worker.name)}
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
    assert status(cluster, ns, MODEL)["phase"] == "Ready"
    assert not stack.sim.errors


def test_deleting_the_backend_leaves_nothing_running(stack: Stack) -> None:
    cluster, ns, sim = stack.cluster, stack.namespace, stack.sim
    workers = sim.pods(ns, MODEL)
    ips = {w.ip for w in workers if w.ip}
    pids = sim.every_pid(ns, MODEL)
    assert len(ips) == 2 and len(pids) >= 4  # two replicas, one restarted twice
    deleted = time.monotonic()
    cluster.kubectl("delete", f"llmb/{MODEL}", "-n", ns)
    wait_for(
        "no pod left",
        lambda: (
            not cluster.core.list_namespaced_pod(
                ns, label_selector=f"llm.fabric.dev/backend={MODEL}"
            ).items
        ),
        90,
    )
    gone = time.monotonic() - deleted
    assert not sim.pods(ns, MODEL)
    assert not [pid for pid in pids if sim.alive(pid)]
    assert not [pid for pid in pids if _is_engine(pid)]
    # Stopped by SIGTERM within the grace period (uvicorn shuts down, then ends by the
    # signal: 128 + 15), not SIGKILLed after it.
    assert [w.exit_codes[-1] for w in workers] == [143, 143]
    assert all("Finished server process" in w.logs[-1].read_text() for w in workers)
    assert listening(ips) == []
    assert all(refused(ip) for ip in ips)
    assert cluster.deployment(ns, MODEL) is None and cluster.service(ns, MODEL) is None
    print(f"\ndelete -> {len(pids)} engine processes gone, nothing listening, in {gone:.1f}s")
    stack.figures["delete_to_gone_s"] = round(gone, 1)
    assert not sim.errors


def _is_engine(pid: int) -> bool:
    try:
        return b"llama_cpp.server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
