"""Leader election on a coordination.k8s.io Lease, as client-go's leaderelection does it.

Every replica watches and keeps its store warm; only the holder of the Lease reconciles.
A holder that cannot renew within the lease duration exits (its pod restarts as a
follower) rather than risk acting alongside a new leader. Expiry is judged by when this
replica last saw the Lease change, never by comparing clocks across machines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from fabric_operator.controller.kube import request, segment

log = logging.getLogger(__name__)


def _micro_time() -> str:
    """metav1.MicroTime, as Lease times are written."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        api_client: client.ApiClient,
        namespace: str,
        name: str = "fabric-operator",
        identity: str | None = None,
        *,
        lease_seconds: float = 15.0,
        renew_seconds: float = 2.0,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.api_client = api_client
        self.namespace, self.name = namespace, name
        self._leases = f"/apis/coordination.k8s.io/v1/namespaces/{segment(namespace)}/leases"
        self.identity = identity or f"{os.environ.get('HOSTNAME', 'local')}-{os.getpid()}"
        self.lease_seconds, self.renew_seconds = lease_seconds, renew_seconds
        self.leading = asyncio.Event()
        self.on_lost = on_lost or (lambda: os._exit(1))
        self._seen: tuple[str | None, float] = (None, 0.0)  # (resourceVersion, when seen)
        self._renewed = 0.0

    async def run(self) -> None:
        while True:
            try:
                held = await asyncio.to_thread(self._try)
            except (ApiException, OSError) as err:
                held = False
                log.warning("leader election: %s", getattr(err, "reason", None) or err)
            now = time.monotonic()
            if held:
                self._renewed = now
                if not self.leading.is_set():
                    log.info("leader election: %s leads", self.identity)
                    self.leading.set()
            elif self.leading.is_set() and now - self._renewed > self.lease_seconds:
                log.error("leader election: lease lost; exiting so only one replica acts")
                self.on_lost()
                return
            await asyncio.sleep(self.renew_seconds)

    def _lease(self, transitions: int, acquired: str | None) -> dict[str, Any]:
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": int(self.lease_seconds),
                "acquireTime": acquired or _micro_time(),
                "renewTime": _micro_time(),
                "leaseTransitions": transitions,
            },
        }

    def _try(self) -> bool:
        """One round: create, renew or take over the Lease. True while we hold it."""
        path = f"{self._leases}/{segment(self.name)}"
        try:
            lease = request(self.api_client, "GET", path)
        except ApiException as err:
            if err.status != 404:
                raise
            try:
                request(self.api_client, "POST", self._leases, body=self._lease(0, None))
            except ApiException as create_err:
                if create_err.status == 409:
                    return False  # another replica created it first
                raise
            return True
        spec = lease.get("spec") or {}
        version = lease["metadata"]["resourceVersion"]
        now = time.monotonic()
        if version != self._seen[0]:
            self._seen = (version, now)
        holder = spec.get("holderIdentity")
        mine = holder == self.identity
        expired = now - self._seen[1] > (spec.get("leaseDurationSeconds") or self.lease_seconds)
        if not (mine or expired or not holder):
            return False
        body = self._lease(
            (spec.get("leaseTransitions") or 0) + (0 if mine else 1),
            spec.get("acquireTime") if mine else None,
        )
        body["metadata"]["resourceVersion"] = version  # lose the race rather than share
        try:
            request(self.api_client, "PUT", path, body=body)
        except ApiException as err:
            if err.status == 409:
                return False
            raise
        if not mine:
            log.info("leader election: took over from %s", holder)
        return True
