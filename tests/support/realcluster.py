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
from fabric_operator.localcluster.node import Image, LocalNode, cgroup_mounts
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


def node_parts(*roles: str) -> tuple[Path, dict[str, Image]]:
    """kubelet/kube-proxy's folder and the images by role (pause, operator, engine; all by
    default), built or taken from the cache once per session. A failed build fails
    loudly."""
    roles = roles or ("pause", "operator", "engine")
    if (why := why_no_real_nodes()) is not None:
        pytest.skip(why)
    if "node_bin" not in _parts:
        _parts["node_bin"] = Path(_script("get-node.sh").strip().splitlines()[-1])
    images: dict[str, Image] = _parts.setdefault("images", {})
    if missing := [r for r in roles if r not in images]:
        for line in _script("get-images.sh", *missing).splitlines():
            role, ref, archive = line.split()
            images[role] = Image(ref, Path(archive))
    return _parts["node_bin"], {r: images[r] for r in roles}


@dataclass
class RealCluster:
    local: LocalCluster
    cluster: Cluster
    images: dict[str, Image]

    @property
    def holders(self) -> list[int]:
        """The processes whose namespaces hold the cluster's nodes and switch."""
        switch = [self.local.switch.pid] if self.local.switch is not None else []
        return switch + [n.pid for n in self.local.members]

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
def real_cluster(
    workdir: Path, nodes: int = 1, roles: tuple[str, ...] = ()
) -> Iterator[RealCluster]:
    node_bin, images = node_parts(*roles)
    local = LocalCluster(
        workdir, find_binaries(REPO), node_bin, images=list(images.values()), nodes=nodes
    ).start()
    try:
        cluster = Cluster(local.kubeconfig, local=True, garbage_collector=True)
        yield RealCluster(local, cluster, images)
    finally:
        local.stop()


# ---- what a run could leave on the host ------------------------------------------------


# Where a kubelet, containerd or CNI would write on a host of their own: a node of the
# local cluster writes these in its own folders, never on the host.
HOST_PATHS = (
    "/opt/containerd",
    "/opt/cni",
    "/etc/cni/net.d",
    "/run/containerd",
    "/run/netns",
    "/var/lib/containerd",
    "/var/lib/kubelet",
    "/var/lib/cni",
    "/var/log/pods",
    "/var/log/containers",
)


def snapshot() -> dict[str, list[str]]:
    """What a run could leave on the host (all of it: compare with no other cluster
    starting or stopping meanwhile)."""

    def lines(*cmd: str) -> list[str]:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return sorted(out.splitlines())

    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    files = [str(f) for d in map(Path, HOST_PATHS) if d.exists() for f in [d, *d.rglob("*")]]
    return {
        "netns": lines("ip", "netns", "list"),
        "links": sorted(line.split(":")[1].strip() for line in lines("ip", "-o", "link")),
        "routes": lines("ip", "-o", "route", "show", "table", "all"),
        "mounts": sorted(mounts),
        "files": sorted(files),
        "cgroups": sorted(str(p) for m in cgroup_mounts() for p in Path(m).glob("fabric-*")),
    }


def left_nothing(before: dict[str, list[str]]) -> bool:
    """Nothing more than before (fewer cgroup folders is fine: a run reaps those a killed
    run left on its slot)."""
    after = snapshot()
    return set(after.pop("cgroups")) <= set(before["cgroups"]) and after == {
        k: v for k, v in before.items() if k != "cgroups"
    }


def namespaces(pids: list[int]) -> set[str]:
    """The network and PID namespaces these processes made (holders: switch, nodes)."""
    ours = {os.readlink("/proc/self/ns/net"), os.readlink("/proc/self/ns/pid")}
    found = set()
    for pid in pids:
        for ns in ("net", "pid_for_children"):
            with contextlib.suppress(OSError):
                found.add(os.readlink(f"/proc/{pid}/ns/{ns}"))
    return found - ours


def processes_in(spaces: set[str]) -> list[str]:
    """Processes still in any of these namespaces (shims and containers carry no work
    dir in their command line: their namespaces give them away): pid and command."""
    left = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        for ns in ("net", "pid"):
            with contextlib.suppress(OSError):
                if os.readlink(proc / "ns" / ns) in spaces:
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                    left.append(f"{proc.name} {cmd}")
                    break
    return left


def processes_of(workdir: Path) -> list[str]:
    """Processes whose command line names the work dir (control plane, helpers)."""
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True, check=True
    )
    return [line for line in out.stdout.splitlines() if str(workdir) in line]
