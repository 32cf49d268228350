"""The local cluster's network: an address plan, and a switch the nodes plug into.

    host (tests, kubectl, API server on 127.0.0.1)
      | fabN: 10.250.N.1/24, routes to the pod and service ranges via the nodes
    switch (a network namespace with a bridge)
      |-- node-0: eth0 10.250.N.10, pods 10.(200+N).0.0/24 on its own bridge
      |-- node-1: eth0 10.250.N.11, pods 10.(200+N).1.0/24 ...

N is a slot (0-7), held with a lock file for the cluster's life, so that clusters on one
machine (`make run` beside `make test`) never share addresses. The switch's and nodes'
namespaces belong to processes, not to `ip netns` names: when those processes die, the
kernel removes the namespaces, the bridge and every veth, and the host's routes with
them. No node has a default route: pods reach the cluster and nothing else.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fabric_operator.localcluster import nsutil

SLOTS = 8
LOCK_DIR = Path(os.environ.get("FABRIC_RUN_DIR", "/run/fabric-operator"))


@dataclass(frozen=True)
class Plan:
    """Every address of one cluster, from its slot."""

    slot: int

    @property
    def link(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"10.250.{self.slot}.0/24")

    @property
    def host_ip(self) -> str:
        return f"10.250.{self.slot}.1"

    def node_ip(self, index: int) -> str:
        return f"10.250.{self.slot}.{10 + index}"

    @property
    def cluster_cidr(self) -> str:
        return f"10.{200 + self.slot}.0.0/16"

    def pod_cidr(self, index: int) -> str:
        return f"10.{200 + self.slot}.{index}.0/24"

    @property
    def service_cidr(self) -> str:
        return f"10.{96 + self.slot}.0.0/16"

    @property
    def host_link(self) -> str:
        return f"fab{self.slot}"

    def ranges(self) -> list[ipaddress.IPv4Network]:
        return [
            self.link,
            ipaddress.IPv4Network(self.cluster_cidr),
            ipaddress.IPv4Network(self.service_cidr),
        ]


def host_routes() -> list[ipaddress.IPv4Network]:
    """The destinations the host already routes (all tables), default routes aside."""
    out = nsutil.run(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout
    nets = []
    for route in json.loads(out or "[]"):
        dst = route.get("dst", "default")
        if dst == "default":
            continue
        try:
            nets.append(ipaddress.IPv4Network(dst, strict=False))
        except ValueError:
            continue
    return nets


class SlotLock:
    """An exclusive slot, held by an open file's lock until `release` (or process exit)."""

    def __init__(self) -> None:
        self._file: IO[str] | None = None
        self.plan: Plan | None = None

    def acquire(self) -> Plan:
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        taken = host_routes()
        for slot in range(SLOTS):
            plan = Plan(slot)
            clash = [r for r in taken for mine in plan.ranges() if r.overlaps(mine)]
            if clash:
                continue  # the host (or another cluster) uses these addresses
            f = open(LOCK_DIR / f"slot-{slot}.lock", "w")  # noqa: SIM115 - held open
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            f.write(f"{os.getpid()}\n")
            f.flush()
            self._file, self.plan = f, plan
            return plan
        raise RuntimeError(
            f"no free network slot for a local cluster: all {SLOTS} are in use or their "
            f"addresses ({Plan(0).link}..., 10.200-207.0.0/16, 10.96-103.0.0/16) overlap "
            "the host's routes"
        )

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def holder(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """A process that owns new namespaces (`unshare` flags in `args`) and reaps orphans
    until killed; everything inside dies with it."""
    init = (
        "import os, time\n"
        "while True:\n"
        "    try:\n"
        "        os.wait()\n"
        "    except ChildProcessError:\n"
        "        time.sleep(0.5)\n"
    )
    return nsutil.spawn(["unshare", *args, "--", sys.executable, "-c", init], log)


class Switch:
    """A bridge in a namespace of its own, with the host's uplink: the nodes' L2 segment."""

    def __init__(self, plan: Plan, workdir: Path) -> None:
        self.plan, self.workdir = plan, workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _in(self, *args: str) -> None:
        nsutil.run([*nsutil.enter(self.pid), *args])

    def start(self) -> Switch:
        self.proc = holder(["--net"], self.workdir / "switch.log")
        wait_ns(self.pid)
        plan = self.plan
        self._in("ip", "link", "add", "br0", "type", "bridge")
        self._in("ip", "link", "set", "br0", "up")
        # The host's end of the uplink stays on the host; it goes when the switch does.
        veth = ["ip", "link", "add", plan.host_link, "type", "veth"]
        nsutil.run([*veth, "peer", "name", "uplink", "netns", str(self.pid)])
        self._in("ip", "link", "set", "uplink", "master", "br0", "up")
        # The host may open connections into the cluster (the API server to kubelets, the
        # tests to pods), never the other way: only answers go out through the uplink.
        self._in("sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1")
        out = ["FORWARD", "-m", "physdev", "--physdev-is-bridged", "--physdev-out", "uplink"]
        answers = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]
        self._in("iptables", "-A", *out, *answers)
        self._in("iptables", "-A", *out, "-j", "DROP")
        nsutil.run(["ip", "addr", "add", f"{plan.host_ip}/24", "dev", plan.host_link])
        nsutil.run(["ip", "link", "set", plan.host_link, "up"])
        return self

    def plug(self, index: int, node_pid: int) -> None:
        """A veth from the bridge to node `index`'s namespace (named eth0 there)."""
        port = f"n{index}"
        self._in("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0")
        self._in("ip", "link", "set", "eth0", "netns", str(node_pid))
        self._in("ip", "link", "set", port, "master", "br0", "up")

    def route(self, cidr: str, via: str) -> None:
        """A host route into the cluster (pod and service ranges)."""
        nsutil.run(["ip", "route", "add", cidr, "via", via, "dev", self.plan.host_link])

    def stop(self) -> None:
        nsutil.stop(self.proc, grace=0)
        # Gone with the namespace, unless the holder was not the last to hold it.
        nsutil.run(["ip", "link", "del", self.plan.host_link], check=False)


def wait_ns(pid: int, timeout: float = 10.0) -> None:
    """Until `pid` runs in namespaces other than ours (unshare has done its work)."""
    import time  # noqa: PLC0415 - only here

    mine = os.readlink("/proc/self/ns/net")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.readlink(f"/proc/{pid}/ns/net") != mine:
                return
        except FileNotFoundError:
            raise RuntimeError(f"namespace holder {pid} exited") from None
        time.sleep(0.01)
    raise TimeoutError(f"namespace holder {pid} did not unshare in {timeout}s")
