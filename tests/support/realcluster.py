"""Real nodes for tests: the local cluster with containerd and kubelets, and the images
they run (fabric_operator.localcluster.cluster; hack/get-node.sh, hack/get-images.sh).

    with real_cluster(workdir, nodes=2) as real:
        real.cluster.kubectl(...)            # tests.support.kube.Cluster, admin
        real.images["engine"].ref            # the CPU engine image, already on every node
        real.kill_container(ns, pod)         # what an OOM kill or a crash does
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fabric_operator.localcluster import find_binaries
from fabric_operator.localcluster.cluster import LocalCluster
from fabric_operator.localcluster.node import Image, LocalNode
from tests.conftest import REPO
from tests.support.kube import Cluster

_parts: dict[str, Any] = {}


def _script(name: str, *args: str) -> str:
    proc = subprocess.run(
        ["bash", str(REPO / "hack" / name), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
    )
    if proc.returncode != 0:
        pytest.fail(f"hack/{name} failed:\n{proc.stderr[-4000:]}", pytrace=False)
    return proc.stdout


def why_no_real_nodes() -> str | None:
    """What this machine lacks to run real nodes, if anything (then tests skip saying so)."""
    if os.geteuid() != 0:
        return "real nodes need root (network, mount and PID namespaces; a veth on the host)"
    missing = [t for t in ("unshare", "nsenter", "ip", "apt-get") if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not found"
    return None


def node_parts() -> tuple[Path, dict[str, Image]]:
    """kubelet/kube-proxy's folder and the images by role (pause, operator, engine), built
    or taken from the cache once per session. A failed build fails loudly."""
    if not _parts:
        if (why := why_no_real_nodes()) is not None:
            pytest.skip(why)
        node_bin = Path(_script("get-node.sh").strip().splitlines()[-1])
        images = {}
        for line in _script("get-images.sh").splitlines():
            role, ref, archive = line.split()
            images[role] = Image(ref, Path(archive))
        _parts.update(node_bin=node_bin, images=images)
    return _parts["node_bin"], _parts["images"]


@dataclass
class RealCluster:
    local: LocalCluster
    cluster: Cluster
    images: dict[str, Image]

    def node(self, name: str) -> LocalNode:
        return next(n for n in self.local.members if n.name == name)

    def container(self, namespace: str, pod: str, container: str) -> tuple[LocalNode, str]:
        """The node running a pod's container and the container's containerd id."""
        obj = self.cluster.core.read_namespaced_pod(pod, namespace)
        status = next(s for s in obj.status.container_statuses if s.name == container)
        assert status.container_id, f"{namespace}/{pod}/{container} has no container yet"
        return self.node(obj.spec.node_name), status.container_id.split("://", 1)[1]

    def kill_container(self, namespace: str, pod: str, container: str = "engine") -> None:
        """SIGKILL the container's processes through containerd (a crash, an OOM kill)."""
        node, cid = self.container(namespace, pod, container)
        node.ctr("tasks", "kill", "--all", "--signal", "SIGKILL", cid)

    def container_uids(self, namespace: str, pod: str, container: str = "engine") -> set[int]:
        """The real user ids the container's processes run as, read from the kernel."""
        node, cid = self.container(namespace, pod, container)
        pids = node.ctr("tasks", "ps", cid).stdout.split()[2::2]  # header: PID INFO
        uids = set()
        for pid in pids:
            status = node.run("cat", f"/proc/{pid}/status").stdout  # the node's /proc
            uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
            uids.add(int(uid_line.split()[1]))
        return uids


@contextlib.contextmanager
def real_cluster(workdir: Path, nodes: int = 1) -> Iterator[RealCluster]:
    node_bin, images = node_parts()
    local = LocalCluster(
        workdir, find_binaries(REPO), node_bin, images=list(images.values()), nodes=nodes
    ).start()
    try:
        cluster = Cluster(local.kubeconfig, local=True, garbage_collector=True)
        yield RealCluster(local, cluster, images)
    finally:
        local.stop()
