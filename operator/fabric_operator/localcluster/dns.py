"""A minimal authoritative DNS server for the local cluster's Service names.

The local cluster has no cluster DNS, yet pods (the Helm chart's test pod, for one) call
Services by name: NAME.NS.svc.cluster.local. This server answers exactly those names, from
the API server, and nothing else: every other name under the domain is NXDOMAIN, names
outside it are REFUSED, and it never recurses, so no query ever leaves the cluster.

    python -m fabric_operator.localcluster.dns --listen-netns /proc/PID/ns/net \\
        --listen 0.0.0.0:53 --kubeconfig KUBECONFIG [--domain cluster.local]

UDP and TCP on the same address. Prints `listening` on stdout once both sockets exist.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import ipaddress
import json
import re
import socket
import ssl
import struct
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import yaml

from fabric_operator.localcluster.nsutil import in_netns

A, AAAA, ANY, IN = 1, 28, 255, 1
NOERROR, SERVFAIL, NXDOMAIN, REFUSED = 0, 2, 3, 5
TTL = 5
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")

# (namespace, name) -> the Service's IPv4 addresses, [] if it has none, None if no such
# Service; raises when it cannot tell (API server down, ...): the answer is SERVFAIL.
Lookup = Callable[[str, str], list[str] | None]


@dataclass(frozen=True)
class Query:
    id: int
    flags: int
    labels: tuple[str, ...]  # lower case: DNS names are case-insensitive
    qtype: int
    qclass: int
    question: bytes  # as received, case included (0x20 randomisation): echoed back


def parse(data: bytes) -> Query | None:
    """A standard query with one question, else None (such packets get no answer). Each
    step moves forward, so no packet can make it loop; compression pointers (never in
    queries, in practice) count as malformed."""
    if len(data) < 12:
        return None
    qid, flags, qdcount = struct.unpack_from("!HHH", data)
    if flags & 0x8000 or (flags >> 11) & 0xF or qdcount != 1:
        return None
    labels, i = [], 12
    while i < len(data) and (n := data[i]) != 0:
        if n & 0xC0 or i + 1 + n > len(data) or i + 1 + n - 12 > 254:
            return None
        labels.append(data[i + 1 : i + 1 + n].decode("latin-1").lower())
        i += 1 + n
    if i + 5 > len(data):
        return None
    qtype, qclass = struct.unpack_from("!HH", data, i + 1)
    return Query(qid, flags, tuple(labels), qtype, qclass, data[12 : i + 5])


def answer(q: Query, domain: tuple[str, ...], lookup: Lookup) -> tuple[int, list[str]]:
    """The response code and the A records' addresses for `q`."""
    name = q.labels
    if q.qclass != IN or len(name) < len(domain) or name[len(name) - len(domain) :] != domain:
        return REFUSED, []
    rel = name[: len(name) - len(domain)]
    # Valid labels only: they become part of an API path.
    if len(rel) != 3 or rel[2] != "svc" or not all(_LABEL.fullmatch(x) for x in rel[:2]):
        return NXDOMAIN, []
    try:
        addrs = lookup(rel[1], rel[0])
    except Exception:  # whatever went wrong, the resolver gets an answer
        return SERVFAIL, []
    if addrs is None:
        return NXDOMAIN, []
    return NOERROR, addrs if q.qtype in (A, ANY) else []


def response(q: Query, rcode: int, addrs: Sequence[str], limit: int = 65535) -> bytes:
    """QR, AA, RD copied, RA=0. Over `limit` bytes (512: UDP without EDNS) the answers
    are left out and TC set, so the resolver asks again over TCP."""
    flags = 0x8000 | 0x0400 | (q.flags & 0x0100) | rcode
    if 12 + len(q.question) + 16 * len(addrs) > limit:
        flags, addrs = flags | 0x0200, []
    records = b"".join(
        struct.pack("!HHHIH", 0xC00C, A, IN, TTL, 4) + socket.inet_aton(a) for a in addrs
    )
    return struct.pack("!6H", q.id, flags, 1, len(addrs), 0, 0) + q.question + records


def resolve(data: bytes, domain: tuple[str, ...], lookup: Lookup, limit: int) -> bytes | None:
    q = parse(data)
    return None if q is None else response(q, *answer(q, domain, lookup), limit)


def _ipv4(addrs: Sequence[Any]) -> list[str]:
    return [a for a in addrs if isinstance(a, str) and ipaddress.ip_address(a).version == 4]


class ApiLookup:
    """Services from the API server: one GET per name asked, each answer (also "no such
    Service") kept `ttl` seconds. Per name rather than a list of all Services: pods ask
    for a handful of names, so this costs a small request per name every `ttl` seconds
    at most, whatever the cluster holds, and a headless Service's Endpoints come the same
    way. http.client, not urllib: no proxy settings from the environment apply."""

    def __init__(self, server: str, context: ssl.SSLContext, ttl: float = 2.0) -> None:
        url = urlsplit(server)
        self.host, self.port, self.prefix = url.hostname or "", url.port or 443, url.path
        self.context, self.ttl = context, ttl
        self._cache: dict[tuple[str, str], tuple[float, list[str] | None]] = {}

    @classmethod
    def from_kubeconfig(cls, path: Path) -> ApiLookup:
        server, ca, cert, key = read_kubeconfig(path)
        context = ssl.create_default_context(cafile=ca)
        context.load_cert_chain(cert, key)
        return cls(server, context)

    def path(self, kind: str, namespace: str, name: str) -> str:
        ns, n = quote(namespace, safe=""), quote(name, safe="")
        return f"{self.prefix.rstrip('/')}/api/v1/namespaces/{ns}/{kind}/{n}"

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        path = self.path(kind, namespace, name)
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.context, timeout=3)
        try:
            conn.request("GET", path, headers={"Accept": "application/json"})
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise OSError(f"GET {path}: HTTP {resp.status}")
        obj: dict[str, Any] = json.loads(body)
        return obj

    def __call__(self, namespace: str, name: str) -> list[str] | None:
        now, key = time.monotonic(), (namespace, name)
        if (hit := self._cache.get(key)) and hit[0] > now:
            return hit[1]
        addrs = self._fetch(namespace, name)
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[key] = (now + self.ttl, addrs)
        return addrs

    def _fetch(self, namespace: str, name: str) -> list[str] | None:
        svc = self.get("services", namespace, name)
        if svc is None:
            return None
        ip = svc.get("spec", {}).get("clusterIP")
        if ip != "None":  # ExternalName Services have none: the name exists, no A record
            return _ipv4([ip]) if ip else []
        ep = self.get("endpoints", namespace, name) or {}
        return _ipv4(
            [a.get("ip") for s in ep.get("subsets") or [] for a in s.get("addresses") or []]
        )


def read_kubeconfig(path: Path) -> tuple[str, str, str, str]:
    """Server URL, CA, client certificate and key (relative paths from the file's folder,
    as kubectl reads them) of the current context."""
    cfg = yaml.safe_load(path.read_text())
    ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == cfg["current-context"])
    cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
    user = next(u["user"] for u in cfg["users"] if u["name"] == ctx["user"])
    files = (cluster["certificate-authority"], user["client-certificate"], user["client-key"])
    ca, cert, key = (str(path.parent / f) for f in files)
    return cluster["server"], ca, cert, key


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, received: Callable[[bytes, Any], None]) -> None:
        self.received = received

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.received(data, addr)


async def serve(listen: tuple[str, int], netns: str | None, domain: str, lookup: Lookup) -> None:
    """Lookups run in threads, so a slow API server holds up only the queries that wait
    for it."""
    loop = asyncio.get_running_loop()
    labels = tuple(domain.lower().strip(".").split("."))
    with in_netns(netns) if netns else contextlib.nullcontext():
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    udp.bind(listen)
    tcp.bind(listen)
    tcp.listen(64)
    for s in (udp, tcp):
        s.setblocking(False)
    tasks: set[asyncio.Task[None]] = set()

    async def reply(data: bytes, addr: Any) -> None:
        if out := await loop.run_in_executor(None, resolve, data, labels, lookup, 512):
            transport.sendto(out, addr)

    def received(data: bytes, addr: Any) -> None:
        task = loop.create_task(reply(data, addr))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, OSError):
            while True:
                size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 30), "big")
                data = await reader.readexactly(size)
                out = await loop.run_in_executor(None, resolve, data, labels, lookup, 65535)
                if out is None:
                    break
                writer.write(len(out).to_bytes(2, "big") + out)
                await writer.drain()
        writer.close()

    transport, _ = await loop.create_datagram_endpoint(lambda: _Datagrams(received), sock=udp)
    server = await asyncio.start_server(stream, sock=tcp)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--listen", required=True, help="IP:PORT to listen on (UDP and TCP)")
    p.add_argument("--listen-netns", help="network namespace file to listen in")
    p.add_argument("--kubeconfig", required=True, type=Path, help="the admin's kubeconfig")
    p.add_argument("--domain", default="cluster.local", help="the cluster's DNS domain")
    args = p.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    lookup = ApiLookup.from_kubeconfig(args.kubeconfig)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve((host, int(port)), args.listen_netns, args.domain, lookup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
