"""End to end on a real node: an LLMBackend with engine `transformers` (`transformers
serve` from the locally built image, hack/images/transformers), its weights, the suite's
tiny Qwen2 model, on a hostPath PersistentVolume, rendered by the chart's operator, run by
the kubelet as user 65532 (Pod Security restricted), answering the official `openai`
client through its Service and through the chart's gateway: chats, streams, tool calls.

One node (the image is 1.35 GB: imported once), its own cluster (the module's). Figures
are printed (`pytest -s`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest

from fabric_operator.gateway.routes import KEY_LABEL
from tests.conftest import REPO
from tests.support.fixtures import temporary_namespace
from tests.support.kube import Cluster, hostpath_claim, wait_for
from tests.support.realcluster import RealCluster, real_cluster
from tests.support.tiny_hf_model import TOOL_ARGUMENTS, TOOL_NAME, write_tiny_hf_model

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

CHART = REPO / "charts" / "fabric-operator"
RELEASE, SYSTEM = "fab", "fabric-system"
GATEWAY = f"{RELEASE}-fabric-operator-gateway"
TENANT_KEY = "sk-tenant-tf-e2e-61d2"
NAME, PORT = "tiny-tf", 8000  # the backend, its served name, the engine's port
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": TOOL_NAME,
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            },
        },
    }
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


def helm(real: RealCluster, *args: str | Path, timeout: float = 300) -> str:
    binary = subprocess.run(
        ["bash", str(REPO / "hack" / "get-helm.sh")], check=True, capture_output=True, text=True
    ).stdout.strip()
    proc = subprocess.run(
        [binary.splitlines()[-1], f"--kubeconfig={real.cluster.kubeconfig}", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"helm {args}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    """A cluster of this module's own: one real node with the pause, operator and
    transformers images (built or taken from the cache by hack/get-images.sh)."""
    started = time.monotonic()
    roles = ("pause", "operator", "transformers")
    with real_cluster(tmp_path_factory.mktemp("tf-cluster"), 1, roles) as cluster:
        print(f"\ncluster with the transformers image up in {time.monotonic() - started:.0f}s")
        yield cluster


@pytest.fixture(scope="module")
def stack(real: RealCluster) -> Iterator[Stack]:
    """The chart (operator and gateway), a team namespace and a tenant key."""
    repository, tag = real.images["operator"].ref.rsplit(":", 1)
    helm(
        real,
        *("install", RELEASE, CHART, "-n", SYSTEM, "--create-namespace"),
        *("--set", f"image.repository={repository}", "--set", f"image.tag={tag}"),
        *("--set", "image.pullPolicy=Never", "--set", "gateway.enabled=true"),
        *("--wait", "--timeout=240s"),
    )
    with temporary_namespace(real.cluster) as ns:
        real.cluster.core.create_namespaced_secret(
            ns,
            {
                "metadata": {"name": "team-key", "labels": {KEY_LABEL: "true"}},
                "stringData": {"key": TENANT_KEY, "models": "*", "tenant": "team"},
            },
        )
        result = Stack(real, ns)
        yield result
        real.cluster.kubectl("delete", "llmb", "--all", "-n", ns, check=False)
        print(f"\nfigures: {json.dumps(result.figures, indent=1)}")


@contextlib.contextmanager
def weights_on_a_pvc(stack: Stack, claim: str) -> Iterator[str]:
    """The tiny model's folder on a hostPath PersistentVolume bound to `claim`: a team's
    own weights on a PVC, as the engine pod sees them. Yields the path in the claim."""
    cluster, ns = stack.cluster, stack.namespace
    folder = Path(tempfile.mkdtemp(prefix="fabric-hf-weights-"))
    try:
        folder.chmod(0o755)  # the engine runs as 65532
        model = write_tiny_hf_model(folder / "tiny")
        model.chmod(0o755)
        for f in model.iterdir():
            f.chmod(0o644)
        with hostpath_claim(cluster, ns, claim, folder):
            yield "tiny"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def client(base: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=60)


def status(cluster: Cluster, ns: str) -> dict[str, Any]:
    return dict(cluster.backend(ns, NAME).get("status") or {})


def check_chat(c: openai.OpenAI) -> None:
    answer = c.chat.completions.create(model=NAME, messages=ASK, max_tokens=8)
    assert answer.object == "chat.completion" and answer.model == NAME
    [choice] = answer.choices
    assert choice.message.role == "assistant" and choice.message.tool_calls is None
    assert choice.finish_reason in {"stop", "length"}
    assert answer.usage is not None and 0 < answer.usage.completion_tokens <= 8


def check_stream(c: openai.OpenAI) -> int:
    with c.chat.completions.create(model=NAME, messages=ASK, max_tokens=8, stream=True) as s:
        chunks = list(s)
    choices = [ch.choices[0] for ch in chunks if ch.choices]
    assert choices[0].delta.role == "assistant"
    assert choices[-1].finish_reason in {"stop", "length"}
    return len(chunks)


def check_tool_calls(c: openai.OpenAI) -> None:
    answer = c.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS)
    assert answer.choices[0].finish_reason == "tool_calls"
    [call] = answer.choices[0].message.tool_calls or []
    assert call.function.name == TOOL_NAME  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == TOOL_ARGUMENTS  # type: ignore[union-attr]
    with c.chat.completions.create(model=NAME, messages=ASK, tools=TOOLS, stream=True) as s:
        choices = [ch.choices[0] for ch in s if ch.choices]
    deltas = [d for ch in choices for d in ch.delta.tool_calls or []]
    assert choices[-1].finish_reason == "tool_calls"
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    assert json.loads(arguments) == TOOL_ARGUMENTS


def answering(stack: Stack) -> str | None:
    """The backend's Service URL once it answers a chat, else None."""
    if stack.cluster.service(stack.namespace, NAME) is None:
        return None  # the operator has not written it yet
    base = stack.service_url(stack.namespace, NAME, PORT)
    try:
        check_chat(client(base, "unused"))
    except (openai.APIConnectionError, openai.APITimeoutError):
        return None
    return base


def routed(stack: Stack) -> Any:
    """A raw answer through the gateway, or None while it has no route yet."""
    gateway = stack.service_url(SYSTEM, GATEWAY, 80)
    try:
        return client(gateway, TENANT_KEY).chat.completions.with_raw_response.create(
            model=NAME, messages=ASK, max_tokens=8
        )
    except openai.APIConnectionError:  # kube-proxy has not programmed the Service yet
        return None
    except openai.APIStatusError as err:
        if err.status_code in {404, 502, 503}:  # not routed yet
            return None
        raise


def proc_status(real: RealCluster, ns: str, pod: str) -> dict[str, str]:
    """/proc/PID/status of the engine's first process, as the node's kernel reports it."""
    node, cid = real.container(ns, pod, "engine")
    pid = node.ctr("tasks", "ps", cid).stdout.split()[2]
    text = node.run("cat", f"/proc/{pid}/status").stdout
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def test_a_transformers_backend_answers_through_its_service_and_the_gateway(
    stack: Stack,
) -> None:
    real, cluster, ns = stack.real, stack.cluster, stack.namespace
    with weights_on_a_pvc(stack, "hf-weights") as path:
        manifest = {
            "apiVersion": "llm.fabric.dev/v1alpha1",
            "kind": "LLMBackend",
            "metadata": {"name": NAME, "namespace": ns},
            "spec": {
                "engine": "transformers",
                "image": real.images["transformers"].ref,
                "imagePullPolicy": "Never",
                "model": {"pvc": {"claimName": "hf-weights", "path": path}},
            },
        }
        applied = time.monotonic()
        assert cluster.apply(manifest).returncode == 0, "the apply was refused"
        try:
            service = wait_for(
                "the first answer through the Service", lambda: answering(stack), 300, 0.2
            )
            first = time.monotonic() - applied
            st = wait_for(
                "phase Ready", lambda: (s := status(cluster, ns)).get("phase") == "Ready" and s, 60
            )
            ready = time.monotonic() - applied
            assert st["endpoint"] == f"http://{NAME}.{ns}.svc.cluster.local:{PORT}/v1"

            [pod] = cluster.core.list_namespaced_pod(
                ns, label_selector=f"llm.fabric.dev/backend={NAME}"
            ).items
            [cs] = pod.status.container_statuses
            assert cs.ready and cs.restart_count == 0, cs
            assert cs.image == real.images["transformers"].ref
            # Restricted: the kernel runs the server (and its model's process) as 65532.
            assert pod.spec.security_context.run_as_non_root is True
            assert real.container_uids(ns, pod.metadata.name) == {65532}
            st_proc = proc_status(real, ns, pod.metadata.name)
            assert st_proc["CapEff"] == "0" * 16 and st_proc["NoNewPrivs"] == "1"

            with client(service, "unused") as c:  # no key: the Service answers anyone
                check_chat(c)
                streamed = check_stream(c)
                check_tool_calls(c)
                assert [m.id for m in c.models.list().data] == [NAME]
                with pytest.raises(openai.BadRequestError):  # pinned to its served name
                    c.chat.completions.create(model="other", messages=ASK, max_tokens=1)

            raw = wait_for("the gateway to route", lambda: routed(stack), 90)
            assert raw.headers["x-fabric-backend"] == f"{ns}/{NAME}"
            assert raw.parse().model == NAME
            gateway = stack.service_url(SYSTEM, GATEWAY, 80)
            with client(gateway, TENANT_KEY) as c:
                via = check_stream(c)
                check_tool_calls(c)
            with client(gateway, "sk-nobody") as c, pytest.raises(openai.AuthenticationError):
                c.chat.completions.create(model=NAME, messages=ASK, max_tokens=1)

            log = cluster.kubectl("logs", "-n", ns, pod.metadata.name).stdout
            assert "Traceback" not in log, log[-3000:]
            print(
                f"\napply -> first answer through the Service {first:.1f}s, Ready {ready:.1f}s;"
                f" stream chunks: Service {streamed}, gateway {via};"
                f" status.toolCalling {st.get('toolCalling')!r}"
            )
            stack.figures |= {
                "apply_to_first_answer_s": round(first, 1),
                "apply_to_ready_s": round(ready, 1),
                "engine_vm_rss_first_process": st_proc.get("VmRSS", "?").strip(),
            }
        finally:
            cluster.kubectl("delete", "llmb", NAME, "-n", ns, check=False)
            wait_for(
                "the engine pod to go",
                lambda: (
                    not cluster.core.list_namespaced_pod(
                        ns, label_selector=f"llm.fabric.dev/backend={NAME}"
                    ).items
                ),
                120,
            )
