"""A kubelet stand-in for simulated nodes (what kwok does), running in a thread.

It marks scheduled pods Running and Ready, completes deletions a kubelet would confirm,
and on request makes a backend's pods fail the way a real node would report it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

from kubernetes.client.exceptions import ApiException

from tests.support.kube import Cluster, _now

MANAGED = "app.kubernetes.io/managed-by=fabric-operator"


def _status(pod: Any, mode: str) -> dict[str, Any]:
    containers = [c.name for c in pod.spec.containers]
    ready = mode == "run"
    conditions = [
        {"type": t, "status": "True", "lastTransitionTime": _now()}
        for t in ("PodScheduled", "Initialized")
    ]
    conditions += [
        {"type": t, "status": "True" if ready else "False", "lastTransitionTime": _now()}
        for t in ("ContainersReady", "Ready")
    ]
    running = {"running": {"startedAt": _now()}}
    states: dict[str, dict[str, Any]] = {
        "run": {"state": running, "ready": True, "restartCount": 0},
        "loading": {"state": running, "ready": False, "restartCount": 0},
        "crash": {
            "state": {
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": "back-off 40s restarting failed container",
                }
            },
            "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}},
            "ready": False,
            "restartCount": 3,
        },
        "image": {
            "state": {
                "waiting": {
                    "reason": "ImagePullBackOff",
                    "message": 'Back-off pulling image "nope:0"',
                }
            },
            "ready": False,
            "restartCount": 0,
        },
    }
    phase = "Pending" if mode == "image" else "Running"
    return {
        "phase": phase,
        "conditions": conditions,
        "containerStatuses": [
            {"name": c, "image": "sim", "imageID": "sim", **states[mode]} for c in containers
        ],
    }


class NodeSimulator:
    """Runs until stop(); `fail[backend] = mode` makes that backend's pods report `mode`
    ("crash", "image", "loading"); the default is to run and become Ready."""

    def __init__(self, cluster: Cluster, interval: float = 0.2, ready_after: float = 0.0) -> None:
        self.cluster, self.interval = cluster, interval
        # A model takes time to load: pods report "loading" this long after they are
        # first seen on a node, then Ready.
        self.ready_after = ready_after
        self._seen: dict[str, float] = {}
        self.fail: dict[str, str] = {}
        self._applied: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-simulator", daemon=True)

    def start(self) -> NodeSimulator:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(ApiException):
                self._tick()
            self._stop.wait(self.interval)

    def _tick(self) -> None:
        pods = self.cluster.core.list_pod_for_all_namespaces(label_selector=MANAGED).items
        for pod in pods:
            meta = pod.metadata
            if not pod.spec.node_name:
                continue
            if meta.deletion_timestamp:  # the kubelet confirms the container is gone
                with contextlib.suppress(ApiException):
                    self.cluster.core.delete_namespaced_pod(
                        meta.name, meta.namespace, grace_period_seconds=0
                    )
                continue
            seen = self._seen.setdefault(meta.uid, time.monotonic())
            loaded = time.monotonic() - seen >= self.ready_after
            default = "run" if loaded else "loading"
            mode = self.fail.get(meta.labels.get("llm.fabric.dev/backend", ""), default)
            if self._applied.get(meta.uid) == mode:
                continue
            self.cluster.core.patch_namespaced_pod_status(
                meta.name, meta.namespace, {"status": _status(pod, mode)}
            )
            self._applied[meta.uid] = mode


def wait_until(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False
