"""Where the gateway replicas serve their load: Ready pods of the gateway namespace only.

The gateway's labels are no proof of anything: any team may label a pod of its own
`app.kubernetes.io/name=fabric-gateway` and, if it were listened to, feed made-up demand
(scaling other teams' GPU backends up, or holding them up at zero cost to itself). So
pods are listed and watched in the configured gateway namespace only (the request
itself is namespaced, and each pod's namespace is checked again), never cluster-wide.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fabric_operator.autoscaler.signal import Signal

if TYPE_CHECKING:  # imported when first needed: httpx stays out of an idle operator
    from fabric_operator.autoscaler.streams import Streams
    from fabric_operator.gateway.kubewatch import ApiClient

# What the chart's gateway Deployment puts on its pods (templates/gateway.yaml).
GATEWAY_LABELS = {
    "app.kubernetes.io/name": "fabric-gateway",
    "app.kubernetes.io/component": "gateway",
}
PORT_NAME = "metrics"
LOAD_PATH = "/load"


def selector() -> str:
    return ",".join(f"{k}={v}" for k, v in GATEWAY_LABELS.items())


def _ready(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    if status.get("phase") != "Running":
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def load_url(pod: dict[str, Any], namespace: str) -> str | None:
    """The /load URL of a gateway pod, or None: not in `namespace`, not labelled as the
    gateway, being deleted, not Ready, no IP, or no container port named `metrics`."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    if meta.get("namespace") != namespace or meta.get("deletionTimestamp"):
        return None
    if any(labels.get(k) != v for k, v in GATEWAY_LABELS.items()) or not _ready(pod):
        return None
    try:
        ip = ipaddress.ip_address(str((pod.get("status") or {}).get("podIP") or ""))
    except ValueError:
        return None
    ports = [
        p.get("containerPort")
        for c in (pod.get("spec") or {}).get("containers") or []
        for p in c.get("ports") or []
        if p.get("name") == PORT_NAME
    ]
    port = ports[0] if ports else None
    if not isinstance(port, int) or not 0 < port < 65536:
        return None
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    return f"http://{host}:{port}{LOAD_PATH}"


class GatewayPods:
    """The gateway pods of one namespace, kept current by a list and watch; `on_change`
    gets the set of their /load URLs after every change."""

    def __init__(
        self, api: ApiClient, namespace: str, on_change: Callable[[set[str]], None]
    ) -> None:
        from fabric_operator.gateway.kubewatch import Resource, Watch  # noqa: PLC0415

        self.namespace = namespace
        self._on_change = on_change
        resource = Resource("v1", "pods", label_selector=selector())
        self.watch: Watch[str | None] = Watch(
            api, resource, namespace, self._changed, lambda pod: load_url(pod, namespace)
        )

    def urls(self) -> set[str]:
        return {url for url in self.watch.objects.values() if url}

    def _changed(self) -> None:
        self._on_change(self.urls())

    async def run(self) -> None:
        await self.watch.run()


class Gateways:
    """Where the load comes from: fixed URLs (`--gateway-load-url`), else the gateway pods
    of `namespace`. Runs only between `start` and `stop`: an operator with no autoscaled
    backend lists no pods and opens no stream."""

    def __init__(
        self,
        signal: Signal,
        *,
        urls: list[str] | None = None,
        namespace: str = "default",
        kubeconfig: str | None = None,
    ) -> None:
        self.signal, self.static = signal, list(urls or [])
        self.namespace, self.kubeconfig = namespace, kubeconfig
        self.streams: Streams | None = None
        self._api: ApiClient | None = None
        self._watching: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self.streams is not None

    def describe(self) -> str:
        if self.static:
            return f"gateway load from {', '.join(self.static)}"
        return f"gateway load from the pods labelled {selector()} in namespace {self.namespace}"

    async def start(self) -> None:
        from fabric_operator.autoscaler.streams import Streams  # noqa: PLC0415
        from fabric_operator.gateway.kubewatch import ApiClient  # noqa: PLC0415

        if self.streams is not None:
            return
        # The API client first: if it cannot be made (no kubeconfig), nothing is left
        # half started, and the next `start` tries again.
        api = None if self.static else ApiClient(self.kubeconfig)
        self.streams = Streams(self.signal)
        if api is None:
            self.streams.set_urls(self.static)
            return
        self._api = api
        pods = GatewayPods(api, self.namespace, self.streams.set_urls)
        self._watching = asyncio.create_task(pods.run())

    async def stop(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watching
            self._watching = None
        if self.streams is not None:
            await self.streams.close()
            self.streams = None
        if self._api is not None:
            await self._api.close()
            self._api = None
