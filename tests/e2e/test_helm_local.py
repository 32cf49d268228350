"""Install, use, upgrade and uninstall the chart; the operator holds only its RBAC."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from fabric_operator.gateway.routes import KEY_LABEL
from tests.conftest import REPO
from tests.support.fixtures import OperatorProcess, settle
from tests.support.gateway import gateway
from tests.support.kube import Cluster, run_pods, wait_for
from tests.support.upstream import upstream

pytestmark = pytest.mark.e2e

CHART = REPO / "charts" / "fabric-operator"
RELEASE, SYSTEM, TEAM = "fab", "fabric-system", "team-e2e"
SA = f"system:serviceaccount:{SYSTEM}:fab-fabric-operator"


def run(*cmd: str | Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"{cmd}: {proc.stdout}\n{proc.stderr}"
    return proc


def sa_kubeconfig(cluster: Cluster, path: Path, account: str = "fab-fabric-operator") -> Path:
    """A kubeconfig that is one of the chart's ServiceAccounts and nothing more."""
    token = cluster.kubectl(
        "create", "token", account, "-n", SYSTEM, "--duration=1h"
    ).stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    server = admin["clusters"][0]["cluster"]
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "sa",
                "clusters": [{"name": "local", "cluster": server}],
                "users": [{"name": "sa", "user": {"token": token}}],
                "contexts": [{"name": "sa", "context": {"cluster": "local", "user": "sa"}}],
            }
        )
    )
    return path


def check_gateway(cluster: Cluster, tmp_path: Path) -> None:
    """The chart's gateway, run here with its own ServiceAccount's token: it reads what it
    needs (backends, Endpoints, keys) and can change nothing."""
    account = f"system:serviceaccount:{SYSTEM}:fab-fabric-operator-gateway"
    for verb, resource in [("create", "secrets"), ("patch", "llmbackends"), ("list", "nodes")]:
        answer = cluster.kubectl(
            "auth", "can-i", verb, resource, "-A", f"--as={account}", check=False
        ).stdout.strip()
        assert answer == "no", (verb, resource, answer)
    kubeconfig = sa_kubeconfig(cluster, tmp_path / "gw.kubeconfig", "fab-fabric-operator-gateway")
    with (
        upstream("provider") as provider,
        gateway(f"--kubeconfig={kubeconfig}", workdir=tmp_path, ready_path="/readyz") as gw,
    ):
        key = {"key": "sk-e2e-team", "models": "*"}
        cluster.core.create_namespaced_secret(
            TEAM,
            {
                "metadata": {"name": "team-key", "labels": {KEY_LABEL: "true"}},
                "stringData": key,
            },
        )
        cluster.apply(
            {
                "apiVersion": "llm.fabric.dev/v1alpha1",
                "kind": "LLMBackend",
                "metadata": {"name": "cloud", "namespace": TEAM},
                "spec": {"engine": "remote", "remote": {"baseURL": provider.url}},
            }
        )

        def chat(model: str) -> httpx.Response:
            return httpx.post(
                f"{gw.url}/v1/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
                headers={"authorization": "Bearer sk-e2e-team"},
            )

        wait_for("a routed answer", lambda: chat("cloud").status_code == 200, 20)
        assert chat("cloud").headers["x-fabric-backend"] == f"{TEAM}/cloud"
        # The simulated engine pod has no address: known, but no ready replica.
        assert chat("tiny").json()["error"]["code"] == "upstream_unavailable"
    cluster.custom.delete_namespaced_custom_object(
        "llm.fabric.dev", "v1alpha1", TEAM, "llmbackends", "cloud"
    )


def test_install_use_upgrade_uninstall(e2e_cluster: Cluster, helm: Path, tmp_path: Path) -> None:
    cluster = e2e_cluster
    kube = f"--kubeconfig={cluster.kubeconfig}"
    install = run(
        *(helm, "install", RELEASE, CHART, kube, "-n", SYSTEM, "--create-namespace"),
        *("--wait=false", "--set", "gateway.enabled=true"),
    )
    notes = install.stdout.split("NOTES:", 1)[1]
    assert "kubectl get llmb -n default" in notes
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/llmbackends.llm.fabric.dev"
    )
    # The chart's operator pod, as a kubelet would report it (nothing runs it here) ...
    wait_for(
        "the operator pod scheduled",
        lambda: run_pods(cluster, SYSTEM, "app.kubernetes.io/name=fabric-operator"),
        30,
    )
    wait_for(
        "the operator Deployment available",
        lambda: (
            (cluster.deployment(SYSTEM, "fab-fabric-operator") or {})
            .get("status", {})
            .get("availableReplicas")
        ),
        30,
    )
    # ... while the real operator runs here with the ServiceAccount's token only.
    operator = OperatorProcess(sa_kubeconfig(cluster, tmp_path / "sa.kubeconfig"), tmp_path)
    operator.start()
    try:
        forbidden = [
            ("list", "secrets"),
            ("create", "pods"),
            ("delete", "pods"),
            ("update", "llmbackends"),
            ("list", "nodes"),
        ]
        for verb, resource in forbidden:
            answer = cluster.kubectl(
                "auth", "can-i", verb, resource, "-A", f"--as={SA}", check=False
            ).stdout.strip()
            assert answer == "no", (verb, resource, answer)
        denied = subprocess.run(
            ["kubectl", f"--kubeconfig={operator.kubeconfig}", "get", "secrets", "-A"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert denied.returncode != 0 and "forbidden" in denied.stderr

        cluster.core.create_namespace({"metadata": {"name": TEAM}})
        cluster.core.create_namespaced_secret(
            TEAM, {"metadata": {"name": "key"}, "stringData": {"api-key": "e2e-k3y"}}
        )
        backend: dict[str, Any] = {
            "apiVersion": "llm.fabric.dev/v1alpha1",
            "kind": "LLMBackend",
            "metadata": {"name": "tiny", "namespace": TEAM},
            "spec": {
                "engine": "llamacpp",
                "model": {"url": "https://h.invalid/tiny.gguf"},
                "apiKeySecretRef": {"name": "key", "key": "api-key"},
            },
        }
        wait_for(
            "the ServiceAccount to see the CRD", lambda: cluster.apply(backend).returncode == 0, 30
        )
        wait_for(
            "the engine pod scheduled",
            lambda: run_pods(cluster, TEAM, "llm.fabric.dev/backend=tiny"),
            30,
        )
        status = wait_for(
            "Ready",
            lambda: (
                (s := cluster.backend(TEAM, "tiny").get("status") or {}).get("phase") == "Ready"
                and s
            ),
            30,
        )
        assert status["endpoint"] == f"http://tiny.{TEAM}.svc.cluster.local:8080/v1"
        assert operator.health()["errors"] == 0, operator.logs()[-2000:]
        check_gateway(cluster, tmp_path)

        check = subprocess.run(
            [
                str(REPO / ".venv" / "bin" / "fabric-operator"),
                "check",
                f"--health-url=http://127.0.0.1:{operator.port}/healthz",
                f"--kubeconfig={operator.kubeconfig}",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert check.returncode == 0 and check.stdout.startswith("ok: operator healthy"), (
            check.stderr
        )

        run(
            helm,
            "upgrade",
            RELEASE,
            CHART,
            kube,
            "-n",
            SYSTEM,
            "--set",
            "operator.workers=2",
            "--wait=false",
        )
        args = cluster.deployment(SYSTEM, "fab-fabric-operator")["spec"]["template"]["spec"][
            "containers"
        ][0]["args"]
        assert "--workers=2" in args
        values = json.loads(
            run(helm, "get", "values", RELEASE, kube, "-n", SYSTEM, "-o", "json").stdout
        )
        assert values == {"operator": {"workers": 2}}
    finally:
        operator.stop()

    run(helm, "uninstall", RELEASE, kube, "-n", SYSTEM)
    settle(2)
    left = cluster.kubectl(
        "get", "deploy,svc,sa,role,rolebinding", "-n", SYSTEM, "-o", "name"
    ).stdout.split()
    assert [x for x in left if "fab-" in x] == []
    cluster_wide = cluster.kubectl(
        "get", "clusterrole,clusterrolebinding", "-o", "name"
    ).stdout.split()
    assert [x for x in cluster_wide if "fab-fabric-operator" in x] == []
    # The CRD is kept, and with it the users' LLMBackends and their running children.
    assert cluster.kubectl("get", "crd", "llmbackends.llm.fabric.dev", check=False).returncode == 0
    assert cluster.backend(TEAM, "tiny")["metadata"]["name"] == "tiny"
    assert cluster.deployment(TEAM, "tiny") is not None
    # No finalizer: with the operator gone, a user can still delete a backend.
    cluster.kubectl("delete", "llmb/tiny", "-n", TEAM, "--timeout=20s")
    # Removing the CRD on purpose is one documented command.
    cluster.kubectl("delete", "crd", "llmbackends.llm.fabric.dev", "--timeout=30s")
