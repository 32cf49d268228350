"""Conflicts: other clients write the children and the LLMBackend (spec and status) in
tight read-modify-write loops, with resourceVersion, so that they meet 409s; the operator
keeps up and ends with everything as the last spec says.

The operator's own writes cannot meet a 409 from such clients: children are created once,
then server-side applied with force (field conflicts are taken over, no resourceVersion is
sent), and status is a merge patch. So a second test puts a fault-injecting proxy between
the operator and the API server, which answers a share of the operator's writes with 409
(and 500, 503, 429): the operator must retry with backoff and converge.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from fabric_operator.api.v1alpha1 import GROUP, PLURAL, VERSION
from fabric_operator.localcluster import LocalControlPlane
from tests.support.faults import (
    FaultProxy,
    assert_alive,
    check_converged,
    cpu_spec,
    create,
    replace_spec,
    say,
    tracebacks,
    wait_converged,
)
from tests.support.fixtures import OperatorProcess
from tests.support.kube import Cluster, wait_for

pytestmark = pytest.mark.integration

SECONDS = 8.0
FAULT_SECONDS = 20.0
FOREIGN = "other.example.com/counter"


class Writer(threading.Thread):
    """Runs `step(i)` in a loop for `seconds`, counting successes and API errors."""

    def __init__(self, name: str, step: Callable[[int], None], seconds: float) -> None:
        super().__init__(name=name, daemon=True)
        self.step, self.seconds = step, seconds
        self.outcomes: Counter[str] = Counter()
        self.error: BaseException | None = None

    def run(self) -> None:
        deadline = time.monotonic() + self.seconds
        i = 0
        try:
            while time.monotonic() < deadline:
                i += 1
                try:
                    self.step(i)
                    self.outcomes["ok"] += 1
                except ApiException as err:
                    self.outcomes[str(err.status)] += 1
                    if err.status not in (409,):
                        raise
        except BaseException as err:
            self.error = err


def test_concurrent_writers_get_conflicts_operator_ends_right(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    ns, name = namespace, "contended"
    create(cluster, ns, name, cpu_spec(replicas=1, engineOptions={"contextLength": 1000}))
    first, _ = wait_converged(cluster, ns, 15)
    assert first.ok, first.summary()
    last_context = [1000]

    def edit_child(i: int) -> None:
        # A controller that owns an annotation and, every other time, fights over fields
        # the operator owns: replicas and the engine image.
        dep = cluster.apps.read_namespaced_deployment(name, ns)
        dep.metadata.annotations = {**(dep.metadata.annotations or {}), FOREIGN: str(i)}
        if i % 2:
            dep.spec.replicas = 7
            dep.spec.template.spec.containers[0].image = f"evil/engine:{i}"
        cluster.apps.replace_namespaced_deployment(name, ns, dep)

    def edit_spec(i: int) -> None:
        obj: dict[str, Any] = cluster.custom.get_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, name
        )
        context = 1000 + i
        obj["spec"]["engineOptions"] = {"contextLength": context}
        obj["metadata"].setdefault("annotations", {})["other.example.com/n"] = str(i)
        cluster.custom.replace_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name, obj)
        last_context[0] = context

    def edit_status(i: int) -> None:
        obj: dict[str, Any] = cluster.custom.get_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, name
        )
        obj["status"] = {**(obj.get("status") or {}), "phase": "Ready", "readyReplicas": 99}
        cluster.custom.replace_namespaced_custom_object_status(
            GROUP, VERSION, ns, PLURAL, name, obj
        )

    errors_before = operator.metric("fabric_operator_reconcile_errors_total")
    writers = [
        Writer("child-editor", edit_child, SECONDS),
        Writer("spec-editor", edit_spec, SECONDS),
        Writer("status-editor", edit_status, SECONDS),
    ]
    say(
        "INJECTED for %.0fs: 3 clients in read-modify-write loops with resourceVersion: "
        "Deployment (annotation %s; replicas=7 and image every other write), LLMBackend spec "
        "(contextLength 1000+i), LLMBackend status (phase Ready, readyReplicas 99)",
        SECONDS,
        FOREIGN,
    )
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=SECONDS + 30)
    for w in writers:
        say("SAW %s: %s", w.name, dict(w.outcomes))
        assert w.error is None, f"{w.name}: {w.error!r}"
    conflicts = sum(w.outcomes["409"] for w in writers)
    assert conflicts > 0, "the writers never raced the operator or each other"

    report, took = wait_converged(cluster, ns, 20)
    say("SAW after the writers stopped: converged in %.1fs: %s", took, report.summary())
    assert report.ok, report.summary()
    obj = cluster.backend(ns, name)
    dep = cluster.deployment(ns, name)
    assert dep is not None
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--ctx-size") + 1] == str(last_context[0])
    assert dep["spec"]["replicas"] == 1
    assert not dep["spec"]["template"]["spec"]["containers"][0]["image"].startswith("evil/")
    # The operator owns its fields only: the other controller's annotation stays.
    assert FOREIGN in dep["metadata"]["annotations"]
    # The status is the operator's again, not the other writer's.
    wait_for(
        "the operator's own status",
        lambda: (cluster.backend(ns, name).get("status") or {}).get("readyReplicas") == 0,
        10,
    )
    errors = operator.metric("fabric_operator_reconcile_errors_total") - errors_before
    conflict_lines = [
        line for line in operator.logs().splitlines() if "409" in line or "Conflict" in line
    ]
    say(
        "SAW the operator: generation %s observed, %d failed reconciles, %d log lines with "
        "409/Conflict, requests %s",
        obj["metadata"]["generation"],
        errors,
        len(conflict_lines),
        {k.split("{")[1].rstrip("}"): v for k, v in operator.api_requests().items()},
    )
    assert check_converged(cluster, ns).ok
    assert_alive(operator)


def operator_writes(method: str, path: str) -> bool:
    """The operator's writes: applies of children, status patches, Events."""
    path = path.split("?", 1)[0]
    return (method == "PATCH" and re.search(r"/(deployments|services)/[^/]+$|/status$", path)) or (
        method == "POST" and path.endswith("/events")
    )


RETRY = re.compile(r"reconcile (\S+) failed \(retry in ([\d.]+)s\): \S+: (.{0,60})")


def test_operator_retries_injected_conflicts_with_backoff(
    cluster: Cluster, plane: LocalControlPlane, namespace: str, tmp_path: Path
) -> None:
    """A proxy between the operator and the API server answers 25% of the operator's writes
    itself with 409 Conflict (mostly), 500, 503 or 429 for FAULT_SECONDS: every failed
    reconcile is retried with a growing delay; once the faults stop, everything converges
    within the longest delay reached (at most ~32 s after 20 s of faults)."""
    proxy = FaultProxy(
        plane,
        tmp_path / "proxy",
        share=0.25,
        statuses=[409, 409, 409, 500, 503, 429],
        inject=lambda m, p: bool(operator_writes(m, p)),
        seed=3,
    ).start()
    op = OperatorProcess(proxy.kubeconfig(), tmp_path, f"--namespace={namespace}")
    try:
        op.start()
        started = time.monotonic()
        names = [f"retry-{i:02d}" for i in range(20)]
        for name in names:
            create(cluster, namespace, name, cpu_spec(engineOptions={"contextLength": 1024}))
        time.sleep(3)
        for name in names[::2]:
            replace_spec(cluster, namespace, name, cpu_spec(engineOptions={"contextLength": 4096}))
        say(
            "INJECTED through a proxy for %.0fs: 25%% of the operator's PATCH/POST answered "
            "409/500/503/429; 20 LLMBackends created, 10 then changed",
            FAULT_SECONDS,
        )
        time.sleep(max(0.0, FAULT_SECONDS - (time.monotonic() - started)))
        proxy.share = 0.0
        injected = dict(proxy.injected)
        say("INJECTED %s; faults stopped", injected)
        report, took = wait_converged(cluster, namespace, 120)
        retries = [m.groups() for m in RETRY.finditer(op.logs())]
        delays: dict[str, list[float]] = {}
        for key, delay, _ in retries:
            delays.setdefault(key, []).append(float(delay))
        longest = max(delays.values(), key=len, default=[])
        say(
            "SAW converged %.1fs after the faults stopped (%s); forwarded %s; %d failed "
            "reconciles retried, delays seen %s, longest run %s; messages e.g. %s",
            took,
            report.summary(),
            dict(proxy.forwarded),
            len(retries),
            dict(Counter(d for ds in delays.values() for d in ds)),
            longest,
            sorted({m for _, _, m in retries})[:4],
        )
        assert report.ok, report.summary()
        assert injected, "nothing was injected"
        assert retries, "the operator never retried"
        assert any(d > 0.5 for ds in delays.values() for d in ds), "no backoff growth"
        assert_alive(op)
        assert not tracebacks(op)
    finally:
        op.stop()
        proxy.stop()
