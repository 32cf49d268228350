"""`fabric-operator`: run the operator, print the CRD, render children, or start a local
development cluster with the operator on it."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import kopf
import yaml
from kopf._core.engines.peering import Identity
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from fabric_operator import __version__, usagereport
from fabric_operator.api.crd import crd_yaml, crd_yaml_for_server, wait_established
from fabric_operator.api.v1alpha1 import GROUP, PLURAL, VERSION
from fabric_operator.autoscaler.discovery import Gateways
from fabric_operator.autoscaler.loop import Autoscaler
from fabric_operator.autoscaler.signal import Signal
from fabric_operator.config import OperatorConfig
from fabric_operator.controller.handlers import build_registry, install_kopf_wraps
from fabric_operator.controller.kube import Kube, server_version
from fabric_operator.controller.reconciler import Reconciler, Settings, new_store
from fabric_operator.controller.runtime import Controller
from fabric_operator.localcluster import LocalControlPlane, find_binaries
from fabric_operator.machinery.kopfcheck import KopfChangedError
from fabric_operator.machinery.leader import (
    LEASE_SECONDS,
    RENEW_DEADLINE,
    RETRY_PERIOD,
    LeaderElector,
    check_durations,
    leader_client,
)
from fabric_operator.machinery.store import Store
from fabric_operator.render import render
from fabric_operator.validation import validate

log = logging.getLogger(__name__)


def _load_operator_config(path: str | None) -> OperatorConfig:
    """The --config file, with the operator's own namespace as the gateway's unless the
    file names one (the chart installs both in its release namespace)."""
    return OperatorConfig.load(path).with_gateway_namespace(_own_namespace())


def _run_operator(args: argparse.Namespace) -> int:

    try:
        install_kopf_wraps()
    except KopfChangedError as err:
        print(f"fabric-operator: {err}", file=sys.stderr)
        return 2
    try:
        operator_config = _load_operator_config(args.config)
    except (OSError, ValueError) as err:  # pydantic's ValidationError is a ValueError
        print(f"fabric-operator: --config {args.config}: {err}", file=sys.stderr)
        return 2
    _load_config(args.kubeconfig)
    configuration = client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = max(4, args.workers)
    store = new_store()
    api = client.ApiClient(configuration)
    kube = Kube(api, _server_version(api))
    reconciler = Reconciler(
        store, kube, Settings(cluster_domain=args.cluster_domain, config=operator_config)
    )
    namespaces = [n for item in args.namespace for n in item.split(",") if n]
    asyncio.run(_operate(args, configuration, reconciler, store, namespaces))
    return 0


async def _operate(
    args: argparse.Namespace,
    configuration: client.Configuration,
    reconciler: Reconciler,
    store: Store,
    namespaces: list[str],
) -> None:
    elector = None
    if args.leader_elect:
        namespace = args.leader_election_namespace or _own_namespace()
        elector = LeaderElector(
            leader_client(configuration),
            namespace,
            lease_seconds=args.leader_election_lease_duration,
            renew_deadline=args.leader_election_renew_deadline,
            retry_period=args.leader_election_retry_period,
        )
    leading = elector.leading if elector else None
    controller = Controller(reconciler, store, workers=args.workers, leading=leading)
    controller.orphan_grace = args.orphan_grace
    controller.companions.append(_autoscaler(args, controller, reconciler, store))
    electing = asyncio.create_task(elector.run()) if elector else None
    try:
        await kopf.operator(
            registry=build_registry(reconciler.kube.versions),
            memo=kopf.Memo(
                controller=controller,
                configuration=configuration,
                metrics_address=args.metrics_address,
            ),
            clusterwide=not namespaces,
            namespaces=namespaces,
            standalone=True,
            identity=_identity(),
            liveness_endpoint=f"http://{args.health_address}/healthz",
        )
    finally:
        if electing is not None:
            electing.cancel()
            await asyncio.gather(electing, return_exceptions=True)
        # Released only once the workers stopped and their writes returned (kopf's
        # cleanup, on SIGTERM): a follower takes over at its next look, not a lease later.
        if elector is not None and controller.drained:
            await elector.release()


def _server_version(api: client.ApiClient, attempts: int = 30) -> tuple[int, int] | None:
    """The API server's version, which decides the children's API versions (policy/v1beta1
    before 1.21) and fields: asked until it answers (the operator can do nothing before
    that anyway), about a minute, then assumed current, loudly."""
    for attempt in range(attempts):
        try:
            return server_version(Kube(api).ping())
        except Exception as err:
            if attempt == attempts - 1:
                log.error("cannot read the API server's version (%s): assuming a current one", err)
                return None
            time.sleep(2.0)
    return None


def _autoscaler(
    args: argparse.Namespace, controller: Controller, reconciler: Reconciler, store: Store
) -> Autoscaler:
    """The autoscaler loop, fed by the gateways' load streams: the URLs given, else the
    gateway pods of the configured gateway namespace (and no other)."""
    config = reconciler.settings.config
    signal = Signal()
    gateways = Gateways(
        signal,
        urls=args.gateway_load_url,
        namespace=config.gateway_namespace or _own_namespace(),
        kubeconfig=args.kubeconfig,
    )
    autoscaler = Autoscaler(
        store, reconciler.kube, signal, gateways, config=config, write=controller.write
    )
    signal.on_change = autoscaler.demand_changed
    log.info("autoscaler: %s (while a backend has spec.autoscaling)", gateways.describe())
    return autoscaler


def _identity() -> Identity:
    """Who this operator process is, without kopf's default (the login name): the image
    runs as a numeric user with no passwd entry, where that lookup raises KeyError."""
    return Identity(f"{socket.gethostname()}/{os.getpid()}")


def _own_namespace() -> str:
    """The pod's namespace (the service account's), else POD_NAMESPACE, else default."""
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    if path.exists():
        return path.read_text().strip()
    return os.environ.get("POD_NAMESPACE", "default")


def _crd(args: argparse.Namespace) -> int:
    sys.stdout.write(crd_yaml(cel=not args.without_cel))
    return 0


class _NoAliases(yaml.SafeDumper):
    """Shared dicts (one volume mount in two containers) written out in full, not as
    &id001 anchors that make GitOps diffs unreadable."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def _render(args: argparse.Namespace) -> int:

    try:
        config = _load_operator_config(args.config)
    except (OSError, ValueError) as err:
        print(f"fabric-operator render: --config {args.config}: {err}", file=sys.stderr)
        return 2
    texts = []
    for item in args.file:
        path = Path(item)
        files = sorted(path.glob("*.y*ml")) if path.is_dir() else [path]
        try:
            texts += [sys.stdin.read() if item == "-" else f.read_text() for f in files]
        except OSError as err:
            print(f"fabric-operator render: {err}", file=sys.stderr)
            return 2
    try:
        docs = [
            d
            for t in texts
            for d in yaml.safe_load_all(t)
            if isinstance(d, dict) and d.get("kind") == "LLMBackend"
        ]
    except yaml.YAMLError as err:
        print(f"fabric-operator render: {err}", file=sys.stderr)
        return 2
    if not docs:
        print(f"{' '.join(args.file)}: no LLMBackend found", file=sys.stderr)
        return 1
    out, failed = [], False
    for doc in docs:
        backend, problems = validate(doc, config)
        name = (doc.get("metadata") or {}).get("name", "?")
        if backend is None or problems:
            failed = True
            for problem in problems:
                print(f"{name}: {problem}", file=sys.stderr)
            continue
        if backend.spec.remote is None:  # a remote backend is a route only: no children
            out.extend(render(backend, config).all())
    sys.stdout.write(yaml.dump_all(out, Dumper=_NoAliases, sort_keys=False))
    return 1 if failed else 0


def _check(args: argparse.Namespace) -> int:
    """What `helm test` runs: the operator answers its health endpoint, and the API serves
    LLMBackends to the operator's ServiceAccount."""
    try:
        with urllib.request.urlopen(args.health_url, timeout=10) as resp:
            health = json.loads(resp.read()).get("controller", {})
    except (OSError, ValueError) as err:
        print(f"operator health {args.health_url}: {err}", file=sys.stderr)
        return 1
    _load_config(args.kubeconfig)
    api = client.CustomObjectsApi()
    try:
        if args.namespace:
            api.list_namespaced_custom_object(GROUP, VERSION, args.namespace, PLURAL, limit=1)
        else:
            api.list_cluster_custom_object(GROUP, VERSION, PLURAL, limit=1)
    except ApiException as err:
        print(f"listing {PLURAL}.{GROUP}: {err.status} {err.reason}", file=sys.stderr)
        return 1
    print(
        f"ok: operator healthy ({health.get('backends', '?')} backends), "
        f"{PLURAL}.{GROUP}/{VERSION} served"
    )
    return 0


def _load_config(kubeconfig: str | None) -> None:
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]


def _kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    """kubectl's output (the caller prints what matters; stderr goes to the user)."""
    return subprocess.run(
        ["kubectl", f"--kubeconfig={kubeconfig}", *args],
        input=stdin,
        text=True,
        check=True,
        stdout=subprocess.PIPE,
    ).stdout


def _dev(args: argparse.Namespace) -> int:
    """Operator plus the example LLMBackends, on a local control plane unless told where."""

    repo = Path(__file__).resolve().parents[2]
    kubeconfig = args.kubeconfig or os.environ.get("KUBECONFIG")
    plane = None
    if not kubeconfig:
        workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fabric-dev-"))
        print("no kubeconfig given: starting a local control plane ...", flush=True)
        plane = LocalControlPlane(workdir, find_binaries(repo)).start()
        kubeconfig = str(plane.kubeconfig)
    try:
        kc = Path(kubeconfig)
        version = _kubectl(kc, "version", "-o", "json")
        _kubectl(kc, "apply", "-f", "-", stdin=crd_yaml_for_server(version))
        wait_established(lambda *a: _kubectl(kc, *a))
        examples = repo / "examples"
        if examples.is_dir() and not args.no_examples:
            _kubectl(kc, "apply", "-f", str(examples))
        print(f"\n  export KUBECONFIG={kubeconfig}\n  kubectl get llmb -A\n", flush=True)
        args.kubeconfig = kubeconfig
        return _run_operator(args)
    finally:
        if plane is not None:
            plane.stop()


def _gateway(args: argparse.Namespace) -> int:
    from fabric_operator.gateway import server as gateway_server  # noqa: PLC0415 - see main

    if args.config:
        args.config = Path(args.config)
    return gateway_server.run(args)


def _add_operator_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kubeconfig", help="kubeconfig file (default: in-cluster, $KUBECONFIG, ~/.kube/config)"
    )
    p.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="watch only these namespaces (repeatable or comma-separated; default: all)",
    )
    p.add_argument("--workers", type=int, default=4, help="concurrent reconciles (default 4)")
    p.add_argument(
        "--cluster-domain",
        default="cluster.local",
        help="cluster DNS domain used in status.endpoint",
    )
    p.add_argument(
        "--health-address", default="0.0.0.0:8080", help="host:port of the /healthz endpoint"
    )
    p.add_argument(
        "--metrics-address",
        default="0.0.0.0:8081",
        help="host:port of the Prometheus /metrics endpoint (empty: off)",
    )
    p.add_argument(
        "--config",
        help="operator configuration file (YAML: labelScheme, accelerators, gpuTolerations, "
        "networkPolicy, gatewayNamespace, remoteHosts, remoteHttpHosts)",
    )
    p.add_argument(
        "--leader-elect",
        action="store_true",
        help="reconcile only while holding the fabric-operator Lease (for several replicas)",
    )
    p.add_argument(
        "--leader-election-namespace",
        help="namespace of the Lease (default: the pod's own namespace)",
    )
    p.add_argument(
        "--leader-election-lease-duration",
        type=float,
        default=LEASE_SECONDS,
        help="seconds a follower waits after the Lease last changed before taking it over "
        f"(default {LEASE_SECONDS:.0f})",
    )
    p.add_argument(
        "--leader-election-renew-deadline",
        type=float,
        default=RENEW_DEADLINE,
        help="seconds the leader goes on without renewing the Lease before it stops "
        f"(default {RENEW_DEADLINE:.0f}; less than the lease duration)",
    )
    p.add_argument(
        "--leader-election-retry-period",
        type=float,
        default=RETRY_PERIOD,
        help=f"seconds between two tries to renew or take the Lease (default {RETRY_PERIOD:.0f})",
    )
    p.add_argument(
        "--gateway-load-url",
        action="append",
        default=[],
        metavar="URL",
        help="a gateway replica's load endpoint (http://HOST:PORT/load; repeatable) for the "
        "autoscaler, instead of discovering the gateway pods of the gateway namespace "
        "(out-of-cluster runs and tests)",
    )
    p.add_argument(
        "--orphan-grace",
        type=float,
        default=30.0,
        help="seconds the garbage collector gets to delete a deleted LLMBackend's children "
        "before the operator deletes those still running (default 30)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fabric-operator", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("--log-level", default=os.environ.get("FABRIC_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the operator against a cluster")
    _add_operator_flags(run)
    run.set_defaults(func=_run_operator)

    crd = sub.add_parser("crd", help="print the LLMBackend CRD (YAML)")
    crd.add_argument(
        "--without-cel",
        action="store_true",
        help="leave out the CEL rules (x-kubernetes-validations), for Kubernetes before 1.25",
    )
    crd.set_defaults(func=_crd)

    render = sub.add_parser("render", help="print the children of LLMBackend manifests")
    render.add_argument(
        "file", nargs="+", help="YAML files or folders with LLMBackends, or - for stdin"
    )
    render.add_argument("--config", help="operator configuration file, as for `run`")
    render.set_defaults(func=_render)

    check = sub.add_parser("check", help="check a running operator (used by `helm test`)")
    check.add_argument("--health-url", required=True, help="the operator's /healthz URL")
    check.add_argument("--namespace", help="list LLMBackends in this namespace only")
    check.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster)")
    check.set_defaults(func=_check)

    dev = sub.add_parser("dev", help="local control plane + CRD + examples + operator")
    _add_operator_flags(dev)
    dev.add_argument("--workdir", help="where the local cluster keeps its files")
    dev.add_argument("--no-examples", action="store_true", help="do not apply examples/")
    dev.set_defaults(func=_dev)

    usage = sub.add_parser(
        "usage", help="tokens per tenant and model over a period, from Prometheus"
    )
    usagereport.add_flags(usage)
    usage.set_defaults(func=usagereport.run)

    gateway = sub.add_parser(
        "gateway",
        help="serve one OpenAI-compatible endpoint in front of the LLMBackends",
        add_help=False,
    )
    gateway.set_defaults(func=_gateway)
    # The gateway's flags come with its imports (uvicorn, prometheus_client: 4.5 MB more
    # resident in the operator), so they are added only when it is the command.
    if parser.parse_known_args(argv)[0].command == "gateway":
        from fabric_operator.gateway import server as gateway_server  # noqa: PLC0415

        gateway.add_argument("-h", "--help", action="help", help="show this help and exit")
        gateway_server.add_flags(gateway)

    args = parser.parse_args(argv)
    if getattr(args, "leader_elect", False):
        try:
            check_durations(
                args.leader_election_lease_duration,
                args.leader_election_renew_deadline,
                args.leader_election_retry_period,
            )
        except ValueError as err:
            parser.error(f"leader election: {err}")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # kopf reports every handled watch event at INFO, aiohttp every health probe.
    for noisy in ("kubernetes", "kopf.objects", "aiohttp.access", "kopf.activities.probe"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.root.level))
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except subprocess.CalledProcessError as err:  # kubectl already said what went wrong
        print(f"fabric-operator: {' '.join(map(str, err.cmd[:3]))} ... failed", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
