"""`fabric-operator gateway`: the proxy on uvicorn, its snapshot source, its metrics."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import uvicorn
from prometheus_client import REGISTRY
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fabric_operator.config import host_pattern_error
from fabric_operator.gateway import opsserver
from fabric_operator.gateway.enginequeue import SCRAPE_SECONDS, EngineQueues
from fabric_operator.gateway.kubewatch import ApiClient
from fabric_operator.gateway.limits import Limits, LimitsCollector
from fabric_operator.gateway.metrics import GatewayMetrics, LoadCollector
from fabric_operator.gateway.proxy import MIB, Gateway, QuietAborts, Settings
from fabric_operator.gateway.routes import DEFAULT_KEY_SELECTOR
from fabric_operator.gateway.sharedlimit import SharedLimits
from fabric_operator.gateway.sources import FileSource, KubeSource, Source
from fabric_operator.gateway.upstream import CLIENTS
from fabric_operator.remotehosts import DEFAULT_HOSTS, RemoteHosts

log = logging.getLogger(__name__)

REDIS_PASSWORD_ENV = "FABRIC_REDIS_PASSWORD"  # the variable's name
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


LINGER_SECONDS = 1.0


class _LingeringTransport:
    """A connection's transport as uvicorn sees it, but for `close`: the answer goes out,
    then a FIN, and what the client still sends is dropped unread until it closes too,
    or LINGER_SECONDS have passed; only then is the connection closed."""

    def __init__(self, transport: asyncio.Transport, protocol: LingeringProtocol) -> None:
        self._transport, self._protocol = transport, protocol
        self._closing = False
        self._linger: asyncio.TimerHandle | None = None
        # What uvicorn calls per request, bound once (not looked up through __getattr__).
        self.write = transport.write
        self.pause_reading = transport.pause_reading
        self.resume_reading = transport.resume_reading
        self.get_extra_info = transport.get_extra_info

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        transport = self._transport
        if transport.is_closing() or not transport.can_write_eof():
            transport.close()
            return
        self._protocol.lingering = True
        transport.write_eof()  # after what is buffered
        transport.resume_reading()
        self._linger = asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)

    def closed(self) -> None:
        """The connection is gone: its linger timer, holding it (and its request's
        buffers) for up to LINGER_SECONDS, goes too."""
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None


class LingeringProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools), closing as an HTTP server must when a
    request's body may be left unread (RFC 9112 9.6, "lingering close"): the gateway
    answers 401, 413 or 429 without reading the body and with `connection: close`, and a
    socket closed with bytes unread is reset by the kernel, which can destroy the answer
    before a client still sending its body reads it. Lingering, the client gets the
    answer, and the gateway still reads no more than a second's worth, unparsed."""

    lingering = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._lingering = _LingeringTransport(cast(asyncio.Transport, transport), self)
        super().connection_made(cast(asyncio.Transport, self._lingering))

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._lingering.closed()

    def data_received(self, data: bytes) -> None:
        if not self.lingering:
            super().data_received(data)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host or "0.0.0.0", int(port)


def add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="0.0.0.0:8000", help="host:port to serve on")
    p.add_argument(
        "--metrics-address",
        default="0.0.0.0:9090",
        help="host:port of the platform's port: Prometheus /metrics and the autoscaler's "
        "/load (empty: off)",
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
        f"or '*.' and a domain; default: the {len(DEFAULT_HOSTS)} hosts of the documented "
        "providers, README 'Remote providers'; empty: none)",
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
    d = Settings()
    p.add_argument(
        "--first-byte-timeout",
        "--timeout",
        dest="first_byte_timeout",
        type=_positive_float,
        default=d.first_byte_timeout,
        help="seconds to wait for the first byte of an answer from the last backend to try "
        "(nothing left to fall back to); a non-streaming answer's first byte comes when it "
        f"is generated, so this also bounds those (default {d.first_byte_timeout:g}; "
        "--timeout is the same flag)",
    )
    p.add_argument(
        "--fallback-timeout",
        type=_positive_float,
        default=d.fallback_timeout,
        help="seconds to wait for the first byte of an answer when another backend could "
        "answer instead, then it is tried (at most --first-byte-timeout; default "
        f"{d.fallback_timeout:g})",
    )
    p.add_argument(
        "--connect-timeout",
        type=_positive_float,
        default=d.connect_timeout,
        help=f"seconds to connect to an upstream (default {d.connect_timeout:g})",
    )
    p.add_argument(
        "--idle-timeout",
        type=_positive_float,
        default=d.idle_timeout,
        help="seconds an answer that began may go without a byte, then it is cut off and "
        f"the client's connection closed (default {d.idle_timeout:g})",
    )
    p.add_argument(
        "--pool-timeout",
        type=_positive_float,
        default=d.pool_timeout,
        help="seconds a request waits for a free connection to a saturated upstream, then "
        f"it falls back or gets a 503 (default {d.pool_timeout:g})",
    )
    p.add_argument(
        "--max-connections-per-upstream",
        type=_positive_int,
        default=d.max_per_upstream,
        help="requests in flight to each upstream (a backend's replica or remote URL) at "
        f"most (default {d.max_per_upstream})",
    )
    p.add_argument(
        "--max-body-mib",
        type=_positive_float,
        default=d.max_body / MIB,
        help="largest request body in MiB, larger ones get a 413 unread (default "
        f"{d.max_body / MIB:g})",
    )
    p.add_argument(
        "--max-held-requests",
        type=_positive_int,
        default=d.max_held,
        help="requests held at once for autoscaled backends without a ready pod, all "
        f"backends together (each backend also has its own cap; default {d.max_held})",
    )
    p.add_argument(
        "--max-held-mib",
        type=_positive_float,
        default=d.max_held_bytes / MIB,
        help="request bodies held at once, in MiB, all backends together (default "
        f"{d.max_held_bytes / MIB:g})",
    )
    p.add_argument(
        "--engine-metrics-interval",
        type=_positive_float,
        default=SCRAPE_SECONDS,
        help="seconds between reads of the engines' queue gauges (autoscaled vllm, tgi and "
        f"llamacpp backends; reported on /load) (default {SCRAPE_SECONDS:g})",
    )
    p.add_argument(
        "--redis-url",
        type=_redis_url,
        default=os.environ.get("FABRIC_REDIS_URL") or None,
        help="share the keys' rpm and tpm limits between gateway replicas through this "
        "Redis (redis://HOST:PORT/DB or rediss://; the password comes from "
        f"${REDIS_PASSWORD_ENV}, never the command line; default $FABRIC_REDIS_URL; "
        "unset: per-replica limits)",
    )
    p.add_argument(
        "--redis-timeout",
        type=_positive_float,
        default=0.05,
        help="seconds a limit check may wait for Redis before the limits fall back to per "
        "replica until Redis answers again (default 0.05)",
    )
    p.add_argument("--no-access-log", action="store_true", help="do not log each request")
    p.add_argument(
        "--upstream-client",
        choices=sorted(CLIENTS),
        default="aiohttp",
        help="HTTP client for upstreams (default aiohttp; see bench/README.md)",
    )


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _redis_url(text: str) -> str:
    """A Redis URL without a password: one in the URL would be in the process's args
    (and the pod's spec) for anyone who may list them. Refused at start, unquoted."""
    parts = urlsplit(text)
    if parts.scheme not in ("redis", "rediss"):
        raise argparse.ArgumentTypeError("the Redis URL must start with redis:// or rediss://")
    if parts.password is not None or "password=" in parts.query:
        raise argparse.ArgumentTypeError(
            f"the Redis URL carries a password: give it in ${REDIS_PASSWORD_ENV} instead"
        )
    return text


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


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
    # An answer cut off on purpose is logged by the gateway, not as uvicorn's traceback.
    logging.getLogger("uvicorn.error").addFilter(QuietAborts())
    try:
        import uvloop  # noqa: PLC0415 - optional: not on every platform
    except ImportError:
        return asyncio.run(_serve(args))
    return uvloop.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    source: Source
    api: ApiClient | None = None
    hosts = RemoteHosts.of(args.remote_hosts, args.remote_http_hosts)
    if args.config:
        source = FileSource(args.config, hosts)
    else:
        api = ApiClient(args.kubeconfig)
        namespaces = [n for item in args.namespace for n in item.split(",") if n]
        admin = gateway_namespace(args.namespace_of_gateway)
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
    shared = None
    if args.redis_url:
        shared = SharedLimits(
            args.redis_url, os.environ.get(REDIS_PASSWORD_ENV), timeout=args.redis_timeout
        )
        await shared.start()
    limits = Limits(shared)
    gateway = Gateway(
        source,
        GatewayMetrics(),
        Settings(
            first_byte_timeout=args.first_byte_timeout,
            fallback_timeout=args.fallback_timeout,
            connect_timeout=args.connect_timeout,
            idle_timeout=args.idle_timeout,
            pool_timeout=args.pool_timeout,
            max_per_upstream=args.max_connections_per_upstream,
            max_body=int(args.max_body_mib * MIB),
            max_held=args.max_held_requests,
            max_held_bytes=int(args.max_held_mib * MIB),
            access_log=not args.no_access_log,
            client=args.upstream_client,
        ),
        limits,
    )
    ops = None
    if args.metrics_address:
        REGISTRY.register(LoadCollector(gateway.load))
        REGISTRY.register(LimitsCollector(limits))
        ops = await opsserver.start(gateway.load, *_split(args.metrics_address))
    host, port = _split(args.address)
    server = uvicorn.Server(
        uvicorn.Config(
            gateway,
            host=host,
            port=port,
            loop="none",
            http=LingeringProtocol,
            lifespan="off",
            access_log=False,
            server_header=False,
            date_header=False,
            log_config=None,
            backlog=4096,
        )
    )
    # What exists now (modules, settings, a static file's routes) lives as long as the
    # process: kept out of the collector's full passes, which otherwise walk all of it
    # (measured under bench/gateway's load: ~8 % of the gateway's CPU, and ~1 % after).
    gc.collect()
    gc.freeze()
    watching = asyncio.create_task(source.run())
    # Engines' own queue gauges, for /load (autoscaled backends; nothing without /load).
    queues = (
        asyncio.create_task(
            EngineQueues(
                lambda: source.snapshot, gateway.load, interval=args.engine_metrics_interval
            ).run()
        )
        if args.metrics_address
        else None
    )
    log.info("gateway listening on %s:%s", host, port)
    try:
        await server.serve()
    finally:
        background = [t for t in (watching, queues) if t is not None]
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await gateway.aclose()
        if shared is not None:
            await shared.close()
        if ops is not None:
            await ops.cleanup()
        if api is not None:
            await api.close()
    return 0
