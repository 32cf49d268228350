"""Leader election on a coordination.k8s.io Lease, with client-go's leaderelection semantics.

Every replica watches and keeps its store warm; only the holder of the Lease reconciles.
Three durations, client-go's defaults, in this order:

- `lease_seconds` (15): how long a follower waits, after it last saw the Lease change,
  before it takes the Lease over. Measured on the follower's own clock from when it saw
  the change, never by comparing clocks across machines.
- `renew_deadline` (10): how long the leader goes on without a successful renewal. Past
  it, the leader stops (the process exits, so that no reconcile in flight writes on):
  counted from the start of the last renewal that succeeded, which no follower can have
  seen earlier, so the leader has stopped `lease_seconds - renew_deadline` before any
  follower may take over.
- `retry_period` (2): how often the leader renews and a follower looks.

Each request of an attempt is bounded (`attempt_seconds`, well under the deadline) and is
not retried by the HTTP client, so that a request hung on a dead connection gives way to a
fresh one; and the deadline is enforced while an attempt is still waiting. On SIGTERM,
once the workers have stopped, `release` gives the Lease up (holder cleared, duration 1 s,
as client-go's ReleaseOnCancel does), so a follower takes over within one retry period
instead of a lease duration.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import os
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from fabric_operator.machinery.rest import api_message, request, segment

log = logging.getLogger(__name__)

LEASE_SECONDS = 15.0
RENEW_DEADLINE = 10.0
RETRY_PERIOD = 2.0
JITTER = 1.2  # client-go's JitterFactor: a follower looks every 2 s to 2 s * (1 + 1.2)


def _micro_time() -> str:
    """metav1.MicroTime, as Lease times are written."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def check_durations(lease_seconds: float, renew_deadline: float, retry_period: float) -> None:
    """client-go's own rules: a leader must give up before a follower may take over, and
    must get more than one try before it gives up."""
    if not lease_seconds > renew_deadline:
        raise ValueError("the lease duration must be longer than the renew deadline")
    if not renew_deadline > JITTER * retry_period:
        raise ValueError(f"the renew deadline must be longer than {JITTER} x the retry period")
    if retry_period <= 0 or lease_seconds < 1:
        raise ValueError("the retry period must be positive and the lease at least 1 s")


def leader_client(configuration: client.Configuration) -> client.ApiClient:
    """A client of its own for the Lease: no retries by urllib3 (a retry would wait
    another timeout, past the deadline), and a connection pool of its own (never queued
    behind the workers' requests)."""
    config = copy.deepcopy(configuration)
    config.retries = False
    config.connection_pool_maxsize = 2
    return client.ApiClient(config)


class LeaderElector:
    def __init__(
        self,
        api_client: client.ApiClient,
        namespace: str,
        name: str = "fabric-operator",
        identity: str | None = None,
        *,
        lease_seconds: float = LEASE_SECONDS,
        renew_deadline: float = RENEW_DEADLINE,
        retry_period: float = RETRY_PERIOD,
        on_lost: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_durations(lease_seconds, renew_deadline, retry_period)
        self.api_client = api_client
        self.namespace, self.name = namespace, name
        self._leases = f"/apis/coordination.k8s.io/v1/namespaces/{segment(namespace)}/leases"
        self.identity = identity or f"{os.environ.get('HOSTNAME', 'local')}-{os.getpid()}"
        self.lease_seconds, self.renew_deadline = lease_seconds, renew_deadline
        self.retry_period = retry_period
        # One request; an attempt is a GET and at most one write.
        self.attempt_seconds = max(0.5, renew_deadline / 4)
        self.leading = asyncio.Event()
        self.on_lost = on_lost or (lambda: os._exit(1))
        self.clock = clock
        self._seen: tuple[str | None, float] = (None, 0.0)  # (resourceVersion, when seen)
        self._deadline = 0.0  # while leading: when to stop without a renewal
        self._taken = False  # the last look found another holder

    async def run(self) -> None:
        """Acquire, then renew, until the renew deadline passes without a renewal: then
        `leading` is cleared, `on_lost` called (it exits the process) and run returns."""
        while True:
            leading = self.leading.is_set()
            if leading and self.clock() >= self._deadline:
                self._lose(f"the Lease was not renewed within {self.renew_deadline:.0f}s")
                return
            started = self.clock()
            budget = 2 * self.attempt_seconds
            if leading:
                budget = min(budget, self._deadline - started)
            try:
                held = await asyncio.wait_for(asyncio.to_thread(self._try), budget)
            except TimeoutError:
                held = False
                log.warning("leader election: no answer within %.1fs", budget)
            except Exception as err:  # any failure is one failed attempt
                held = False
                detail = api_message(err) if isinstance(err, ApiException) else str(err)
                log.warning("leader election: %s", detail[:300])
            if leading and not held and self._taken:
                self._lose("another replica holds the Lease")
                return
            if held:
                # From the start of the attempt: the renewal cannot have been seen earlier.
                self._deadline = started + self.renew_deadline
                if not leading:
                    log.info("leader election: %s leads", self.identity)
                    self.leading.set()
            elif leading and self.clock() >= self._deadline:
                self._lose(f"the Lease was not renewed within {self.renew_deadline:.0f}s")
                return
            delay = self.retry_period
            if leading:
                delay = min(delay, max(0.0, self._deadline - self.clock()))
            else:
                delay *= 1 + random.random() * JITTER
            await asyncio.sleep(delay)

    def _lose(self, why: str) -> None:
        self.leading.clear()
        log.error(
            "leader election: %s; stopping so that only one replica acts (a follower may "
            "take over %.0fs after the last renewal)",
            why,
            self.lease_seconds,
        )
        self.on_lost()

    def _lease(self, transitions: int, acquired: str | None) -> dict[str, Any]:
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                # Whole seconds in the API: rounded up, never shorter than the leader's.
                "leaseDurationSeconds": math.ceil(self.lease_seconds),
                "acquireTime": acquired or _micro_time(),
                "renewTime": _micro_time(),
                "leaseTransitions": transitions,
            },
        }

    def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        return request(
            self.api_client,
            method,
            path,
            body=body,
            timeout=(self.attempt_seconds, self.attempt_seconds),
        )

    def _try(self) -> bool:
        """One round: create, renew or take over the Lease. True while we hold it."""
        self._taken = False
        path = f"{self._leases}/{segment(self.name)}"
        try:
            lease = self._call("GET", path)
        except ApiException as err:
            if err.status != 404:
                raise
            try:
                self._call("POST", self._leases, body=self._lease(0, None))
            except ApiException as create_err:
                if create_err.status == 409:
                    return False  # another replica created it first
                raise
            return True
        spec = lease.get("spec") or {}
        version = lease["metadata"]["resourceVersion"]
        now = self.clock()
        if version != self._seen[0]:
            self._seen = (version, now)
        holder = spec.get("holderIdentity")
        mine = holder == self.identity
        transitions = int(spec.get("leaseTransitions") or 0)
        duration = spec.get("leaseDurationSeconds") or self.lease_seconds
        expired = now - self._seen[1] > duration
        self._taken = not (mine or expired or not holder)
        if self._taken:
            return False
        body = self._lease(
            transitions + (0 if mine else 1),
            spec.get("acquireTime") if mine else None,
        )
        body["metadata"]["resourceVersion"] = version  # lose the race rather than share
        try:
            self._call("PUT", path, body=body)
        except ApiException as err:
            if err.status == 409:
                return False
            raise
        if not mine:
            log.info("leader election: took over from %s", holder or "nobody")
        return True

    async def release(self) -> bool:
        """Give the Lease up (only if still ours, at the version read): holder cleared,
        duration 1 s, so that a follower takes over at its next look. Call it only once
        nothing of this replica writes any more. True if released."""
        if not self.leading.is_set():
            return False
        self.leading.clear()
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(self._release), 2 * self.attempt_seconds
            )
        except Exception as err:  # the Lease then expires as it would have
            detail = api_message(err) if isinstance(err, ApiException) else str(err)
            log.warning("leader election: could not release the Lease: %s", detail[:300])
            return False

    def _release(self) -> bool:
        path = f"{self._leases}/{segment(self.name)}"
        lease = self._call("GET", path)
        spec = lease.get("spec") or {}
        if spec.get("holderIdentity") != self.identity:
            return False
        stamp = _micro_time()
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "resourceVersion": lease["metadata"]["resourceVersion"],
            },
            "spec": {
                "holderIdentity": "",
                "leaseDurationSeconds": 1,
                "acquireTime": stamp,
                "renewTime": stamp,
                "leaseTransitions": int(spec.get("leaseTransitions") or 0),
            },
        }
        self._call("PUT", path, body=body)
        log.info("leader election: %s released the Lease", self.identity)
        return True
