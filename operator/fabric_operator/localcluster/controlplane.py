"""A real, local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
kube-scheduler) on 127.0.0.1, for development and tests on machines without Docker.

The binaries come from `hack/get-control-plane.sh` (envtest's, or Debian's build of
v1.20). Alone it has no kubelet: pods get scheduled onto Node objects but never run;
`localcluster.cluster.LocalCluster` adds real nodes. Processes are stopped by the PIDs
recorded at start, never by name.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from fabric_operator.localcluster import nsutil, pki

CONTROLLERS_OFF = [
    "nodeipam",
    "nodelifecycle",
    "cloud-node-lifecycle",
    "route",
    "service",
    "attachdetach",
    "persistentvolume-binder",
    "persistentvolume-expander",
    "pv-protection",
    "pvc-protection",
    "ttl",
    "bootstrapsigner",
    "tokencleaner",
    "csrapproving",
    "csrcleaner",
    "csrsigning",
]


REAL_NODE_CONTROLLERS = {
    "nodelifecycle",
    "persistentvolume-binder",
    "pv-protection",
    "pvc-protection",
}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _version(binary: Path) -> tuple[int, int]:
    out = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, check=True
    ).stdout
    major, minor = out.split()[-1].lstrip("v").split(".")[:2]
    return int(major), int(minor.rstrip("+"))


@dataclass
class LocalControlPlane:
    """Start with `start()`, stop with `stop()`; `kubeconfig` is the admin's."""

    workdir: Path
    bin_dir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    apiserver_port: int = 0
    # The API server's command line, kept to restart it alone (fault-injection tests).
    apiserver_args: list[str] = field(default_factory=list)
    # What real nodes need: the address the `kubernetes` Service points at (reachable from
    # the nodes, not loopback), more names for the serving certificate, and the node
    # lifecycle controller (it lifts the not-ready taint a kubelet registers with) and the
    # volume binder (REAL_NODE_CONTROLLERS).
    advertise_address: str = "127.0.0.1"
    extra_ips: list[str] = field(default_factory=list)
    service_cidr: str = "10.0.0.0/16"  # room for benchmarks (>254 Services)
    node_lifecycle: bool = False

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    def _certs(self) -> None:
        d = self.workdir / "pki"
        pki.make_ca(d)
        sans = [
            "IP:127.0.0.1",
            f"IP:{self.service_ip}",
            *(f"IP:{ip}" for ip in self.extra_ips),
            "DNS:localhost",
            "DNS:kubernetes",
            "DNS:kubernetes.default",
            "DNS:kubernetes.default.svc",
            "DNS:kubernetes.default.svc.cluster.local",
        ]
        pki.issue(d, "apiserver", "/CN=kube-apiserver", sans)
        pki.issue(d, "admin", "/O=system:masters/CN=fabric-admin")
        # The API server's identity towards kubelets (logs, exec, port-forward).
        pki.issue(d, "apiserver-kubelet", "/O=system:masters/CN=kube-apiserver-kubelet-client")
        pki.service_account_keys(d)

    @property
    def service_ip(self) -> str:
        """The `kubernetes` Service's ClusterIP: the first address of the service range."""
        return str(next(ipaddress.ip_network(self.service_cidr).hosts()))

    def issue(self, name: str, subject: str) -> tuple[Path, Path]:
        """A client certificate signed by this cluster's CA (a node's kubelet, ...)."""
        return pki.issue(self.workdir / "pki", name, subject)

    @property
    def ca(self) -> Path:
        return self.workdir / "pki" / "ca.crt"

    def _write_kubeconfig(self) -> None:
        d = self.workdir / "pki"
        self.kubeconfig.write_text(
            pki.kubeconfig(self.server, d / "ca.crt", d / "admin.crt", d / "admin.key")
        )

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - kept open by the child
        proc = subprocess.Popen(
            # A killed test run or `make run` leaves no control plane running behind it.
            nsutil.dies_with_parent(args),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes[name] = proc
        with open(self.workdir / "pids", "a") as pids:
            pids.write(f"{name} {proc.pid}\n")

    def _wait(self, what: str, check: object, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")
            with contextlib.suppress(OSError):
                if check():  # type: ignore[operator]
                    return
            time.sleep(0.2)
        raise TimeoutError(f"{what} not ready after {timeout:.0f}s (logs in {self.workdir})")

    def _apiserver_ready(self) -> bool:
        d = self.workdir / "pki"
        ctx = ssl.create_default_context(cafile=str(d / "ca.crt"))
        ctx.load_cert_chain(str(d / "admin.crt"), str(d / "admin.key"))
        with urllib.request.urlopen(f"{self.server}/readyz", context=ctx, timeout=2) as r:
            return bool(r.status == 200)

    def start(self, timeout: float = 90.0, *, controllers: bool = True) -> LocalControlPlane:
        """Start etcd and the API server, plus controller-manager and scheduler unless
        `controllers` is False (benchmarks measure the operator, not them)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.workdir / "etcd", ignore_errors=True)  # new CA, new cluster
        (self.workdir / "pids").write_text("")
        self._certs()
        etcd_port, peer_port = free_port(), free_port()
        self.apiserver_port = free_port()
        self._spawn(
            "etcd",
            [
                str(self.bin_dir / "etcd"),
                "--data-dir",
                str(self.workdir / "etcd"),
                "--listen-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-cluster",
                f"default=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
            ],
        )
        d = self.workdir / "pki"
        apiserver = self.bin_dir / "kube-apiserver"
        legacy = _version(apiserver) < (1, 24)
        self.apiserver_args = [
            str(apiserver),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1",
            f"--advertise-address={self.advertise_address}",
            f"--secure-port={self.apiserver_port}",
            *(["--insecure-port=0"] if legacy else []),
            f"--tls-cert-file={d / 'apiserver.crt'}",
            f"--tls-private-key-file={d / 'apiserver.key'}",
            f"--client-ca-file={d / 'ca.crt'}",
            f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-cluster-ip-range={self.service_cidr}",
            f"--kubelet-client-certificate={d / 'apiserver-kubelet.crt'}",
            f"--kubelet-client-key={d / 'apiserver-kubelet.key'}",
            # No DNS for node names here: dial the address the kubelet reported.
            "--kubelet-preferred-address-types=InternalIP",
            "--authorization-mode=Node,RBAC",
            "--allow-privileged=true",
            "--profiling=false",
        ]
        self._spawn("kube-apiserver", self.apiserver_args)
        self._write_kubeconfig()
        self._wait("kube-apiserver", self._apiserver_ready, timeout)
        common = [f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--secure-port=0"]
        if legacy:
            common.append("--port=0")
        cm = self.bin_dir / "kube-controller-manager"
        if controllers and cm.exists():
            self._spawn(
                "kube-controller-manager",
                [
                    str(cm),
                    *common,
                    f"--controllers=*,{','.join('-' + c for c in self._controllers_off)}",
                    f"--service-account-private-key-file={d / 'sa.key'}",
                    f"--root-ca-file={d / 'ca.crt'}",
                    "--use-service-account-credentials=false",
                ],
            )
        scheduler = self.bin_dir / "kube-scheduler"
        if controllers and scheduler.exists():
            self._spawn("kube-scheduler", [str(scheduler), *common])
        return self

    @property
    def _controllers_off(self) -> list[str]:
        """With real nodes, also what pods on them need: node lifecycle, and claims bound to
        volumes (a PVC-backed model source)."""
        on = REAL_NODE_CONTROLLERS if self.node_lifecycle else set()
        return [c for c in CONTROLLERS_OFF if c not in on]

    def stop_apiserver(self, *, kill: bool = False, grace: float = 10.0) -> None:
        """Stop only the kube-apiserver, by its PID (etcd, controllers and scheduler keep
        running and retry): an API-server outage as clients see it, connections refused.
        `kill` sends SIGKILL at once (a crash) instead of a graceful SIGTERM."""
        proc = self.processes.pop("kube-apiserver", None)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def start_apiserver(self, timeout: float = 90.0) -> None:
        """Start the kube-apiserver again after `stop_apiserver`: same port, certificates
        and etcd, so every client's kubeconfig stays valid."""
        if not self.apiserver_args:
            raise RuntimeError("start() the control plane first")
        if "kube-apiserver" in self.processes:
            return
        self._spawn("kube-apiserver", self.apiserver_args)
        self._wait("kube-apiserver", self._apiserver_ready, timeout)

    @property
    def apiserver_running(self) -> bool:
        proc = self.processes.get("kube-apiserver")
        return proc is not None and proc.poll() is None

    @property
    def has_controller_manager(self) -> bool:
        return "kube-controller-manager" in self.processes

    def stop(self, grace: float = 10.0) -> None:
        """Stop every process this instance started, newest first, by PID."""
        for _name, proc in reversed(list(self.processes.items())):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.processes.clear()


def find_binaries(repo_root: Path) -> Path:
    """The folder with the control-plane binaries (runs hack/get-control-plane.sh)."""
    env_dir = os.environ.get("FABRIC_K8S_BIN")
    if env_dir:
        return Path(env_dir)
    script = repo_root / "hack" / "get-control-plane.sh"
    out = subprocess.run(["bash", str(script)], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])
