"""Fault injection for tests/faults: a control plane whose API server can be stopped alone,
SIGKILL of the operator, a churn of LLMBackends, and a check that what runs in the cluster is
what the specs say, computed from the operator's pure rendering (never from its own diff).

Everything runs on loopback; every helper is bounded in time.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.client
import json
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import InvalidOperation
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from kubernetes.utils import parse_quantity

from fabric_operator.api.crd import crd_yaml_for_server, wait_established
from fabric_operator.api.v1alpha1 import GROUP, PLURAL, VERSION
from fabric_operator.localcluster import LocalControlPlane, find_binaries
from fabric_operator.render import render
from fabric_operator.validation import validate
from tests.conftest import REPO
from tests.support.fixtures import OperatorProcess
from tests.support.kube import Cluster, add_cpu_node, wait_for

MANAGED_BY = "app.kubernetes.io/managed-by"
BACKEND_LABEL = "llm.fabric.dev/backend"
JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"


def say(what: str, *args: Any) -> None:
    """What a test injected or saw: pytest shows it with -s and in failure reports."""
    text = what % args if args else what
    print(f"[faults {time.strftime('%H:%M:%S')}] {text}", flush=True)


# --- the cluster -------------------------------------------------------------------------


@contextlib.contextmanager
def fault_cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Cluster, LocalControlPlane | None]]:
    """Like tests.support.fixtures.local_cluster, but hands out the control plane too, so
    that a test can stop and start its kube-apiserver (None on FABRIC_TEST_KUBECONFIG)."""
    given = os.environ.get("FABRIC_TEST_KUBECONFIG")
    plane = None
    if given:
        kubeconfig = Path(given)
    else:
        plane = LocalControlPlane(tmp_path_factory.mktemp("faults-cluster"), find_binaries(REPO))
        plane.start()
        kubeconfig = plane.kubeconfig
    cluster = Cluster(
        kubeconfig,
        local=plane is not None,
        garbage_collector=plane is None or plane.has_controller_manager,
    )
    try:
        version = cluster.kubectl("version", "-o", "json").stdout
        cluster.kubectl("apply", "-f", "-", stdin=crd_yaml_for_server(version))
        wait_established(lambda *a: cluster.kubectl(*a).stdout)
        wait_for(
            "the default service account controller",
            lambda: cluster.core.list_namespaced_service_account("default").items,
            30,
        )
        if cluster.local:
            add_cpu_node(cluster)
        yield cluster, plane
    finally:
        if plane is not None:
            plane.stop()


def api_up(cluster: Cluster) -> bool:
    try:
        cluster.core.list_namespace(limit=1, _request_timeout=2)
    except Exception:  # connection refused, 503 while starting...
        return False
    return True


# --- the operator ------------------------------------------------------------------------


def sigkill(op: OperatorProcess) -> int:
    """SIGKILL the operator (no cleanup handlers run, as when a node dies); returns its pid."""
    assert op.proc is not None and op.proc.poll() is None, "the operator is not running"
    pid = op.proc.pid
    os.kill(pid, signal.SIGKILL)
    op.proc.wait(timeout=10)
    return pid


def operator_logs(op: OperatorProcess) -> str:
    """Every log the operator wrote, over all its (re)starts."""
    return "\n".join(
        p.read_text(errors="replace") for p in sorted(op.logdir.glob("operator-*.log"))
    )


def tracebacks(op: OperatorProcess) -> list[str]:
    logs = operator_logs(op)
    return [m.group(0)[:1500] for m in re.finditer(r"Traceback \(most recent call last\):.*", logs)]


class Killer(threading.Thread):
    """SIGKILLs the operator every `low`..`high` seconds and starts it again."""

    def __init__(self, op: OperatorProcess, rng: random.Random, low: float, high: float) -> None:
        super().__init__(name="operator-killer", daemon=True)
        self.op, self.rng, self.low, self.high = op, rng, low, high
        self.kills: list[tuple[float, int]] = []  # (seconds since start, pid)
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        try:
            while not self._halt.wait(self.rng.uniform(self.low, self.high)):
                pid = sigkill(self.op)
                self.kills.append((round(time.monotonic() - self._t0, 1), pid))
                self.op.start()
        except BaseException as err:  # reported by stop()
            self.error = err

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=60)
        if self.error is not None:
            raise AssertionError(f"the kill loop failed: {self.error!r}") from self.error
        assert self.op.proc is not None and self.op.proc.poll() is None


# --- LLMBackends -------------------------------------------------------------------------


def manifest(namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMBackend",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def cpu_spec(**extra: Any) -> dict[str, Any]:
    """A valid llama.cpp backend on CPU (no GPU node needed)."""
    return {
        "engine": "llamacpp",
        "model": {"url": "https://models.invalid/tiny.gguf"},
        "replicas": 0,
        **extra,
    }


def create(cluster: Cluster, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    obj: dict[str, Any] = cluster.custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, manifest(namespace, name, spec)
    )
    return obj


def replace_spec(cluster: Cluster, namespace: str, name: str, spec: dict[str, Any]) -> None:
    cluster.custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        name,
        [{"op": "replace", "path": "/spec", "value": spec}],
        _content_type=JSON_PATCH,
    )


def delete(cluster: Cluster, namespace: str, name: str) -> None:
    cluster.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def _items(resp: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(resp.data)["items"]
    return items


def list_backends(cluster: Cluster, namespace: str) -> list[dict[str, Any]]:
    return _items(
        cluster.custom.list_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, _preload_content=False
        )
    )


def list_children(
    cluster: Cluster, namespace: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every Deployment and Service of the namespace, labelled or not."""
    deployments = _items(cluster.apps.list_namespaced_deployment(namespace, _preload_content=False))
    services = _items(cluster.core.list_namespaced_service(namespace, _preload_content=False))
    return deployments, services


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return {}


# --- is what runs what the specs say? ----------------------------------------------------


def _same_quantity(a: Any, b: Any) -> bool:
    try:
        return bool(parse_quantity(a) == parse_quantity(b))
    except (ValueError, InvalidOperation, TypeError):
        return False


def _keyed(items: list[Any]) -> dict[str, Any] | None:
    """A list of named objects (env, containers, volumes, ports) as a map, else None."""
    if not items or not all(isinstance(i, dict) and "name" in i for i in items):
        return None
    keyed = {str(i["name"]): i for i in items}
    return keyed if len(keyed) == len(items) else None


def mismatch(observed: Any, desired: Any, path: str = "", *, ordered: bool = True) -> str | None:
    """Where `observed` does not hold `desired` (None: it does). Maps may have more keys
    (server defaults); lists must match element by element, or with `ordered=False`, lists
    of named objects by name (same names, each entry holding the desired one); quantities
    compare by value."""
    if isinstance(desired, dict):
        if not isinstance(observed, dict):
            return f"{path or '.'}: expected an object, found {str(observed)[:80]!r}"
        for key, value in desired.items():
            found = mismatch(observed.get(key), value, f"{path}.{key}", ordered=ordered)
            if found:
                return found
        return None
    if isinstance(desired, list):
        if not isinstance(observed, list) or len(observed) != len(desired):
            return f"{path}: expected {str(desired)[:200]}, found {str(observed)[:200]}"
        want, have = _keyed(desired), _keyed(observed)
        if not ordered and want is not None and have is not None:
            if set(want) != set(have):
                return f"{path}: expected names {sorted(want)}, found {sorted(have)}"
            pairs = [(have[k], want[k], f"{path}[{k}]") for k in want]
        else:
            pairs = [
                (o, d, f"{path}[{i}]")
                for i, (o, d) in enumerate(zip(observed, desired, strict=True))
            ]
        for o, d, where in pairs:
            found = mismatch(o, d, where, ordered=ordered)
            if found:
                return found
        return None
    if observed == desired:
        return None
    if re.search(r"\.(limits|requests)\.[^.]+$|\.sizeLimit$", path) and _same_quantity(
        observed, desired
    ):
        return None
    return f"{path}: expected {str(desired)[:120]!r}, found {str(observed)[:120]!r}"


@dataclass
class Expected:
    """What the operator should make of one LLMBackend, from the pure functions."""

    valid: bool
    children: list[dict[str, Any]]  # rendered manifests (empty for remote backends)
    problems: list[str]


def expected(obj: dict[str, Any]) -> Expected:
    backend, problems = validate(obj)
    if backend is None or problems:
        return Expected(False, [], [str(p) for p in problems])
    if getattr(backend.spec, "remote", None) is not None:
        return Expected(True, [], [])
    return Expected(True, render(backend).all(), [])


@dataclass
class Convergence:
    """The outcome of one look at a namespace."""

    backends: int = 0
    reconciled: int = 0
    invalid: int = 0
    children_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = (
            f"{self.backends} backends ({self.reconciled} reconciled, {self.invalid} "
            f"InvalidSpec), {self.children_checked} children checked, "
            f"{len(self.problems)} problems"
        )
        return head + "".join(f"\n  - {p}" for p in self.problems[:25])


def _owner(child: dict[str, Any]) -> dict[str, Any] | None:
    for ref in child["metadata"].get("ownerReferences") or []:
        if ref.get("kind") == "LLMBackend":
            return dict(ref)
    return None


def _check_children(
    out: Convergence, live: dict[str, dict[str, Any]], children: dict[str, list[dict[str, Any]]]
) -> None:
    """No child is duplicated, orphaned (its owner is gone) or stuck deleting."""
    for kind, items in children.items():
        per_backend = Counter(
            (c["metadata"].get("labels") or {}).get(BACKEND_LABEL)
            for c in items
            if (c["metadata"].get("labels") or {}).get(MANAGED_BY) == "fabric-operator"
        )
        out.problems += [
            f"duplicate: {n} {kind}s labelled for backend {b}"
            for b, n in per_backend.items()
            if n > 1
        ]
        for child in items:
            meta = child["metadata"]
            ref = _owner(child)
            managed = (meta.get("labels") or {}).get(MANAGED_BY) == "fabric-operator"
            if ref is None:
                if managed:
                    out.problems.append(f"{kind} {meta['name']}: managed but has no owner")
                continue
            owner = live.get(ref["name"])
            if owner is None or owner["metadata"]["uid"] != ref["uid"]:
                out.problems.append(
                    f"orphan: {kind} {meta['name']} owned by {ref['name']}/{ref['uid'][:8]}, "
                    "which is gone"
                )
            if meta.get("deletionTimestamp"):
                out.problems.append(f"{kind} {meta['name']} stuck deleting")


def _check_backend(
    out: Convergence,
    obj: dict[str, Any],
    by_name: dict[str, dict[str, dict[str, Any]]],
    ordered: bool,
) -> None:
    """One LLMBackend: its status is for its generation, its children are its spec's."""
    meta = obj["metadata"]
    name = meta["name"]
    if meta.get("deletionTimestamp"):
        out.problems.append(f"{name}: stuck deleting (finalizers {meta.get('finalizers')})")
        return
    status = obj.get("status") or {}
    if status.get("observedGeneration") != meta.get("generation"):
        out.problems.append(
            f"{name}: status.observedGeneration {status.get('observedGeneration')} "
            f"!= generation {meta.get('generation')}"
        )
        return
    want = expected(obj)
    degraded = condition(obj, "Degraded")
    if not want.valid:
        out.invalid += 1
        if degraded.get("reason") != "InvalidSpec" or not degraded.get("message"):
            out.problems.append(
                f"{name}: spec invalid ({'; '.join(want.problems)[:200]}) but Degraded is "
                f"{degraded}"
            )
        for kind, children in by_name.items():
            child = children.get(name)
            if child is not None and (_owner(child) or {}).get("uid") != meta["uid"]:
                out.problems.append(f"{name}: {kind} left from an older {name}")
        return
    out.reconciled += 1
    if degraded.get("reason") in {"InvalidSpec", "ApplyFailed"}:
        out.problems.append(f"{name}: valid spec but Degraded {degraded.get('message')}")
    wanted = {m["kind"]: m for m in want.children}
    for kind, children in by_name.items():
        child = children.get(name)
        if kind not in wanted:
            if child is not None and _owner(child) is not None:
                out.problems.append(f"{name}: has a {kind} it should not have")
            continue
        if child is None:
            out.problems.append(f"{name}: {kind} missing")
            continue
        out.children_checked += 1
        ref = _owner(child) or {}
        if ref.get("uid") != meta["uid"] or not ref.get("controller"):
            out.problems.append(f"{name}: {kind} owned by {ref}, not by uid {meta['uid']}")
        # Items of a list carry no apiVersion and kind: the list says what they are.
        desired = {k: v for k, v in wanted[kind].items() if k not in ("apiVersion", "kind")}
        diff = mismatch(child, desired, ordered=ordered)
        if diff:
            out.problems.append(f"{name}: {kind} differs from its spec at {diff}")


def check_converged(cluster: Cluster, namespace: str, *, ordered: bool = True) -> Convergence:
    """Every live LLMBackend has exactly the children its spec renders to (or none and an
    InvalidSpec status), a status for its current generation, nothing stuck deleting; no
    child is orphaned, stale (owned by an older uid) or duplicated. `ordered=False`
    compares lists of named entries (env, volumes...) by name, not position."""
    out = Convergence()
    backends = list_backends(cluster, namespace)
    deployments, services = list_children(cluster, namespace)
    live = {b["metadata"]["name"]: b for b in backends}
    out.backends = len(backends)
    children = {"Deployment": deployments, "Service": services}
    _check_children(out, live, children)
    by_name = {kind: {c["metadata"]["name"]: c for c in items} for kind, items in children.items()}
    for obj in backends:
        _check_backend(out, obj, by_name, ordered)
    return out


def wait_converged(
    cluster: Cluster,
    namespace: str,
    timeout: float,
    interval: float = 1.0,
    *,
    ordered: bool = True,
    progress: float = 10.0,
) -> tuple[Convergence, float]:
    """Poll until converged; returns the last look and the seconds it took. Says what is
    still pending every `progress` seconds."""
    started = time.monotonic()
    told = started
    while True:
        try:
            last = check_converged(cluster, namespace, ordered=ordered)
        except ApiException as err:
            last = Convergence(problems=[f"API error while checking: {err.status} {err.reason}"])
        now = time.monotonic()
        if last.ok or now - started > timeout:
            return last, now - started
        if now - told >= progress:
            told = now
            kinds = Counter(re.sub(r"^[^:]*: ", "", p)[:40] for p in last.problems)
            say("still converging after %.0fs: %s", now - started, dict(kinds.most_common(4)))
        time.sleep(interval)


# --- churn -------------------------------------------------------------------------------


def churn_spec(rng: random.Random, generation: int, invalid_share: float = 0.0) -> dict[str, Any]:
    """A varied, valid CPU spec with 0 replicas (no pods: the test is about the operator);
    with probability `invalid_share`, one the operator must refuse (ollama cannot load a
    URL model)."""
    if rng.random() < invalid_share:
        return {"engine": "ollama", "model": {"url": "https://models.invalid/x.gguf"}}
    spec: dict[str, Any] = {"replicas": 0, "env": [{"name": "CHURN_GEN", "value": str(generation)}]}
    if rng.random() < 0.7:
        spec.update(
            engine="llamacpp",
            model={"url": f"https://models.invalid/m{rng.randrange(20)}.gguf"},
            engineOptions={"contextLength": rng.choice([512, 2048, 4096, 8192])},
        )
        if rng.random() < 0.3:
            spec["extraArgs"] = ["--threads", str(rng.randrange(1, 9))]
    else:
        spec.update(engine="ollama", model={"ollama": rng.choice(["llama3.2:1b", "qwen2.5:0.5b"])})
    if rng.random() < 0.5:
        spec["servedModelName"] = f"model-{rng.randrange(1000)}"
    if rng.random() < 0.3:
        spec["service"] = {"port": rng.choice([80, 8081, 9000])}
    return spec


class Churn(threading.Thread):
    """Creates, updates (spec changes) and deletes LLMBackends `prefix-000`... at random
    until stopped; counts what it did and the API errors it met."""

    def __init__(
        self,
        cluster: Cluster,
        namespace: str,
        rng: random.Random,
        names: list[str],
        *,
        invalid_share: float = 0.05,
        pause: float = 0.0,
    ) -> None:
        super().__init__(name="churn", daemon=True)
        self.cluster, self.namespace, self.rng, self.names = cluster, namespace, rng, names
        self.invalid_share, self.pause = invalid_share, pause
        self.done: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.exists: set[str] = set()
        self._halt = threading.Event()
        self._generation = 0

    def op(self, name: str) -> None:
        self._generation += 1
        spec = churn_spec(self.rng, self._generation, self.invalid_share)
        try:
            if name not in self.exists:
                create(self.cluster, self.namespace, name, spec)
                self.exists.add(name)
                self.done["create"] += 1
            elif self.rng.random() < 0.7:
                replace_spec(self.cluster, self.namespace, name, spec)
                self.done["update"] += 1
            else:
                delete(self.cluster, self.namespace, name)
                self.exists.discard(name)
                self.done["delete"] += 1
        except ApiException as err:
            self.errors[f"{err.status}"] += 1
            if err.status == 404:
                self.exists.discard(name)
            elif err.status == 409:
                self.exists.add(name)
        except Exception as err:  # the API server may be down on purpose
            self.errors[type(err).__name__] += 1
            time.sleep(0.2)

    def run(self) -> None:
        while not self._halt.is_set():
            self.op(self.rng.choice(self.names))
            if self.pause:
                self._halt.wait(self.pause)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


# --- secrets -----------------------------------------------------------------------------


def secret_forms(value: str) -> list[str]:
    """The ways a Secret value could leak: as is, and base64 as in a Secret's data."""
    return [value, base64.b64encode(value.encode()).decode()]


def assert_alive(op: OperatorProcess) -> None:
    assert op.proc is not None, "the operator was never started"
    code = op.proc.poll()
    assert code is None, f"the operator exited with {code}: {op.logs()[-3000:]}"


# --- a fault-injecting proxy in front of the API server ----------------------------------


EXPIRED = {
    "type": "ERROR",
    "object": {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": "too old resource version (injected by the fault proxy)",
        "reason": "Expired",
        "code": 410,
    },
}


@dataclass(frozen=True)
class Seen:
    """One request as the proxy received it (wall-clock `time.time()`, comparable with the
    API server's timestamps on this machine)."""

    at: float
    method: str
    path: str
    outcome: str  # "forwarded", "injected", "partitioned", "expired"

    @property
    def write(self) -> bool:
        return self.method in {"POST", "PUT", "PATCH", "DELETE"}


class FaultProxy:
    """An HTTPS proxy on loopback between a client (the operator) and the kube-apiserver.

    It forwards everything, watches streamed as they come, except that a share of the
    requests `inject` selects is answered by the proxy itself with an error status
    (409 Conflict, 500, 503, 429...), as a busy or racing API server would; that the
    watches of a resource can be cut and held (`hold_watches`), then answered `410 Gone`
    (`release_watches`), so the client lists again after a gap it saw nothing of; and that
    the client can be cut off (`partition`): the requests selected hang unanswered, as on
    a dead network, until `heal`. Every request is logged (`seen`). Needs the local
    control plane's CA key to issue itself a certificate the client trusts.
    """

    def __init__(
        self,
        plane: LocalControlPlane,
        workdir: Path,
        *,
        share: float = 0.0,
        statuses: list[int] | None = None,
        inject: Callable[[str, str], bool] = lambda method, path: False,
        seed: int = 0,
    ) -> None:
        self.plane, self.workdir = plane, workdir
        self.share, self.statuses, self.inject = share, statuses or [503], inject
        self.rng = random.Random(seed)
        self.injected: Counter[str] = Counter()
        self.forwarded: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.port = 0
        self._held: str | None = None  # a path part: watches whose path has it are held
        self._released = threading.Event()
        self._streams: dict[int, tuple[str, http.client.HTTPSConnection]] = {}
        self.expired: Counter[str] = Counter()  # watches answered 410, by held path part
        self.seen: list[Seen] = []
        self._cut: Callable[[str, str], bool] | None = None
        self._healed = threading.Event()

    def _log(self, method: str, path: str, outcome: str) -> None:
        with self._lock:
            self.seen.append(Seen(time.time(), method, path, outcome))

    def partition(self, cut: Callable[[str, str], bool] = lambda method, path: True) -> int:
        """From now on, the requests `cut` selects get no answer until `heal` (then their
        connection is closed): a network partition as the client sees it. Open watches it
        selects are cut too. Returns how many were."""
        with self._lock:
            self._cut = cut
            self._healed.clear()
            cut_streams = [conn for path, conn in self._streams.values() if cut("GET", path)]
        for conn in cut_streams:
            with contextlib.suppress(OSError, AttributeError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        return len(cut_streams)

    def heal(self) -> None:
        with self._lock:
            self._cut = None
        self._healed.set()

    def _partitioned(self, method: str, path: str) -> bool:
        with self._lock:
            cut = self._cut
        if cut is None or not cut(method, path):
            return False
        self._log(method, path, "partitioned")
        self._healed.wait(120)
        return True

    def hold_watches(self, part: str) -> int:
        """Cut the open watches whose path contains `part`, and hold new ones until
        `release_watches`; returns how many were cut."""
        with self._lock:
            self._held = part
            self._released.clear()
            cut = [conn for path, conn in self._streams.values() if part in path]
        for conn in cut:
            with contextlib.suppress(OSError, AttributeError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        return len(cut)

    def release_watches(self) -> None:
        """Answer the held watches (and those to come meanwhile) with 410 Gone: their
        resourceVersion is "too old", so the client must list again."""
        self._released.set()

    def _watch_held(self, path: str) -> bool:
        with self._lock:
            held = self._held
        if held is None or held not in path or "watch=" not in path:
            return False
        self._released.wait(120)
        with self._lock:
            if self._held == held:
                self._held = None
            self.expired[held] += 1
        return True

    def _certificate(self) -> tuple[Path, Path]:
        pki = self.plane.workdir / "pki"
        self.workdir.mkdir(parents=True, exist_ok=True)
        key, csr, crt = (self.workdir / f"proxy.{x}" for x in ("key", "csr", "crt"))
        ext = self.workdir / "san.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run = functools.partial(subprocess.run, check=True, capture_output=True)
        subject = ["-subj", "/CN=fault-proxy"]
        run(
            [
                "openssl",
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                str(key),
                "-out",
                str(csr),
                *subject,
            ]
        )
        ca = ["-CA", str(pki / "ca.crt"), "-CAkey", str(pki / "ca.key"), "-CAcreateserial"]
        run(
            [
                "openssl",
                "x509",
                "-req",
                "-in",
                str(csr),
                *ca,
                "-out",
                str(crt),
                "-days",
                "2",
                "-extfile",
                str(ext),
            ]
        )
        return crt, key

    def _upstream_context(self) -> ssl.SSLContext:
        pki = self.plane.workdir / "pki"
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        return ctx

    def decide(self, method: str, path: str) -> int | None:
        """The status to answer with instead of forwarding, or None."""
        if not self.inject(method, path):
            return None
        with self._lock:
            if self.rng.random() >= self.share:
                return None
            status = self.rng.choice(self.statuses)
            self.injected[f"{status} {method}"] += 1
            return status

    def start(self) -> FaultProxy:
        crt, key = self._certificate()
        proxy = self
        upstream = ("127.0.0.1", self.plane.apiserver_port)
        upstream_ctx = self._upstream_context()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self, status: int) -> None:
                reason = {409: "Conflict", 429: "TooManyRequests", 500: "InternalError"}.get(
                    status, "ServiceUnavailable"
                )
                body = json.dumps(
                    {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Failure",
                        "message": f"injected by the fault proxy ({status})",
                        "reason": reason,
                        "details": {"retryAfterSeconds": 1} if status == 429 else {},
                        "code": status,
                    }
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if status == 429:
                    self.send_header("Retry-After", "1")
                self.end_headers()
                self.wfile.write(body)

            def _expire(self) -> None:
                line = json.dumps(EXPIRED).encode() + b"\n"
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(line), line))
                self.wfile.flush()

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if proxy._partitioned(self.command, self.path):
                    self.close_connection = True
                    return
                if proxy._watch_held(self.path):
                    proxy._log(self.command, self.path, "expired")
                    self._expire()
                    return
                status = proxy.decide(self.command, self.path)
                if status is not None:
                    proxy._log(self.command, self.path, "injected")
                    self._answer(status)
                    return
                proxy._log(self.command, self.path, "forwarded")
                with proxy._lock:
                    proxy.forwarded[self.command] += 1
                conn = http.client.HTTPSConnection(*upstream, context=upstream_ctx, timeout=330)
                try:
                    headers = {
                        k: v
                        for k, v in self.headers.items()
                        if k.lower() not in {"host", "connection", "transfer-encoding"}
                    }
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    self.send_response(resp.status, resp.reason)
                    chunked = resp.getheader("Transfer-Encoding", "").lower() == "chunked"
                    for k, v in resp.getheaders():
                        if k.lower() not in {"transfer-encoding", "connection", "content-length"}:
                            self.send_header(k, v)
                    if chunked:
                        self.send_header("Transfer-Encoding", "chunked")
                        self.end_headers()
                        with proxy._lock:
                            proxy._streams[id(conn)] = (self.path, conn)
                        with contextlib.suppress(OSError, ValueError, http.client.HTTPException):
                            # A watch ends when either side goes away.
                            while chunk := resp.read1(65536):
                                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                                self.wfile.flush()
                        with proxy._lock:
                            proxy._streams.pop(id(conn), None)
                        self.wfile.write(b"0\r\n\r\n")
                    else:
                        data = resp.read()
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data)
                    self.wfile.flush()
                finally:
                    conn.close()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward  # noqa: N815

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client or the API server hung up: nothing to report

        server = Server(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(crt), str(key))
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self._server, self.port = server, server.server_address[1]
        threading.Thread(target=server.serve_forever, name="fault-proxy", daemon=True).start()
        return self

    def kubeconfig(self) -> Path:
        """The admin kubeconfig with the proxy as the server."""
        text = self.plane.kubeconfig.read_text().replace(
            self.plane.server, f"https://127.0.0.1:{self.port}"
        )
        path = self.workdir / "kubeconfig-via-proxy"
        path.write_text(text)
        return path

    def stop(self) -> None:
        self.heal()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
