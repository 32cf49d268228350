"""A real node of the local cluster: containerd, runc, CNI, a kubelet and kube-proxy.

Each node lives in namespaces of its own, made by one holder process (kind gets the same
from a container):
- network: `eth0` on the cluster's switch (10.250.N.10+i), pods on a CNI bridge inside,
  kube-proxy's iptables rules, and a forwarder socket that reaches the API server on the
  host's 127.0.0.1 (`forward.py`);
- mount: /run, /var/lib and /var/log are folders of the node's work dir, so containerd's
  state, the kubelet's volumes, pod logs and the pods' network namespace files never
  appear on the host; kernel tunables the kubelet would set machine-wide (panic on oops,
  memory overcommit) read as already set, so it leaves the host's alone;
- PID: the holder is its init. Killing it kills every process of the node (containerd,
  shims, containers, kubelet), and the kernel then drops its mounts and namespaces;
- cgroups: each hierarchy's root is, for the node, a folder of its own
  (`/sys/fs/cgroup/*/fabric-N-node-I`), removed when the node stops (cgroup folders are
  the one thing the kernel does not remove by itself).

Images come from OCI archives (`hack/get-images.sh`), imported into the node's containerd:
there is no registry. Pods use them with imagePullPolicy Never or IfNotPresent.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fabric_operator.localcluster import nsutil, pki
from fabric_operator.localcluster.controlplane import LocalControlPlane
from fabric_operator.localcluster.network import Plan, Switch, holder, wait_ns

CNI_BIN = Path("/usr/lib/cni")
PAUSE_IMAGE = "localhost/fabric-pause:3.9"
# What the kubelet writes to /proc/sys unless it reads these values there already
# (pkg/kubelet/cm/container_manager_linux.go setupKernelTunables).
KERNEL_TUNABLES = {
    "vm/overcommit_memory": "1",
    "vm/panic_on_oom": "0",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
    "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}
PRIVATE_DIRS = ("run", "var/lib", "var/log")


@dataclass(frozen=True)
class Image:
    """An OCI archive and the reference pods use for it."""

    ref: str
    archive: Path


@dataclass
class LocalNode:
    plane: LocalControlPlane
    plan: Plan
    index: int
    workdir: Path
    bin_dir: Path  # kubelet, kube-proxy
    labels: dict[str, str] = field(default_factory=dict)
    holder: subprocess.Popen[bytes] | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"node-{self.index}"

    @property
    def ip(self) -> str:
        return self.plan.node_ip(self.index)

    @property
    def pid(self) -> int:
        assert self.holder is not None, "start() the node first"
        return self.holder.pid

    @property
    def containerd_socket(self) -> Path:
        """Where the host reaches the node's containerd: the node's /run, through the
        holder's root (short: a socket path longer than 107 bytes cannot be dialled)."""
        return Path(f"/proc/{self.pid}/root/run/containerd/containerd.sock")

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A command in the node's network and mount namespaces."""
        return nsutil.run([*nsutil.enter(self.pid, mount=True), *args], check=check)

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return nsutil.run(
            ["ctr", f"--address={self.containerd_socket}", "--namespace=k8s.io", *args],
            check=check,
        )

    # ---- start ----------------------------------------------------------------------

    def start(self, switch: Switch, nodes: int, images: list[Image]) -> LocalNode:
        self.workdir = self.workdir.resolve()
        hidden = [d for d in PRIVATE_DIRS if self.workdir.is_relative_to(f"/{d}")]
        if hidden:
            raise ValueError(
                f"{self.workdir}: the node's own /{hidden[0]} would hide its work dir: "
                "choose a work dir elsewhere (e.g. under /tmp)"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        namespaces = ["--net", "--mount", "--propagation", "private", "--pid", "--fork"]
        self.holder = holder(
            [*namespaces, "--mount-proc", "--kill-child"], self.workdir / "holder.log"
        )
        wait_ns(self.pid)
        switch.plug(self.index, self.pid)
        self._network(nodes)
        self._filesystem()
        self._containerd()
        for image in images:
            self.load(image)
        self._forwarder()
        self._dns()
        self._kubelet()
        self._kube_proxy()
        switch.route(self.plan.pod_cidr(self.index), self.ip)
        return self

    def _network(self, nodes: int) -> None:
        plan, net = self.plan, nsutil.enter(self.pid)
        for cmd in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "addr", "add", f"{self.ip}/{plan.link.prefixlen}", "dev", "eth0"],
            ["ip", "link", "set", "eth0", "up"],
            ["sysctl", "-qw", "net.ipv4.ip_forward=1"],
            *(
                ["ip", "route", "add", plan.pod_cidr(j), "via", plan.node_ip(j)]
                for j in range(nodes)
                if j != self.index
            ),
        ):
            nsutil.run([*net, *cmd])

    @property
    def cgroup_dirs(self) -> list[Path]:
        """The node's cgroup folder in each hierarchy (the host's view)."""
        return [Path(m) / f"fabric-{self.plan.slot}-{self.name}" for m in cgroup_mounts()]

    def _filesystem(self) -> None:
        """The node's private /run, /var/lib, /var/log, cgroup roots, and the kernel
        tunables' stand-ins."""
        # First, whatever unshare's child has done yet: no mount of ours may reach the host.
        script = ["set -e", "mount --make-rprivate /"]
        remove_cgroups(self.cgroup_dirs)  # left by a run that was killed
        for mount, own in zip(cgroup_mounts(), self.cgroup_dirs, strict=True):
            own.mkdir()
            for inherited in ("cpuset.cpus", "cpuset.mems"):  # v1 cpuset starts empty
                if (own / inherited).exists():
                    (own / inherited).write_text((own.parent / inherited).read_text())
            # runc finds a container's cgroup by its host path (/proc/self/cgroup):
            # make that path lead to the node's root too, as kind's entrypoint does.
            (own / own.name).mkdir()
            script.append(f"mount --bind {own} {mount}")
            script.append(f"mount --bind {mount} {mount}/{own.name}")
        for d in PRIVATE_DIRS:
            (self.workdir / d).mkdir(parents=True, exist_ok=True)
            script.append(f"mount --bind {self.workdir / d} /{d}")
        fake = self.workdir / "sysctl"
        fake.mkdir(exist_ok=True)
        for key, value in KERNEL_TUNABLES.items():
            stand_in = fake / key.replace("/", ".")
            stand_in.write_text(value + "\n")
            script.append(f"mount --bind {stand_in} /proc/sys/{key}")
        self.run("sh", "-c", "\n".join(script))

    def _spawn(self, name: str, args: list[str]) -> None:
        log = self.workdir / f"{name}.log"
        enter = nsutil.enter(self.pid, mount=True, pid_ns=True)
        self.procs[name] = nsutil.spawn([*enter, *args], log)

    def _wait(self, what: str, check: object, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{self.name}: {name} exited ({proc.returncode}):\n{tail}")
            if check():  # type: ignore[operator]
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name}: {what} not ready after {timeout:.0f}s ({self.workdir})")

    def _containerd(self) -> None:
        netd = self.workdir / "cni" / "net.d"
        netd.mkdir(parents=True, exist_ok=True)
        (netd / "10-fabric.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "0.4.0",
                    "name": "fabric",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": "cni0",
                            "isGateway": True,
                            "ipMasq": False,
                            "hairpinMode": True,  # a pod reaching itself through a Service
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": self.plan.pod_cidr(self.index)}]],
                                "routes": [{"dst": "0.0.0.0/0"}],
                            },
                        },
                        {"type": "portmap", "capabilities": {"portMappings": True}},
                    ],
                },
                indent=1,
            )
        )
        config = self.workdir / "containerd.toml"
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config.write_text(f"""version = 2
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]
[plugins."io.containerd.internal.v1.opt"]
  path = "/var/lib/containerd/opt"  # not the host's /opt/containerd
[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  # runc may not lower the sandbox's oom_score_adj below containerd's own here
  restrict_oom_score_adj = true
  [{cri}.cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{netd}"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
""")
        self._spawn("containerd", ["containerd", f"--config={config}"])
        self._wait("containerd", lambda: self.ctr("version", check=False).returncode == 0)

    def load(self, image: Image) -> None:
        """Import an OCI archive; the pods find it under `image.ref`."""
        self.ctr("images", "import", "--all-platforms", str(image.archive))
        have = set(self.ctr("images", "list", "--quiet").stdout.split())
        if image.ref not in have:
            raise RuntimeError(
                f"{self.name}: {image.archive} imported, but no image {image.ref} "
                f"(have: {', '.join(sorted(have))})"
            )

    def _host_side(self, name: str, module: str, *args: str) -> None:
        """A helper of ours that runs on the host but listens in the node's network
        namespace (forward.py, dns.py); it prints `listening` once it does."""
        log = self.workdir / f"{name}.log"
        with open(log, "ab") as err:
            netns = f"--listen-netns=/proc/{self.pid}/ns/net"
            proc = subprocess.Popen(
                nsutil.dies_with_parent(
                    [sys.executable, "-m", f"fabric_operator.localcluster.{module}", netns, *args]
                ),
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.procs[name] = proc
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"listening":
            raise RuntimeError(f"{self.name}: {name} did not start: {log.read_text()}")

    def _forwarder(self) -> None:
        """The API server at 0.0.0.0:PORT of the node: for the kubelet, kube-proxy and,
        through the `kubernetes` Service, the pods."""
        port = self.plane.apiserver_port
        self._host_side(
            "forwarder", "forward", f"--listen=0.0.0.0:{port}", f"--connect=127.0.0.1:{port}"
        )

    def _dns(self) -> None:
        """Service names for the node's pods, answered at the node's address."""
        self._host_side(
            "dns", "dns", f"--listen={self.ip}:53", f"--kubeconfig={self.plane.kubeconfig}"
        )

    def _kubeconfig(self, name: str, subject: str) -> Path:
        cert, key = self.plane.issue(f"{self.name}-{name}", subject)
        path = self.workdir / f"{name}.kubeconfig"
        server = f"https://127.0.0.1:{self.plane.apiserver_port}"
        path.write_text(pki.kubeconfig(server, self.plane.ca, cert, key, user=name))
        return path

    def _kubelet(self) -> None:
        kubeconfig = self._kubeconfig("kubelet", f"/O=system:nodes/CN=system:node:{self.name}")
        # dnsPolicy Default: no name server at all; nothing leaves the cluster.
        resolv = self.workdir / "resolv.conf"
        resolv.write_text("# dnsPolicy Default: no name server here\n")
        config = self.workdir / "kubelet.yaml"
        config.write_text(
            json.dumps(
                {
                    "apiVersion": "kubelet.config.k8s.io/v1beta1",
                    "kind": "KubeletConfiguration",
                    "address": self.ip,
                    "readOnlyPort": 0,
                    "healthzBindAddress": "127.0.0.1",
                    "authentication": {
                        "anonymous": {"enabled": False},
                        "webhook": {"enabled": True},
                        "x509": {"clientCAFile": str(self.plane.ca)},
                    },
                    "authorization": {"mode": "Webhook"},
                    # No systemd, cgroups v1 and v2 side by side: the kubelet manages none.
                    "cgroupDriver": "cgroupfs",
                    "cgroupsPerQOS": False,
                    "enforceNodeAllocatable": [],
                    "failSwapOn": False,
                    "resolvConf": str(resolv),
                    "clusterDomain": "cluster.local",
                    "clusterDNS": [self.ip],  # dns.py: Service names only, no recursion
                    # Images cannot be pulled again here: never collect them; and no
                    # evictions for a disk that belongs to the whole machine.
                    "imageGCHighThresholdPercent": 100,
                    "imageGCLowThresholdPercent": 99,
                    "evictionHard": {
                        "nodefs.available": "0%",
                        "nodefs.inodesFree": "0%",
                        "imagefs.available": "0%",
                    },
                    "serializeImagePulls": False,
                    "volumePluginDir": "/var/lib/kubelet/volume-plugins",
                    "nodeStatusReportFrequency": "10s",
                },
                indent=1,
            )
        )
        labels = ",".join(f"{k}={v}" for k, v in self.labels.items())
        self._spawn(
            "kubelet",
            [
                str(self.bin_dir / "kubelet"),
                f"--config={config}",
                f"--kubeconfig={kubeconfig}",
                "--container-runtime=remote",
                "--container-runtime-endpoint=unix:///run/containerd/containerd.sock",
                f"--hostname-override={self.name}",
                f"--node-ip={self.ip}",
                *([f"--node-labels={labels}"] if labels else []),
                "--v=1",
            ],
        )

    def _kube_proxy(self) -> None:
        kubeconfig = self._kubeconfig("kube-proxy", "/CN=system:kube-proxy")
        self._spawn(
            "kube-proxy",
            [
                str(self.bin_dir / "kube-proxy"),
                f"--kubeconfig={kubeconfig}",
                f"--hostname-override={self.name}",
                f"--bind-address={self.ip}",
                f"--cluster-cidr={self.plan.cluster_cidr}",
                "--proxy-mode=iptables",
                # Conntrack limits are machine-wide: leave the host's alone.
                "--conntrack-max-per-core=0",
                "--conntrack-tcp-timeout-established=0",
                "--conntrack-tcp-timeout-close-wait=0",
                "--oom-score-adj=0",
                "--healthz-bind-address=127.0.0.1:10256",
                "--metrics-bind-address=127.0.0.1:10249",
            ],
        )

    def wait_ready(self, kubeconfig: Path, timeout: float) -> None:
        """Until the API server has this node Ready (its kubelet registered and reports)."""

        def ready() -> bool:
            expr = 'jsonpath={.status.conditions[?(@.type=="Ready")].status}'
            proc = subprocess.run(
                ["kubectl", f"--kubeconfig={kubeconfig}", "get", "node", self.name, "-o", expr],
                capture_output=True,
                text=True,
                check=False,
            )
            return proc.stdout.strip() == "True"

        self._wait("the node Ready", ready, timeout)

    # ---- stop -----------------------------------------------------------------------

    def stop(self) -> None:
        """Kill the node's init: the kernel kills the rest and drops its namespaces."""
        nsutil.stop(self.holder, grace=0)
        for proc in self.procs.values():
            nsutil.stop(proc, grace=5)
        self.procs.clear()
        if self.holder is not None:
            remove_cgroups(self.cgroup_dirs)
            # Images and containers' layers (hundreds of MB); the logs stay for reading.
            for d in ("var/lib", "run"):
                shutil.rmtree(self.workdir / d, ignore_errors=True)


def cgroup_mounts() -> list[str]:
    """Where the cgroup hierarchies are mounted (v1 controllers and v2 alike)."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        if fstype in ("cgroup", "cgroup2"):
            mounts.append(fields[4])
    return mounts


def remove_cgroups(dirs: list[Path], timeout: float = 10.0) -> None:
    """Remove cgroup folders, deepest first, once their last task has exited (a killed
    process leaves its cgroup busy until it is reaped)."""
    deadline = time.monotonic() + timeout
    for top in dirs:
        if not top.exists():
            continue
        for sub in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            _rmdir(sub, deadline)
        _rmdir(top, deadline)


def _rmdir(path: Path, deadline: float) -> None:
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
