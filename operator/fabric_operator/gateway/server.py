"""`fabric-operator gateway`: the proxy on uvicorn, its snapshot source, its metrics."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import start_http_server

from fabric_operator.config import host_pattern_error
from fabric_operator.gateway.kubewatch import ApiClient
from fabric_operator.gateway.metrics import GatewayMetrics
from fabric_operator.gateway.proxy import Gateway, Settings
from fabric_operator.gateway.routes import DEFAULT_KEY_SELECTOR
from fabric_operator.gateway.sources import FileSource, KubeSource, Source
from fabric_operator.gateway.upstream import CLIENTS
from fabric_operator.remotehosts import DEFAULT_HOSTS, RemoteHosts

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class JSONFormatter(logging.Formatter):
    """One JSON object per line: what log pipelines parse without rules of their own."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host or "0.0.0.0", int(port)


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="0.0.0.0:8000", help="host:port to serve on")
    p.add_argument(
        "--metrics-address",
        default="0.0.0.0:9090",
        help="host:port of the Prometheus /metrics endpoint (empty: off)",
    )
    p.add_argument(
        "--config",
        help="static backends and tenants (YAML) instead of watching a cluster",
    )
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, $KUBECONFIG)")
    p.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="route to LLMBackends and read keys in these namespaces only (default: all); "
        "admin keys are read in the gateway's own namespace too",
    )
    p.add_argument(
        "--namespace-of-gateway",
        help="the gateway's own namespace, the only one whose key Secrets may grant other "
        "namespaces (default: the pod's, from its service account, else $POD_NAMESPACE; "
        "neither: no key grants more than its own namespace)",
    )
    p.add_argument(
        "--remote-hosts",
        type=_hosts,
        default=DEFAULT_HOSTS,
        help="comma-separated hosts `engine: remote` backends may call over https (exact, "
        f"or '*.' and a domain; default {','.join(DEFAULT_HOSTS)}; empty: none)",
    )
    p.add_argument(
        "--remote-http-hosts",
        type=_hosts,
        default=(),
        help="comma-separated hosts remote backends may also call over plain http (default: none)",
    )
    p.add_argument(
        "--key-selector",
        default=DEFAULT_KEY_SELECTOR,
        help=f"label selector of the tenant key Secrets (default {DEFAULT_KEY_SELECTOR})",
    )
    p.add_argument(
        "--no-keys",
        action="store_true",
        help="accept requests without a key, for every model (development only)",
    )
    p.add_argument(
        "--via-service",
        action="store_true",
        help="send requests to each backend's Service instead of its ready pod addresses",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="seconds to wait for an upstream's first byte before falling back (default 600)",
    )
    p.add_argument("--no-access-log", action="store_true", help="do not log each request")
    p.add_argument(
        "--upstream-client",
        choices=sorted(CLIENTS),
        default="aiohttp",
        help="HTTP client for upstreams (default aiohttp; see bench/README.md)",
    )


def _hosts(text: str) -> tuple[str, ...]:
    """A comma-separated allow-list; an entry that is no host pattern (a URL, a port) is
    refused at start instead of silently allowing nothing."""
    hosts = tuple(h.strip() for h in text.split(",") if h.strip())
    for host in hosts:
        why = host_pattern_error(host)
        if why:
            raise argparse.ArgumentTypeError(why)
    return hosts


def gateway_namespace(flag: str | None) -> str | None:
    """The namespace whose key Secrets are the admin's: the flag, else the pod's own (its
    service account's), else $POD_NAMESPACE. None outside a pod without either: never a
    guess such as "default", where anyone might create a key."""
    if flag:
        return flag
    if SERVICE_ACCOUNT_NAMESPACE.exists():
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or None
    return os.environ.get("POD_NAMESPACE") or None


def run(args: argparse.Namespace) -> int:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    logging.root.handlers = [handler]
    for noisy in ("httpx", "httpcore"):  # a line per upstream request: the access log says it
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        import uvloop  # noqa: PLC0415 - optional: not on every platform
    except ImportError:
        return asyncio.run(_serve(args))
    return uvloop.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    source: Source
    api: ApiClient | None = None
    if args.config:
        source = FileSource(args.config)
    else:
        api = ApiClient(args.kubeconfig)
        namespaces = [n for item in args.namespace for n in item.split(",") if n]
        admin = gateway_namespace(args.namespace_of_gateway)
        hosts = RemoteHosts.of(args.remote_hosts, args.remote_http_hosts)
        log.info(
            "admin keys: %s; remote hosts: https %s, http %s",
            f"key Secrets in namespace {admin}" if admin else "none (no gateway namespace)",
            ",".join(hosts.https) or "none",
            ",".join(hosts.http) or "none",
        )
        source = KubeSource(
            api,
            namespaces,
            args.key_selector,
            via_service=args.via_service,
            require_keys=not args.no_keys,
            gateway_namespace=admin,
            remote_hosts=hosts,
        )
    if args.metrics_address:
        host, port = _split(args.metrics_address)
        start_http_server(port, host)
    gateway = Gateway(
        source,
        GatewayMetrics(),
        Settings(
            timeout=args.timeout,
            access_log=not args.no_access_log,
            client=args.upstream_client,
        ),
    )
    host, port = _split(args.address)
    server = uvicorn.Server(
        uvicorn.Config(
            gateway,
            host=host,
            port=port,
            loop="none",
            http="httptools",
            lifespan="off",
            access_log=False,
            server_header=False,
            date_header=False,
            log_config=None,
            backlog=4096,
        )
    )
    watching = asyncio.create_task(source.run())
    log.info("gateway listening on %s:%s", host, port)
    try:
        await server.serve()
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        await gateway.aclose()
        if api is not None:
            await api.close()
    return 0
