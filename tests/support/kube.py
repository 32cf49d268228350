"""Test helpers for talking to the real API server: waits, kubectl, a tiny node simulator."""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from fabric_operator.api.v1alpha1 import GROUP, PLURAL, VERSION

T = TypeVar("T")


def wait_for(
    what: str, probe: Callable[[], T | None], timeout: float = 20.0, interval: float = 0.1
) -> T:
    """Poll until probe() returns something truthy; fail with `what` otherwise. An API
    error (a 404 before an object exists, a 503 during an outage) means "not yet": it is
    remembered for the failure message, never taken for success."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            result = probe()
        except ApiException as err:
            last = f"ApiException {err.status}: {err.reason}"
        else:
            if result:
                return result
            last = result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class Cluster:
    """Clients and kubectl bound to one kubeconfig."""

    def __init__(self, kubeconfig: Path, *, local: bool, garbage_collector: bool) -> None:
        self.kubeconfig = kubeconfig
        # A local control plane has no kubelet: tests may add simulated Nodes and run pods.
        self.local = local
        self.garbage_collector = garbage_collector
        self.api = config.new_client_from_config(config_file=str(kubeconfig))
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.networking = client.NetworkingV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self._cache = tempfile.TemporaryDirectory(prefix="kubectl-cache-")  # gone with it

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            # A discovery cache of its own: kubectl's default one is per host:port, and an
            # earlier cluster of this run may have had the port without the CRD.
            [
                "kubectl",
                f"--kubeconfig={self.kubeconfig}",
                f"--cache-dir={self._cache.name}",
                *args,
            ],
            input=stdin,
            check=False,
            text=True,
            capture_output=True,
            timeout=60,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr}")
        return proc

    def apply(self, manifest: dict[str, Any], *flags: str) -> subprocess.CompletedProcess[str]:
        return self.kubectl("apply", *flags, "-f", "-", stdin=json.dumps(manifest), check=False)

    def backend(self, namespace: str, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name
        )
        return obj

    def condition(self, namespace: str, name: str, type_: str) -> dict[str, Any]:
        status = self.backend(namespace, name).get("status") or {}
        for cond in status.get("conditions") or []:
            if cond["type"] == type_:
                return dict(cond)
        return {}

    def _read(self, reader: Callable[..., Any], namespace: str, name: str) -> dict[str, Any] | None:
        try:
            resp = reader(name, namespace, _preload_content=False)
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        data: dict[str, Any] = json.loads(resp.data)
        return data

    def deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._read(self.apps.read_namespaced_deployment, namespace, name)

    def children_gone(self, namespace: str, name: str) -> bool:
        """Neither the Deployment nor the Service of that backend's name exists."""
        return self.deployment(namespace, name) is None and self.service(namespace, name) is None

    def service(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._read(self.core.read_namespaced_service, namespace, name)

    def events(self, namespace: str, name: str) -> list[dict[str, Any]]:
        resp = self.core.list_namespaced_event(
            namespace,
            field_selector=f"involvedObject.name={name},involvedObject.kind=LLMBackend",
            _preload_content=False,
        )
        items: list[dict[str, Any]] = json.loads(resp.data)["items"]
        return items

    def write_counts(self) -> dict[str, int]:
        """Writes the API server has served, by verb and resource, from its own /metrics."""
        metrics = self.kubectl("get", "--raw", "/metrics").stdout
        counts: dict[str, int] = {}
        for line in metrics.splitlines():
            if not line.startswith("apiserver_request_total{"):
                continue
            labels = dict(
                part.split("=", 1)
                for part in line[line.index("{") + 1 : line.index("}")].replace('"', "").split(",")
            )
            if labels.get("verb") in {
                "POST",
                "PUT",
                "PATCH",
                "DELETE",
                "APPLY",
                "CREATE",
                "UPDATE",
            }:
                key = f"{labels['verb']} {labels.get('resource')}/{labels.get('subresource', '')}"
                counts[key] = counts.get(key, 0) + int(float(line.rsplit(" ", 1)[1]))
        return counts


def add_node(
    cluster: Cluster,
    name: str,
    *,
    labels: dict[str, str] | None = None,
    capacity: dict[str, str] | None = None,
    taints: list[dict[str, str]] | None = None,
) -> None:
    """A Node the real scheduler can place pods on (there is no kubelet behind it)."""
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "fabric.dev/simulated": "true",
                **(labels or {}),
            },
        },
    }
    try:
        cluster.core.create_node(node)
    except ApiException as err:
        if err.status != 409:
            raise
    full = {"cpu": "64", "memory": "256Gi", "pods": "110", **(capacity or {})}
    cluster.core.patch_node_status(
        name,
        {
            "status": {
                "capacity": full,
                "allocatable": full,
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "simulated",
                        "lastHeartbeatTime": _now(),
                        "lastTransitionTime": _now(),
                    }
                ],
            }
        },
    )
    # Admission taints a new Node not-ready; with no node-lifecycle controller here, the
    # simulated kubelet lifts it itself (and sets the pool's own taints).
    cluster.core.patch_node(name, {"spec": {"taints": taints}})


def add_cpu_node(cluster: Cluster, name: str = "sim-cpu-0") -> None:
    add_node(cluster, name)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def run_pods(
    cluster: Cluster, namespace: str, selector: str, pod_ips: list[str] | None = None
) -> int:
    """Mark scheduled pods Running and Ready, as a kubelet would; returns how many.
    With `pod_ips`, the pods get those addresses in turn (the Endpoints publish them)."""
    pods = cluster.core.list_namespaced_pod(namespace, label_selector=selector).items
    done = 0
    for pod in pods:
        if not pod.spec.node_name or pod.metadata.deletion_timestamp:
            continue
        containers = [c.name for c in pod.spec.containers]
        cluster.core.patch_namespaced_pod_status(
            pod.metadata.name,
            namespace,
            {
                "status": {
                    **(
                        {"podIP": pod_ips[done], "podIPs": [{"ip": pod_ips[done]}]}
                        if pod_ips
                        else {}
                    ),
                    "phase": "Running",
                    "conditions": [
                        {"type": t, "status": "True", "lastTransitionTime": _now()}
                        for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
                    ],
                    "containerStatuses": [
                        {
                            "name": c,
                            "ready": True,
                            "restartCount": 0,
                            "image": "sim",
                            "imageID": "sim",
                            "started": True,
                            "state": {"running": {"startedAt": _now()}},
                        }
                        for c in containers
                    ],
                }
            },
        )
        done += 1
    return done


@contextlib.contextmanager
def hostpath_claim(cluster: Cluster, namespace: str, claim: str, folder: Path) -> Iterator[None]:
    """`folder` on a hostPath PersistentVolume bound to a read-only claim of that name:
    what a team's own weights on a PVC look like to an engine pod (the real nodes run on
    this machine). Both are deleted at the end; the folder is the caller's."""
    pv = f"{namespace}-{claim}"
    try:
        cluster.core.create_persistent_volume(
            {
                "metadata": {"name": pv},
                "spec": {
                    "capacity": {"storage": "1Gi"},
                    "accessModes": ["ReadOnlyMany"],
                    "storageClassName": "",
                    "hostPath": {"path": str(folder), "type": "Directory"},
                    "claimRef": {"namespace": namespace, "name": claim},
                },
            }
        )
        cluster.core.create_namespaced_persistent_volume_claim(
            namespace,
            {
                "metadata": {"name": claim},
                "spec": {
                    "accessModes": ["ReadOnlyMany"],
                    "storageClassName": "",
                    "volumeName": pv,
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            },
        )
        wait_for(
            "the claim to bind",
            lambda: (
                cluster.core.read_namespaced_persistent_volume_claim(claim, namespace).status.phase
                == "Bound"
            ),
            60,
        )
        yield
    finally:
        cluster.kubectl("delete", "pvc", claim, "-n", namespace, "--wait=false", check=False)
        cluster.kubectl("delete", "pv", pv, "--wait=false", check=False)
