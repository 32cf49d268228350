"""A host of the test's own: a network namespace with one address, reached from here over
a veth, for a process that must look like a pod to the API server (the Endpoints
controller refuses loopback pod IPs) without giving the host an address beyond a /30 to
it. Test traffic then goes to 127.0.0.0/8 or to this namespace, which the run created.

    with netns_host(tmp_path) as host:
        subprocess.Popen([*host.enter, "python", "-m", "..."])   # listens on host.ip
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fabric_operator.localcluster import nsutil
from fabric_operator.localcluster.network import holder, host_routes, wait_ns


@dataclass(frozen=True)
class TestHost:
    ip: str
    pid: int  # the namespace's holder

    @property
    def enter(self) -> list[str]:
        """The command prefix that runs a program in this host's network namespace."""
        return nsutil.enter(self.pid)


@contextlib.contextmanager
def netns_host(workdir: Path) -> Iterator[TestHost]:
    if os.geteuid() != 0:
        pytest.skip("a test host needs root (a network namespace and a veth)")
    # A /30 of 10.250.255.0/24 (the local clusters use 10.250.0-7.0/24), by process id.
    net = ipaddress.IPv4Network(f"10.250.255.{(os.getpid() % 64) * 4}/30")
    if any(r.overlaps(net) for r in host_routes()):
        pytest.fail(f"{net} is routed on this host already: another run's test host?")
    mine, theirs = (str(a) for a in net.hosts())
    link = f"fabt{os.getpid() % 100000}"
    proc = holder(["--net"], workdir / f"testhost-{link}.log")
    try:
        wait_ns(proc.pid)
        veth = ["ip", "link", "add", link, "type", "veth", "peer", "name", "eth0"]
        nsutil.run([*veth, "netns", str(proc.pid)])
        nsutil.run(["ip", "addr", "add", f"{mine}/30", "dev", link])
        nsutil.run(["ip", "link", "set", link, "up"])
        inside = nsutil.enter(proc.pid)
        nsutil.run([*inside, "ip", "addr", "add", f"{theirs}/30", "dev", "eth0"])
        nsutil.run([*inside, "ip", "link", "set", "eth0", "up"])
        nsutil.run([*inside, "ip", "link", "set", "lo", "up"])
        yield TestHost(theirs, proc.pid)
    finally:
        nsutil.stop(proc, grace=0)
        nsutil.run(["ip", "link", "del", link], check=False)
