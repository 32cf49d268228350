"""The local cluster's real nodes: pods run, talk across nodes and through Services, and
nothing of the cluster is left on the host afterwards, whether the run ends, fails or is
killed or fails midway through its start (compared: `ip netns`, links, routes, mounts,
the paths a kubelet and containerd would use on a host, cgroup folders, and processes, by
command line and by namespace)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest

from fabric_operator.localcluster.network import Switch
from fabric_operator.localcluster.node import LocalNode
from tests.conftest import REPO
from tests.support.kube import wait_for
from tests.support.realcluster import (
    RealCluster,
    left_nothing,
    namespaces,
    node_parts,
    processes_in,
    processes_of,
    real_cluster,
    snapshot,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


# A raw DNS query for example.com to the pod's name server; prints the answer's rcode.
DNS_QUERY = (
    "import socket, struct; "
    "ns = open('/etc/resolv.conf').read().split('nameserver')[1].split()[0]; "
    "q = struct.pack('>HHHHHH', 7, 0x0100, 1, 0, 0, 0) + bytes([7]) + b'example' "
    "+ bytes([3]) + b'com' + bytes([0]) + struct.pack('>HH', 1, 1); "
    "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5); "
    "s.sendto(q, (ns, 53)); print('rcode', s.recv(512)[3] & 15)"
)
ENGINE_ARGS = ["--host", "0.0.0.0", "--port", "8080", "--alias", "tiny"]


def engine_deployment(image: str, replicas: int) -> dict[str, Any]:
    """The CPU engine, one replica per node (required anti-affinity)."""
    labels = {"app": "e"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "e", "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "affinity": {
                        "podAntiAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": [
                                {
                                    "labelSelector": {"matchLabels": labels},
                                    "topologyKey": "kubernetes.io/hostname",
                                }
                            ]
                        }
                    },
                    "containers": [
                        {
                            "name": "engine",
                            "image": image,
                            "imagePullPolicy": "Never",
                            "args": [*ENGINE_ARGS, "--model-url", "https://x.invalid/m.gguf"],
                            "readinessProbe": {
                                "httpGet": {"path": "/health", "port": 8080},
                                "periodSeconds": 1,
                            },
                            "securityContext": {"runAsUser": 65532, "runAsNonRoot": True},
                        }
                    ],
                },
            },
        },
    }


SERVICE = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "e", "namespace": "default"},
    "spec": {"selector": {"app": "e"}, "ports": [{"port": 8080, "protocol": "TCP"}]},
}


def chat(base: str) -> dict[str, Any]:
    r = httpx.post(
        f"{base}/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=30,
    )
    r.raise_for_status()
    body: dict[str, Any] = r.json()
    return body


def answers(base: str) -> bool:
    try:
        return chat(base)["object"] == "chat.completion"
    except httpx.HTTPError:
        return False


def check_two_nodes_serve(real: RealCluster) -> None:
    """Pods on both nodes, reached from the host by pod IP and by ClusterIP, and from a pod
    on one node to the pod on the other."""
    c = real.cluster
    assert c.apply(engine_deployment(real.images["engine"].ref, 2)).returncode == 0
    assert c.apply(SERVICE).returncode == 0
    c.kubectl("rollout", "status", "deploy/e", "--timeout=180s")
    pods = c.core.list_namespaced_pod("default", label_selector="app=e").items
    assert sorted(p.spec.node_name for p in pods) == ["node-0", "node-1"]
    for pod in pods:
        assert answers(f"http://{pod.status.pod_ip}:8080"), pod.metadata.name
    cluster_ip = c.core.read_namespaced_service("e", "default").spec.cluster_ip
    # kube-proxy programs a new Service within a moment of its Endpoints.
    wait_for("the Service through kube-proxy", lambda: answers(f"http://{cluster_ip}:8080"), 30)
    here, there = pods
    probe = (
        "import urllib.request as u; "
        f"print(u.urlopen('http://{there.status.pod_ip}:8080/health', timeout=5).read().decode())"
    )
    out = c.kubectl("exec", here.metadata.name, "--", "python", "-c", probe).stdout
    assert json.loads(out) == {"status": "ok"}
    # Service names resolve in pods (the node's DNS answers them, and nothing else).
    probe = (
        "import socket, urllib.request as u; "
        "print(socket.gethostbyname('e.default.svc.cluster.local'), "
        "u.urlopen('http://e:8080/health', timeout=5).status); "
        "socket.gethostbyname('example.com')"
    )
    named = c.kubectl("exec", here.metadata.name, "--", "python", "-c", probe, check=False)
    assert named.stdout.split() == [cluster_ip, "200"], named.stdout + named.stderr
    assert "gaierror" in named.stderr
    # ... because the node's DNS refuses every name outside the cluster (no recursion).
    refused = c.kubectl("exec", here.metadata.name, "--", "python", "-c", DNS_QUERY).stdout
    assert refused.split() == ["rcode", "5"], refused
    assert real.container_uids("default", here.metadata.name) == {65532}


def check_nothing_reaches_the_host(real: RealCluster) -> None:
    """The host opens connections into the cluster, never the other way: a socket of the
    host's listening on every address is out of reach of pods and nodes alike."""
    listener = socket.create_server(("0.0.0.0", 0))
    port = listener.getsockname()[1]
    host_ip = real.local.plan.host_ip
    try:
        pod = real.cluster.core.list_namespaced_pod("default", label_selector="app=e").items[0]
        probe = f"import socket; socket.create_connection(({host_ip!r}, {port}), timeout=3)"
        attempt = real.cluster.kubectl(
            "exec", pod.metadata.name, "--", "python", "-c", probe, check=False
        )
        assert attempt.returncode != 0 and "timed out" in attempt.stderr, attempt.stderr
        dial = f"timeout 3 bash -c 'echo > /dev/tcp/{host_ip}/{port}'"
        assert real.node("node-0").run("bash", "-c", dial, check=False).returncode != 0
        # The same socket answers the host itself: the refusals above are the filter's.
        socket.create_connection((host_ip, port), timeout=3).close()
    finally:
        listener.close()


def test_two_nodes_serve_and_a_failed_run_leaves_nothing(tmp_path: Path) -> None:
    node_parts()  # built or cached before the "before" picture
    before = snapshot()
    with pytest.raises(RuntimeError, match="on purpose"), real_cluster(tmp_path, 2) as real:
        check_two_nodes_serve(real)
        check_nothing_reaches_the_host(real)
        during = snapshot()
        assert during["links"] != before["links"] and during["routes"] != before["routes"]
        assert len(during["cgroups"]) > len(before["cgroups"])
        assert processes_of(tmp_path)
        spaces = namespaces(real.holders)
        assert len(processes_in(spaces)) > 10  # containerd, shims, kubelets, engines...
        raise RuntimeError("on purpose")
    assert left_nothing(before), (before, snapshot())
    assert processes_of(tmp_path) == []
    # The kernel kills a PID namespace's processes when its init dies; they exit at once.
    wait_for("every process of the nodes gone", lambda: not processes_in(spaces), 10)


STEPS = {
    "switch": (Switch, "start"),
    "kubelet": (LocalNode, "_kubelet"),
    "ready": (LocalNode, "wait_ready"),
}


@pytest.mark.parametrize("step", sorted(STEPS))
def test_a_start_that_fails_midway_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """Whatever step fails, what the start had made is stopped and removed."""
    node_parts()
    before = snapshot()
    owner, name = STEPS[step]
    original = getattr(owner, name)
    ran: list[str] = []

    def fail(self: Any, *args: Any) -> None:
        original(self, *args)  # the step does its work, then fails
        ran.append(step)
        raise RuntimeError(f"{step} failed on purpose")

    monkeypatch.setattr(owner, name, fail)
    with pytest.raises(RuntimeError, match="on purpose"), real_cluster(tmp_path):
        pass
    assert ran == [step]
    assert left_nothing(before), (before, snapshot())
    assert processes_of(tmp_path) == []
    assert not (tmp_path / "node-0" / "var" / "lib").exists()


KILLED = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path[:0] = [{repo!r}, {repo!r} + "/operator"]
    from tests.support.realcluster import real_cluster
    with real_cluster(Path({workdir!r})) as real:
        real.cluster.kubectl("run", "p", "--image=localhost/fabric-pause:3.9",
                             "--image-pull-policy=Never")
        real.cluster.kubectl("wait", "--for=condition=Ready", "pod/p", "--timeout=120s")
        print("up", *real.holders, flush=True)
        time.sleep(3600)
""")


def test_a_killed_run_leaves_nothing(tmp_path: Path) -> None:
    """SIGKILL gives no chance to clean up: every process dies with its parent, and the
    kernel removes the namespaces and mounts; only empty cgroup folders stay, which the
    next cluster on that slot removes."""
    node_parts()
    before = snapshot()
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED.format(repo=str(REPO), workdir=str(tmp_path))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        up, *holders = proc.stdout.readline().split()
        assert up == "up", "the cluster did not come up"
        assert snapshot()["links"] != before["links"]
        spaces = namespaces([int(pid) for pid in holders])
        assert processes_in(spaces)
    finally:
        proc.kill()
        proc.wait()
    wait_for("every process of the killed run gone", lambda: not processes_of(tmp_path), 30)
    wait_for("every process of its nodes gone", lambda: not processes_in(spaces), 30)
    after = wait_for(
        "the kernel to remove the namespaces",
        lambda: (s := snapshot())["links"] == before["links"] and s,
        30,
    )
    left = set(after.pop("cgroups")) - set(before["cgroups"])
    assert after == {k: v for k, v in before.items() if k != "cgroups"}
    for folder in left:  # empty: no process in any of them
        assert not any(p.read_text().strip() for p in Path(folder).rglob("cgroup.procs"))
    # The next cluster on that slot removes them.
    with real_cluster(tmp_path / "next"):
        pass
    assert left_nothing(before), (before, snapshot())
    assert not left & set(snapshot()["cgroups"])
