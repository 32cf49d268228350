"""Fixtures shared by the integration and e2e suites: a real API server, the operator as
its own process, throw-away namespaces."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from fabric_operator.api.crd import crd_yaml_for_server, wait_established
from fabric_operator.localcluster import LocalControlPlane, find_binaries, free_port
from fabric_operator.machinery import metrics
from tests.conftest import REPO
from tests.support.kube import Cluster, add_cpu_node, wait_for


@contextlib.contextmanager
def local_cluster(
    tmp_path_factory: pytest.TempPathFactory, *, install_crd: bool = True
) -> Iterator[Cluster]:
    """A real API server: FABRIC_TEST_KUBECONFIG's, else a fresh local control plane."""
    given = os.environ.get("FABRIC_TEST_KUBECONFIG")
    plane = None
    if given:
        kubeconfig = Path(given)
    else:
        plane = LocalControlPlane(tmp_path_factory.mktemp("cluster"), find_binaries(REPO))
        plane.start()
        kubeconfig = plane.kubeconfig
    c = Cluster(
        kubeconfig,
        local=plane is not None,
        garbage_collector=plane is None or plane.has_controller_manager,
    )
    try:
        if install_crd:
            version = c.kubectl("version", "-o", "json").stdout
            c.kubectl("apply", "-f", "-", stdin=crd_yaml_for_server(version))
            wait_established(lambda *a: c.kubectl(*a).stdout)
        wait_for(
            "the default service account controller",
            lambda: c.core.list_namespaced_service_account("default").items,
            30,
        )
        if c.local:
            add_cpu_node(c)
        yield c
    finally:
        if plane is not None:
            plane.stop()


class OperatorProcess:
    """`fabric-operator run` as its own process, the way it runs in a pod. `config`, if
    given, is written as its --config file (the chart's ConfigMap)."""

    def __init__(
        self, kubeconfig: Path, logdir: Path, *args: str, config: dict[str, Any] | None = None
    ) -> None:
        self.kubeconfig, self.logdir, self.args = kubeconfig, logdir, args
        if config is not None:
            logdir.mkdir(parents=True, exist_ok=True)
            path = logdir / "operator-config.yaml"
            path.write_text(json.dumps(config))  # JSON is YAML
            self.args = (*args, f"--config={path}")
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.logdir / f"operator-{self.starts}.log"

    def start(self) -> None:
        self.starts += 1
        self.port, self.metrics_port = free_port(), free_port()
        env = dict(os.environ, PYTHONPATH=str(REPO / "operator"))
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child process writes it
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fabric_operator",
                "run",
                f"--kubeconfig={self.kubeconfig}",
                f"--health-address=127.0.0.1:{self.port}",
                f"--metrics-address=127.0.0.1:{self.metrics_port}",
                *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        wait_for("the operator's /healthz", self._healthy, timeout=30)
        wait_for("the operator's /metrics", self._metrics_up, timeout=30)

    def _metrics_up(self) -> bool:
        try:
            self.api_requests()
            return True
        except OSError:
            return False

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"operator exited: {self.logs()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
            data: dict[str, Any] = json.loads(r.read())["controller"]
            return data

    def api_requests(self) -> dict[str, float]:
        """The operator's own request counters, read live from /metrics (uncached)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as r:
            samples = metrics.parse(r.read().decode())
        return {
            k: v for k, v in samples.items() if k.startswith("fabric_operator_api_requests_total")
        }

    def metric(self, name: str) -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=2) as r:
            return metrics.parse(r.read().decode()).get(name, 0.0)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def temporary_namespace(cluster: Cluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.core.create_namespace({"metadata": {"name": name}})
    wait_for(
        "the namespace's default ServiceAccount",
        lambda: cluster.core.list_namespaced_service_account(name).items,
        30,
    )
    yield name
    cluster.core.delete_namespace(name)
    # No kubelet confirms pod deletions on simulated nodes: remove them as one would.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        pods = cluster.core.list_namespaced_pod(name).items
        if not pods:
            break
        for pod in pods:
            with contextlib.suppress(ApiException):
                cluster.core.delete_namespaced_pod(pod.metadata.name, name, grace_period_seconds=0)
        time.sleep(0.5)


def settle(seconds: float = 1.5) -> None:
    """Let watches deliver and the operator react (for asserting that nothing happens)."""
    time.sleep(seconds)
