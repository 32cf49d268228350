"""`make run`: the operator on a local cluster with a real node, ending with the example
CPU backend answering a real chat completion, through the gateway, with a key of its own.

This is the development and test path: the local cluster (`fabric_operator.localcluster`)
has one real node (containerd and a kubelet in namespaces of their own), and the example
CPU llama.cpp backend runs there from the local engine image (llama-server's command line
on llama-cpp-python, a tiny random model baked in: no registry or model hub is reachable
here); the GPU examples find no node that can run them, which their status says. The
operator and the gateway run here as processes, so a code change needs no image build.

With `KUBECONFIG` set (or `--kubeconfig`), this is `fabric-operator dev` on that cluster:
its kubelets run the pods. Ctrl-C (or SIGTERM) stops everything this started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "operator")]

import httpx  # noqa: E402
import pytest  # noqa: E402 (the test support reports "cannot" as pytest skips)
import yaml  # noqa: E402
from tests.support.fixtures import OperatorProcess  # noqa: E402
from tests.support.gateway import gateway  # noqa: E402
from tests.support.kube import Cluster, wait_for  # noqa: E402
from tests.support.realcluster import RealCluster, real_cluster  # noqa: E402

from fabric_operator.api.crd import crd_yaml_for_server, wait_established  # noqa: E402
from fabric_operator.cli import main as fabric_operator  # noqa: E402
from fabric_operator.gateway.routes import KEY_LABEL  # noqa: E402
from fabric_operator.localcluster import free_port  # noqa: E402

NAMESPACE, BACKEND = "team-a", "tiny"  # examples/tiny-llamacpp-cpu.yaml
GATEWAY_PORT = 8000
# What a user cannot fix by waiting: stop waiting for Ready and say why.
HOPELESS = {"Invalid", "Failed", "CrashLoopBackOff", "ImagePullBackOff"}


def say(message: str) -> None:
    print(f"fabric-dev: {message}", flush=True)


def _phase(cluster: Cluster) -> tuple[str, str]:
    """The example backend's phase and its Ready condition's message."""
    obj = cluster.backend(NAMESPACE, BACKEND)
    status = obj.get("status") or {}
    conditions: list[dict[str, Any]] = status.get("conditions") or []
    ready = next((c for c in conditions if c["type"] == "Ready"), {})
    return status.get("phase", ""), ready.get("message", "")


def _wait_ready(cluster: Cluster, timeout: float) -> None:
    """Until the example backend is Ready, printing each phase it passes through."""
    deadline, last = time.monotonic() + timeout, ("", "")
    while time.monotonic() < deadline:
        now = _phase(cluster)
        if now != last:
            say(f"{NAMESPACE}/{BACKEND}: {now[0] or '(no status yet)'} {now[1]}".rstrip())
            last = now
        if now[0] == "Ready":
            return
        if now[0] in HOPELESS:
            raise RuntimeError(f"{NAMESPACE}/{BACKEND} is {now[0]}: {now[1]}")
        time.sleep(0.5)
    raise TimeoutError(f"{NAMESPACE}/{BACKEND} not Ready after {timeout:.0f}s ({last})")


def _request(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Say hello."}]}


def _answer(base_url: str, key: str) -> str | None:
    """One real chat completion: the proof `make run` ends with (None: not routed yet)."""
    r = httpx.post(
        f"{base_url}/chat/completions",
        json={**_request(BACKEND), "max_tokens": 16},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    if r.status_code in {404, 503}:  # the gateway has not seen the ready pod yet
        return None
    r.raise_for_status()
    return repr(r.json()["choices"][0]["message"]["content"])


def _banner(kubeconfig: Path, base_url: str, key: str, engine: str) -> str:
    curl = shlex.join(
        [
            *("curl", "-s", f"{base_url}/chat/completions"),
            *("-H", f"Authorization: Bearer {key}", "-H", "Content-Type: application/json"),
            *("-d", json.dumps(_request(BACKEND))),
        ]
    )
    return f"""
  Development and test path: the example CPU backend runs on a real local node from the
  local engine image, on a tiny generated model (random weights: the words are nonsense,
  the API is real).

  export KUBECONFIG={kubeconfig}
  kubectl get llmb -A

  base_url: {base_url}      (the gateway; models: {BACKEND})
  api key:  {key}
  {curl}

  the backend itself: {engine}/v1 (its Service), key 'change-me' (Secret {NAMESPACE}/tiny-key)

  Ctrl-C stops everything.
"""


def _interrupt(*_: object) -> None:
    """SIGINT/SIGTERM: unwind from wherever the main thread is (the ExitStack stops what
    was started); further signals are ignored so that the clean-up finishes."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise KeyboardInterrupt


def _cluster(stack: contextlib.ExitStack, workdir: Path) -> RealCluster:
    """The local cluster with one real node, the CRD installed."""
    say(f"starting a local cluster with a real node in {workdir} (first run: builds) ...")
    real = stack.enter_context(real_cluster(workdir / "cluster", roles=("pause", "engine")))
    cluster = real.cluster
    version = cluster.kubectl("version", "-o", "json").stdout
    cluster.kubectl("apply", "-f", "-", stdin=crd_yaml_for_server(version))
    wait_established(lambda *a: cluster.kubectl(*a).stdout)
    wait_for(
        "the default service account",
        lambda: cluster.core.list_namespaced_service_account("default").items,
        60,
    )
    return real


def _examples(real: RealCluster) -> str:
    """examples/, sized for a small machine (CPU requests of 100m, so that the Ollama
    example, which cannot pull its image here, leaves the node's CPUs to the others), and
    the llama.cpp example on the local engine image (no registry here)."""
    docs = []
    for path in sorted((REPO / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            if doc.get("kind") == "LLMBackend":
                requests = doc["spec"].get("resources", {}).get("requests")
                if requests:
                    requests |= {"cpu": "100m", "memory": "256Mi"}
                    doc["spec"]["resources"].pop("limits", None)
                if doc["metadata"]["name"] == BACKEND:
                    doc["spec"] |= {"image": real.images["engine"].ref, "imagePullPolicy": "Never"}
            docs.append(doc)
    return yaml.safe_dump_all(docs)


def _tenant_key(cluster: Cluster) -> str:
    """A fresh gateway key for the example namespace (a labelled Secret, as for any team)."""
    key = f"sk-dev-{secrets.token_hex(12)}"
    cluster.core.create_namespaced_secret(
        NAMESPACE,
        {
            "metadata": {"name": "dev-tenant", "labels": {KEY_LABEL: "true"}},
            "stringData": {"key": key, "models": "*", "tenant": "dev"},
        },  # type: ignore[arg-type]  # the client accepts plain dicts
    )
    return key


def local(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fabric-dev-"))
    workdir.mkdir(parents=True, exist_ok=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    with contextlib.ExitStack() as stack:
        try:
            real = _cluster(stack, workdir)
        except (pytest.skip.Exception, pytest.fail.Exception) as why:
            say(f"cannot run a local cluster with a real node here: {why}")
            return 1
        cluster, kubeconfig = real.cluster, real.cluster.kubeconfig
        operator = OperatorProcess(kubeconfig, workdir)
        operator.start()
        stack.callback(operator.stop)
        say(f"operator running (log: {operator.log_path})")
        applied = time.monotonic()
        cluster.kubectl("apply", "-f", "-", stdin=_examples(real))
        key = _tenant_key(cluster)
        port = free_port() if _busy(GATEWAY_PORT) else GATEWAY_PORT
        gw = stack.enter_context(
            gateway(f"--kubeconfig={kubeconfig}", workdir=workdir, ready_path="/readyz", port=port)
        )
        say(f"gateway on {gw.url} (log: {workdir / 'gateway.log'})")
        base_url = f"{gw.url}/v1"
        _wait_ready(cluster, args.timeout)
        answer = wait_for("the first answer", lambda: _answer(base_url, key), 60, 0.2)
        took = time.monotonic() - applied
        say(f"first answer through the gateway, {took:.1f} s after the apply: {answer}")
        service = cluster.core.read_namespaced_service(BACKEND, NAMESPACE).spec.cluster_ip
        print(_banner(kubeconfig, base_url, key, f"http://{service}:8080"), flush=True)
        while True:
            time.sleep(0.5)
            for name, proc, log in (
                ("operator", operator.proc, operator.log_path),
                ("gateway", gw.proc, workdir / "gateway.log"),
            ):
                if proc is not None and proc.poll() is not None:
                    say(f"the {name} exited ({proc.returncode}); see {log}")
                    return 1


def _busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    parser.add_argument(
        "--workdir", help="where the local cluster and logs go (default: a tmp dir)"
    )
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds to wait for the example to be Ready"
    )
    args = parser.parse_args()
    if args.kubeconfig:  # a real cluster: its kubelets run the pods
        return fabric_operator(["dev", f"--kubeconfig={args.kubeconfig}"])
    try:
        return local(args)
    except KeyboardInterrupt:
        say("stopped")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
