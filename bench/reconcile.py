"""Benchmark: how fast LLMBackends become their children and status, at what API cost and
footprint, next to the limit a plain client loop reaches on the same API server.

    python -m bench.reconcile                      # N = 100, 300, 1000 (about 10 minutes)
    python -m bench.reconcile --backends 5 --latency-samples 5 --idle-seconds 2   # smoke

Starts a local control plane (etcd + kube-apiserver only: no controller-manager or
scheduler competing for the CPU), runs the operator as its own process, prints a table
and writes JSON. Figures are for the machine they were taken on; nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from tests.support.fixtures import OperatorProcess

from fabric_operator.api.backend import LLMBackend
from fabric_operator.api.crd import crd_manifest
from fabric_operator.api.v1alpha1 import GROUP, PLURAL, VERSION
from fabric_operator.config import OperatorConfig
from fabric_operator.controller.reconciler import desired_children
from fabric_operator.controller.status import compute
from fabric_operator.localcluster import LocalControlPlane, find_binaries
from fabric_operator.machinery import metrics

REPO = Path(__file__).resolve().parents[1]
TARGETS = {
    "p50_children_ms": 150,
    "p99_children_ms": 1000,
    "ratio_to_limit_at_1000": 2.0,
    # A new backend: three children created (POST, never merged into another's object),
    # each create's managedFields entry turned into an Apply (one JSON patch), one status.
    "requests_per_new_backend": 7,
    "writes_on_restart": 0,
    "writes_idle": 0,
    "rss_mb_at_1000": 150,
}
CLIENT_THREADS = 16


def manifest(namespace: str, name: str, context: int = 2048) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LLMBackend",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "engine": "llamacpp",
            "model": {"url": "https://h.invalid/m.gguf"},
            "engineOptions": {"contextLength": context},
        },
    }


class Observer:
    """Watches children and statuses and records when each first appeared."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.seen: dict[tuple[str, str, str], float] = {}
        self.generation: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        apps, core = client.AppsV1Api(self.api), client.CoreV1Api(self.api)
        custom = client.CustomObjectsApi(self.api)
        label = "app.kubernetes.io/managed-by=fabric-operator"
        self._spawn(
            "Deployment",
            lambda **kw: apps.list_deployment_for_all_namespaces(label_selector=label, **kw),
        )
        self._spawn(
            "Service", lambda **kw: core.list_service_for_all_namespaces(label_selector=label, **kw)
        )
        self._spawn(
            "Status", lambda **kw: custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, **kw)
        )

    def _spawn(self, kind: str, lister: Callable[..., Any]) -> None:
        def run() -> None:
            while not self._stop.is_set():
                w = watch.Watch()
                try:
                    for event in w.stream(lister, timeout_seconds=30, _request_timeout=40):
                        self._record(kind, event["object"])
                        if self._stop.is_set():
                            break
                except Exception:
                    time.sleep(0.1)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _record(self, kind: str, obj: Any) -> None:
        now = time.monotonic()
        if kind == "Status":
            meta, status = obj["metadata"], obj.get("status") or {}
            key = (meta["namespace"], meta["name"])
            observed = status.get("observedGeneration")
            if observed is None:
                return
            with self._lock:
                if observed > self.generation.get(key, 0):
                    self.generation[key] = observed
                    self.seen[("Status", *key)] = now
                    self.seen[(f"Status@{observed}", *key)] = now
            return
        meta = obj["metadata"] if isinstance(obj, dict) else obj.metadata.to_dict()
        key3 = (kind, meta["namespace"], meta["name"])
        with self._lock:
            self.seen.setdefault(key3, now)

    def when(self, kind: str, namespace: str, name: str) -> float | None:
        with self._lock:
            return self.seen.get((kind, namespace, name))

    def done(self, namespace: str, name: str, generation: int = 1) -> float | None:
        times = [self.when(k, namespace, name) for k in ("Deployment", "Service")]
        status = self.when(f"Status@{generation}", namespace, name)
        if None in times or status is None:
            return None
        return max(*[t for t in times if t is not None], status)

    def stop(self) -> None:
        self._stop.set()


class Operator(OperatorProcess):
    """The operator as its own process (the tests' fixture), plus /proc figures."""

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            return metrics.parse(r.read().decode())

    def requests(self) -> int:
        """API requests the operator made, counted by itself (live, uncached)."""
        return int(sum(self.api_requests().values()))

    def rss_mb(self, field: str = "VmRSS") -> float:
        """Resident memory now, or its high-water mark since the start (VmHWM)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


def resynced(op: Operator, backends: int) -> bool:
    """Every LLMBackend reconciled and the queue empty (a busy operator may answer slowly)."""
    try:
        sample = op.metrics()
    except OSError:
        return False
    return (
        sample["fabric_operator_reconciles_total"] >= backends
        and sample["fabric_operator_queue_depth"] == 0
    )


def wait(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what}: not done after {timeout:.0f}s")


def apiserver_writes(kubeconfig: Path) -> int:
    """PATCH/POST the API server served on the operator's resources (its own /metrics)."""
    text = subprocess.run(
        ["kubectl", f"--kubeconfig={kubeconfig}", "get", "--raw", "/metrics"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    total = 0
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = line[line.index("{") + 1 : line.index("}")]
        verb_ok = any(f'verb="{v}"' in labels for v in ("PATCH", "POST", "APPLY", "CREATE"))
        res_ok = any(
            f'resource="{r}"' in labels
            for r in ("deployments", "services", "llmbackends", "events")
        )
        if verb_ok and res_ok:
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def bench_latency(custom: client.CustomObjectsApi, obs: Observer, samples: int) -> dict[str, Any]:
    core = client.CoreV1Api(custom.api_client)
    core.create_namespace({"metadata": {"name": "lat"}})
    children, status = [], []
    for i in range(samples):
        name = f"l{i}"
        custom.create_namespaced_custom_object(GROUP, VERSION, "lat", PLURAL, manifest("lat", name))
        accepted = time.monotonic()
        wait(lambda n=name: obs.done("lat", n), 30, f"latency sample {name}", 0.002)
        dep, svc = obs.when("Deployment", "lat", name), obs.when("Service", "lat", name)
        assert dep is not None and svc is not None
        children.append((max(dep, svc) - accepted) * 1000)
        status.append(((obs.done("lat", name) or accepted) - accepted) * 1000)
        time.sleep(0.05)  # one at a time, on an idle operator
    summary = {}
    for label, values in (("children_ms", children), ("status_ms", status)):
        summary[label] = {
            "p50": pct(values, 50),
            "p90": pct(values, 90),
            "p99": pct(values, 99),
            "max": max(values),
        }
    return summary


def create_all(custom: client.CustomObjectsApi, namespace: str, count: int) -> None:
    def one(i: int) -> None:
        custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, manifest(namespace, f"b{i}")
        )

    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        list(pool.map(one, range(count)))


def bench_operator(
    custom: client.CustomObjectsApi, obs: Observer, op: Operator, n: int
) -> dict[str, Any]:
    namespace = f"op-{n}"
    client.CoreV1Api(custom.api_client).create_namespace({"metadata": {"name": namespace}})
    before = op.requests()
    started = time.monotonic()
    create_all(custom, namespace, n)
    wait(
        lambda: all(obs.done(namespace, f"b{i}") for i in range(n)), 60 + n, f"operator N={n}", 0.05
    )
    seconds = time.monotonic() - started
    return {
        "seconds": seconds,
        "per_second": n / seconds,
        "requests_per_backend": (op.requests() - before) / n,
        "namespace": namespace,
    }


def bench_limit(api: client.ApiClient, n: int) -> dict[str, Any]:
    """The same objects, written by the fastest plain client loop at hand (16 threads)."""
    namespace = f"limit-{n}"
    custom, apps, core = client.CustomObjectsApi(api), client.AppsV1Api(api), client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": namespace}})
    apply = {
        "field_manager": "bench",
        "force": True,
        "_content_type": "application/apply-patch+yaml",
        "_preload_content": False,
    }

    def one(i: int) -> None:
        name = f"b{i}"
        created = custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, manifest(namespace, name)
        )
        backend = LLMBackend.from_manifest(created)
        # As the operator applies them (policy/v1beta1: the local server is 1.20).
        children = {m["kind"]: m for m in desired_children(backend, OperatorConfig(), (1, 20))}
        apps.patch_namespaced_deployment(name, namespace, children["Deployment"], **apply)
        core.patch_namespaced_service(name, namespace, children["Service"], **apply)
        custom.patch_namespaced_custom_object_status(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            {"status": compute(backend, None, None, None)},
            _content_type="application/merge-patch+json",
            _preload_content=False,
        )

    started = time.monotonic()
    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        list(pool.map(one, range(n)))
    seconds = time.monotonic() - started
    return {"seconds": seconds, "per_second": n / seconds}


def bench_update(
    custom: client.CustomObjectsApi, obs: Observer, op: Operator, namespace: str, n: int
) -> dict[str, Any]:
    before = op.requests()
    started = time.monotonic()

    def one(i: int) -> None:
        custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            f"b{i}",
            {"spec": {"engineOptions": {"contextLength": 4096}}},
            _content_type="application/merge-patch+json",
        )

    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
        list(pool.map(one, range(n)))
    wait(
        lambda: all(obs.when("Status@2", namespace, f"b{i}") for i in range(n)),
        60 + n,
        "updates",
        0.05,
    )
    return {
        "seconds": time.monotonic() - started,
        "requests_per_update": (op.requests() - before) / n,
    }


def main(argv: list[str] | None = None) -> int:  # noqa: PLR0915 - one linear script
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="100,300,1000", help="comma-separated N")
    parser.add_argument("--latency-samples", type=int, default=50)
    parser.add_argument("--idle-seconds", type=float, default=300.0)
    parser.add_argument("--json", default=str(REPO / "bench" / "results.json"))
    args = parser.parse_args(argv)
    sizes = [int(n) for n in args.backends.split(",")]
    os.environ["FABRIC_LOG_LEVEL"] = "WARNING"

    workdir = Path(tempfile.mkdtemp(prefix="fabric-bench-"))
    plane = LocalControlPlane(workdir / "cluster", find_binaries(REPO))
    plane.start(controllers=False)
    kubeconfig = plane.kubeconfig
    op = Operator(plane.kubeconfig, workdir)
    obs: Observer | None = None
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "kubernetes": "v1.20.2 (local)",
        },
        "targets": TARGETS,
    }
    try:
        api = config.new_client_from_config(config_file=str(plane.kubeconfig))
        api.configuration.connection_pool_maxsize = CLIENT_THREADS
        ext = client.ApiextensionsV1Api(api)
        ext.create_custom_resource_definition(crd_manifest())
        wait(
            lambda: any(
                c.type == "Established" and c.status == "True"
                for c in (
                    ext.read_custom_resource_definition(f"{PLURAL}.{GROUP}").status.conditions or []
                )
            ),
            30,
            "CRD established",
        )
        custom = client.CustomObjectsApi(api)
        op.start()
        time.sleep(1)
        results["footprint"] = {"rss_mb_0": op.rss_mb()}
        results["cpu"] = {"cpu_s_0": op.cpu_seconds()}
        obs = Observer(api)
        obs.start()
        time.sleep(0.5)

        results["latency"] = bench_latency(custom, obs, args.latency_samples)
        throughput, limits, updates = {}, {}, {}
        for n in sizes:
            throughput[n] = bench_operator(custom, obs, op, n)
            results["footprint"][f"rss_mb_after_{n}"] = op.rss_mb()
            results["cpu"][f"cpu_s_after_{n}"] = op.cpu_seconds()
            updates[n] = bench_update(custom, obs, op, throughput[n]["namespace"], n)
        op.stop()
        for n in sizes:
            limits[n] = bench_limit(api, n)
        results["throughput"] = {
            str(n): {
                **throughput[n],
                "limit_seconds": limits[n]["seconds"],
                "ratio": throughput[n]["seconds"] / limits[n]["seconds"],
            }
            for n in sizes
        }
        results["updates"] = {str(n): updates[n] for n in sizes}

        managed = args.latency_samples + sum(sizes) * 2
        writes_before = apiserver_writes(kubeconfig)
        op.start()
        started = time.monotonic()
        wait(lambda: resynced(op, managed - sum(sizes)), 120 + managed / 10, "restart resync")
        resync_seconds, resync_cpu = time.monotonic() - started, op.cpu_seconds()
        time.sleep(2)
        restart = {
            "requests": op.requests(),
            "writes_apiserver": apiserver_writes(kubeconfig) - writes_before,
            "managed": op.metrics()["fabric_operator_backends"],
            "seconds": resync_seconds,
            "cpu_seconds": resync_cpu,
        }
        results["restart"] = restart
        cpu0, writes0, req0 = op.cpu_seconds(), apiserver_writes(kubeconfig), op.requests()
        time.sleep(args.idle_seconds)
        results["idle"] = {
            "seconds": args.idle_seconds,
            "cpu_seconds": op.cpu_seconds() - cpu0,
            "requests": op.requests() - req0,
            "writes_apiserver": apiserver_writes(kubeconfig) - writes0,
        }
        results["footprint"]["rss_mb_managed_all"] = op.rss_mb()
        results["footprint"]["restart_peak_mb"] = op.rss_mb("VmHWM")
        results["footprint"]["managed"] = op.metrics()["fabric_operator_backends"]
    finally:
        if obs is not None:
            obs.stop()
        op.stop()
        plane.stop()

    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    report(results, sizes)
    return 0


def report(r: dict[str, Any], sizes: list[int]) -> None:
    lat = r["latency"]
    rows = [
        (
            "create → children p50/p90/p99/max ms",
            "{p50:.0f} / {p90:.0f} / {p99:.0f} / {max:.0f}".format(**lat["children_ms"]),
            f"p50 ≤ {TARGETS['p50_children_ms']}, p99 ≤ {TARGETS['p99_children_ms']}",
        ),
        (
            "create → status p50/p90/p99/max ms",
            "{p50:.0f} / {p90:.0f} / {p99:.0f} / {max:.0f}".format(**lat["status_ms"]),
            "",
        ),
    ]
    for n in sizes:
        t = r["throughput"][str(n)]
        rows.append(
            (f"N={n}: operator s (obj/s)", f"{t['seconds']:.1f} ({t['per_second']:.0f})", "")
        )
        rows.append(
            (
                f"N={n}: plain-client limit s; ratio",
                f"{t['limit_seconds']:.1f}; {t['ratio']:.2f}x",
                f"≤ {TARGETS['ratio_to_limit_at_1000']}x at 1000",
            )
        )
        rows.append(
            (
                f"N={n}: requests per new / per update",
                f"{t['requests_per_backend']:.2f} / "
                f"{r['updates'][str(n)]['requests_per_update']:.2f}",
                f"≤ {TARGETS['requests_per_new_backend']} per new",
            )
        )
    rows.append(
        (
            "restart: operator requests; apiserver writes",
            f"{r['restart']['requests']}; {r['restart']['writes_apiserver']}",
            "0; 0",
        )
    )
    rows.append(
        (
            f"restart with {r['restart']['managed']:.0f} managed: resync s; CPU s",
            f"{r['restart']['seconds']:.1f}; {r['restart']['cpu_seconds']:.1f}",
            "",
        )
    )
    cpu = r["cpu"]
    rows.append(
        (
            "CPU s (cumulative) at 0 / after each N",
            " / ".join(f"{cpu[k]:.1f}" for k in cpu),
            "",
        )
    )
    rows.append(
        (
            f"idle {r['idle']['seconds']:.0f}s: requests; writes; CPU s",
            f"{r['idle']['requests']}; {r['idle']['writes_apiserver']}; "
            f"{r['idle']['cpu_seconds']:.2f}",
            "0; 0; ≈ 0",
        )
    )
    fp = r["footprint"]
    rows.append(
        (
            "RSS MB at 0 / after each N / all managed",
            " / ".join(f"{fp[k]:.0f}" for k in fp if k.startswith("rss_mb")),
            f"≤ {TARGETS['rss_mb_at_1000']} at 1000",
        )
    )
    rows.append(("RSS MB peak during the restart", f"{fp['restart_peak_mb']:.0f}", ""))
    if len(sizes) > 1:
        small, big = sizes[0], sizes[-1]
        per_small = r["throughput"][str(small)]["seconds"] / small
        per_big = r["throughput"][str(big)]["seconds"] / big
        rows.append(
            (
                f"growth {small}→{big}: time per object",
                f"{per_big / per_small:.2f}x",
                "≈ 1 is linear",
            )
        )
    width = max(len(a) for a, _, _ in rows)
    print(
        f"\nfabric-operator benchmark ({r['machine']['cpus']} cores, {r['machine']['kubernetes']})"
    )
    for name, value, target in rows:
        print(f"  {name:<{width}}  {value:<24} {('target ' + target) if target else ''}")


if __name__ == "__main__":
    raise SystemExit(main())
