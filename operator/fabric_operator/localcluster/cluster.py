"""A local cluster with real nodes: the control plane on the host's 127.0.0.1, a switch,
and N nodes running containerd and a kubelet (see network.py and node.py).

    cluster = LocalCluster(workdir, find_binaries(repo), node_bin, images=[...]).start()
    ... kubectl --kubeconfig cluster.kubeconfig ...
    cluster.stop()

Needs root (namespaces, a veth and routes on the host). Everything it creates goes when
`stop()` runs or when the process that started it dies, whichever comes first: the only
things on the host are the uplink `fabN` (with its address and routes) and processes that
die with their parent.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from fabric_operator.localcluster.controlplane import LocalControlPlane
from fabric_operator.localcluster.network import Plan, SlotLock, Switch
from fabric_operator.localcluster.node import (
    Image,
    LocalNode,
    cgroup_mounts,
    remove_cgroups,
)


@dataclass
class LocalCluster:
    workdir: Path
    bin_dir: Path  # kube-apiserver, kube-controller-manager, kube-scheduler, etcd
    node_bin_dir: Path  # kubelet, kube-proxy
    images: list[Image] = field(default_factory=list)
    nodes: int = 1
    node_labels: dict[str, str] = field(default_factory=dict)
    plane: LocalControlPlane | None = None
    switch: Switch | None = None
    members: list[LocalNode] = field(default_factory=list)
    _slot: SlotLock = field(default_factory=SlotLock)

    @property
    def kubeconfig(self) -> Path:
        assert self.plane is not None, "start() the cluster first"
        return self.plane.kubeconfig

    @property
    def plan(self) -> Plan:
        assert self._slot.plan is not None, "start() the cluster first"
        return self._slot.plan

    def start(self, timeout: float = 180.0) -> LocalCluster:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        plan = self._slot.acquire()
        # A killed run on this slot left its nodes' (empty) cgroup folders: nothing else.
        remove_cgroups([p for m in cgroup_mounts() for p in Path(m).glob(f"fabric-{plan.slot}-*")])
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Each part is ours to stop (stop()) from the moment it starts to start.
        self.plane = LocalControlPlane(
            self.workdir / "control-plane",
            self.bin_dir,
            advertise_address=plan.node_ip(0),
            extra_ips=[plan.node_ip(i) for i in range(self.nodes)],
            service_cidr=plan.service_cidr,
            node_lifecycle=True,
        )
        self.plane.start()
        self.switch = Switch(plan, self.workdir)
        self.switch.start()
        # Services and any pod address from the host (tests, make run) via node-0; each
        # node's own pods straight to it (LocalNode.start).
        self.switch.route(plan.service_cidr, plan.node_ip(0))
        self.switch.route(plan.cluster_cidr, plan.node_ip(0))
        for i in range(self.nodes):
            node = LocalNode(
                self.plane,
                plan,
                i,
                self.workdir / f"node-{i}",
                self.node_bin_dir,
                labels=dict(self.node_labels),
            )
            self.members.append(node)
            node.start(self.switch, self.nodes, self.images)
        for node in self.members:
            node.wait_ready(self.kubeconfig, timeout)

    def kubectl(self, *args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            # A discovery cache of its own: another cluster may have had this port.
            [
                "kubectl",
                f"--kubeconfig={self.kubeconfig}",
                f"--cache-dir={self.workdir}/kube-cache",
                *args,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def stop(self) -> None:
        """Nodes first (their pods die with them), then the switch and the control plane;
        every part is stopped even when another fails to (the first error is raised)."""
        steps = [node.stop for node in reversed(self.members)]
        if self.switch is not None:
            steps.append(self.switch.stop)
        if self.plane is not None:
            steps.append(self.plane.stop)
        steps.append(self._slot.release)
        errors: list[BaseException] = []
        for step in steps:
            try:
                step()
            except Exception as err:  # stop the rest, then raise the first
                errors.append(err)
        self.members.clear()
        self.switch = self.plane = None
        if errors:
            raise errors[0]
