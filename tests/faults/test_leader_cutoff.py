"""Leader election cut off: two operator replicas with --leader-elect; the leader reaches
the API server through the fault proxy, which then stops answering its Lease requests
while everything else still goes through (the partition that makes two leaders: a leader
that did not stop would go on writing beside the new one). A stream of new LLMBackends
gives the leader something to write all along.

Shown with the proxy's own log of the leader's requests and the Lease as the API server
has it: the old leader's last write comes before the follower's acquireTime, by the gap
between client-go's lease duration and renew deadline (15 s - 10 s). Figures printed."""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from fabric_operator.localcluster import LocalControlPlane
from tests.support.faults import (
    FaultProxy,
    Seen,
    cpu_spec,
    create,
    say,
    tracebacks,
    wait_converged,
)
from tests.support.fixtures import OperatorProcess
from tests.support.kube import Cluster, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def leading(op: OperatorProcess) -> bool:
    """Live, from /metrics (kopf caches /healthz for 10 s)."""
    return op.metric("fabric_operator_leading") == 1.0


def lease(cluster: Cluster, namespace: str) -> dict[str, Any]:
    out = cluster.kubectl("get", "lease", "fabric-operator", "-n", namespace, "-o", "json")
    obj: dict[str, Any] = json.loads(out.stdout)
    return obj


def micro_time(value: str) -> float:
    return datetime.strptime(value.replace("Z", "+0000"), "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()


def lease_writes(proxy: FaultProxy) -> list[float]:
    """When the Lease writes (its creation, its renewals) the proxy forwarded."""
    return [
        s.at for s in proxy.seen if s.write and "/leases" in s.path and s.outcome == "forwarded"
    ]


def other_writes(proxy: FaultProxy) -> list[Seen]:
    """The writes that are not about the Lease: children, status, Events."""
    return [s for s in proxy.seen if s.write and "/leases" not in s.path]


def wait_exit(op: OperatorProcess, timeout: float) -> float:
    """When the process exited (polled every 50 ms)."""
    assert op.proc is not None
    deadline = time.monotonic() + timeout
    while op.proc.poll() is None:
        assert time.monotonic() < deadline, "the process did not exit"
        time.sleep(0.05)
    return time.time()


def by_resource(writes: list[Seen]) -> dict[str, int]:
    """Requests counted by verb and resource (with /status)."""
    out: dict[str, int] = {}
    for s in writes:
        found = re.search(r"/namespaces/[^/]+/([^/?]+)(?:/[^/?]+)?(/status)?", s.path)
        key = f"{s.method} {''.join(found.groups('')) if found else s.path}"
        out[key] = out.get(key, 0) + 1
    return out


class Creator(threading.Thread):
    """Creates an LLMBackend every `every` seconds until stopped."""

    def __init__(self, cluster: Cluster, namespace: str, every: float = 0.5) -> None:
        super().__init__(name="creator", daemon=True)
        self.cluster, self.namespace, self.every = cluster, namespace, every
        self.created: list[str] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.every):
            name = f"w-{len(self.created):03d}"
            create(self.cluster, self.namespace, name, cpu_spec())
            self.created.append(name)

    def stop(self) -> None:
        self._halt.set()
        if self.ident is not None:
            self.join(timeout=30)


def test_a_leader_cut_off_stops_writing_before_the_follower_leads(
    cluster: Cluster, plane: LocalControlPlane, namespace: str, tmp_path: Path
) -> None:
    proxy = FaultProxy(plane, tmp_path / "proxy").start()
    flags = (
        "--leader-elect",
        f"--leader-election-namespace={namespace}",
        f"--namespace={namespace}",
    )
    for part in ("a", "b"):
        (tmp_path / part).mkdir()
    a = OperatorProcess(proxy.kubeconfig(), tmp_path / "a", *flags)
    b = OperatorProcess(cluster.kubeconfig, tmp_path / "b", *flags)
    creator = Creator(cluster, namespace)
    try:
        a.start()
        wait_for("a to lead", lambda: leading(a), 30)
        b.start()
        creator.start()

        wait_for("a to write children", lambda: len(other_writes(proxy)) >= 10, 30)
        wait_for("a to renew its Lease", lambda: len(lease_writes(proxy)) >= 2, 10)
        assert not leading(b)
        cut_at = time.time()
        proxy.partition(lambda method, path: "/leases" in path)
        say("INJECTED: a's Lease requests get no answer (everything else goes through)")

        exited = wait_exit(a, 30)
        wait_for("b to lead", lambda: leading(b), 30, interval=0.1)
        creator.stop()

        held = lease(cluster, namespace)["spec"]
        acquired = micro_time(held["acquireTime"])
        last_renewal = lease_writes(proxy)[-1]
        writes = other_writes(proxy)
        last_write = max(s.at for s in writes)
        after_cut = [s for s in writes if s.at > cut_at]
        say(
            "SAW (seconds after the cut): a's last Lease renewal %.2f, a's last write %.2f, "
            "a exited %.2f (code %s), b acquired the Lease %.2f (holder %s); a's last write "
            "came %.2fs before b led; a wrote %d times after the cut %s",
            last_renewal - cut_at,
            last_write - cut_at,
            exited - cut_at,
            a.proc.returncode if a.proc else None,
            acquired - cut_at,
            held["holderIdentity"],
            acquired - last_write,
            len(after_cut),
            by_resource(after_cut),
        )
        assert a.proc is not None and a.proc.returncode == 1
        assert "was not renewed within 10s" in a.logs()
        # a went on with its work after the cut (it still led) ...
        assert after_cut, "a wrote nothing after the cut: the test shows nothing"
        # ... and stopped at its renew deadline, counted from its last renewal ...
        assert exited - last_renewal <= 10.0 + 1.5
        # ... before b took over, which b may only do a lease duration after the renewal.
        assert last_write < acquired
        assert acquired - last_write >= 3.0
        assert acquired - last_renewal >= 15.0 - 0.5
        assert held["holderIdentity"].endswith(f"-{b.proc.pid}" if b.proc else "")

        # b completes what a left: every backend has its children and its status.
        result, took = wait_converged(cluster, namespace, 60)
        say("SAW b converge %d backends in %.1fs", result.backends, took)
        assert result.ok, result.summary()
        assert not tracebacks(b)
    finally:
        creator.stop()
        proxy.heal()
        a.stop()
        b.stop()
        proxy.stop()
