"""The controller's own loops: a stop waits for the reconciles its cancelled workers left
running in threads (the Lease is released only once nothing of this replica writes any
more); a v1.20 API server is answered with how to label the gateway's namespace."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import cast

import pytest

from fabric_operator.config import OperatorConfig
from fabric_operator.controller.reconciler import Reconciler, Settings, new_store
from fabric_operator.controller.runtime import Controller, before_namespace_labels


class _Kube:
    def ping(self) -> None:
        pass

    def request_counts(self) -> dict[str, int]:
        return {}


class SlowReconciler:
    """A reconcile that writes for as long as the test says."""

    kube = _Kube()

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.finished_at: float | None = None

    def reconcile(self, namespace: str, name: str) -> float | None:
        self.started.set()
        self.release.wait(10)
        self.finished_at = time.monotonic()
        return None


def run_stop(drain: float, hold: float) -> tuple[bool, float, SlowReconciler]:
    rec = SlowReconciler()

    async def scenario() -> tuple[bool, float]:
        ctl = Controller(cast(Reconciler, rec), new_store(), workers=1)
        await ctl.start()
        assert ctl.queue is not None
        ctl.queue.add(("n", "m"))
        await asyncio.to_thread(rec.started.wait, 5)
        threading.Timer(hold, rec.release.set).start()
        drained = await ctl.stop(drain_seconds=drain)
        assert drained is ctl.drained
        return drained, time.monotonic()

    drained, stopped_at = asyncio.run(scenario())
    rec.release.set()
    return drained, stopped_at, rec


def test_stop_returns_only_after_the_reconcile_in_flight() -> None:
    drained, stopped_at, rec = run_stop(drain=5.0, hold=0.3)
    assert drained and rec.finished_at is not None and rec.finished_at <= stopped_at


def test_a_reconcile_that_outlasts_the_drain_leaves_the_controller_undrained() -> None:
    drained, _, _ = run_stop(drain=0.1, hold=1.0)
    assert not drained  # the caller then keeps the Lease: it expires instead


@pytest.mark.parametrize(
    ("version", "before"),
    [
        ({"major": "1", "minor": "20"}, True),
        ({"major": "1", "minor": "20+"}, True),
        ({"major": "1", "minor": "21"}, False),
        ({"major": "1", "minor": "33"}, False),
        ({"major": "2", "minor": "0"}, False),
        ({}, False),
        (None, False),
    ],
)
def test_which_kubernetes_labels_namespaces_with_their_name(
    version: dict[str, str] | None, before: bool
) -> None:
    assert before_namespace_labels(version) is before


def test_a_120_api_server_is_told_once_how_to_label_the_gateway_namespace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Kube120(_Kube):
        def ping(self) -> dict[str, str]:  # type: ignore[override]
            return {"major": "1", "minor": "20", "gitVersion": "v1.20.2"}

    class Rec:
        kube = Kube120()
        settings = Settings(config=OperatorConfig(gatewayNamespace="fabric-system"))

    async def scenario() -> None:
        ctl = Controller(cast(Reconciler, Rec()), new_store(), workers=0)
        task = asyncio.create_task(ctl._watch_api_server())
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    [record] = [r for r in caplog.records if "kubernetes.io/metadata.name" in r.getMessage()]
    assert record.levelname == "WARNING"
    assert record.getMessage().endswith(
        "kubectl label namespace fabric-system kubernetes.io/metadata.name=fabric-system"
    )
