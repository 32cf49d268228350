"""The local cluster's Service DNS server: packets, answers, the API lookup, the process.

The API lookup is tested against a small HTTPS server on 127.0.0.1 that requires the
client certificate, with certificates from the local cluster's own `pki`; all DNS traffic
goes to 127.0.0.1 too.
"""

from __future__ import annotations

import json
import os
import random
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import pytest

import fabric_operator
from fabric_operator.localcluster import dns, free_port, pki

DOMAIN = ("cluster", "local")
SERVICES = {("default", "web"): ["10.96.0.10"], ("ns1", "headless"): []}


def fake_lookup(namespace: str, name: str) -> list[str] | None:
    return SERVICES.get((namespace, name))


def query(name: str, qtype: int = dns.A, qid: int = 0x1234, rd: bool = True) -> bytes:
    labels = b"".join(bytes([len(x)]) + x.encode() for x in name.strip(".").split(".") if x)
    head = struct.pack("!6H", qid, 0x0100 if rd else 0, 1, 0, 0, 0)
    return head + labels + b"\0" + struct.pack("!HH", qtype, dns.IN)


def decode(packet: bytes) -> dict[str, Any]:
    """Header fields and the A records of a response (names as compression pointers)."""
    qid, flags, qd, an, ns, ar = struct.unpack_from("!6H", packet)
    i = 12
    while packet[i]:
        i += 1 + packet[i]
    i += 5
    answers = []
    for _ in range(an):
        ptr, rtype, rclass, ttl, rdlen = struct.unpack_from("!HHHIH", packet, i)
        assert (ptr, rtype, rclass, rdlen) == (0xC00C, dns.A, dns.IN, 4)
        answers.append((socket.inet_ntoa(packet[i + 12 : i + 16]), ttl))
        i += 16
    assert i == len(packet)
    return {
        "id": qid,
        "qr": bool(flags & 0x8000),
        "opcode": (flags >> 11) & 0xF,
        "aa": bool(flags & 0x0400),
        "tc": bool(flags & 0x0200),
        "rd": bool(flags & 0x0100),
        "ra": bool(flags & 0x0080),
        "rcode": flags & 0xF,
        "counts": (qd, an, ns, ar),
        "question": packet[12 : len(packet) - 16 * an],
        "answers": answers,
    }


def ask(name: str, qtype: int = dns.A, lookup: dns.Lookup = fake_lookup) -> dict[str, Any]:
    out = dns.resolve(query(name, qtype), DOMAIN, lookup, 512)
    assert out is not None
    return decode(out)


# -- packets -------------------------------------------------------------------------


def test_parse_a_query() -> None:
    packet = query("Web.Default.SVC.cluster.LOCAL.", dns.AAAA, qid=7)
    q = dns.parse(packet)
    assert q is not None
    assert (q.id, q.qtype, q.qclass) == (7, dns.AAAA, dns.IN)
    assert q.labels == ("web", "default", "svc", "cluster", "local")
    assert q.question == packet[12:]  # case kept for the echo


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        b"\x12\x34\x01\x00\x00\x01",  # shorter than a header
        query("a.b")[:-2],  # no class
        query("a.b")[:14],  # label runs past the end
        query("a.b")[:-5],  # no terminating label
        bytes([query("a.b")[0], query("a.b")[1], 0x81]) + query("a.b")[3:],  # QR: a response
        query("a.b")[:2] + b"\x10\x00" + query("a.b")[4:],  # opcode 2 (status)
        query("a.b")[:4] + b"\x00\x02" + query("a.b")[6:],  # two questions
        query("a.b")[:4] + b"\x00\x00" + query("a.b")[6:],  # none
        query("a.b")[:12] + b"\xc0\x0c" + b"\0\1\0\1",  # pointer to itself
        query("a.b")[:12] + b"\x01a\xc0\x0c" + b"\0\1\0\1",  # pointer back to the name
        query("a.b")[:12] + b"\x3fx" * 5 + b"\0\0\1\0\1",  # label lengths past the data
        query(".".join(["a" * 60] * 5)),  # name longer than 255 bytes
    ],
)
def test_malformed_queries_are_ignored(packet: bytes) -> None:
    assert dns.parse(packet) is None
    assert dns.resolve(packet, DOMAIN, fake_lookup, 512) is None


def test_random_bytes_never_raise() -> None:
    rng = random.Random(42)
    base = query("web.default.svc.cluster.local")
    for _ in range(5000):
        if rng.random() < 0.5:
            packet = bytearray(rng.randbytes(rng.randrange(40)))
        else:  # a real query with a few bytes flipped or cut
            packet = bytearray(base[: rng.randrange(len(base) + 1)])
            for _ in range(3):
                if packet:
                    packet[rng.randrange(len(packet))] = rng.randrange(256)
        out = dns.resolve(bytes(packet), DOMAIN, fake_lookup, 512)
        if out is not None:
            decode(out)


def test_response_flags_and_record() -> None:
    packet = query("web.default.svc.cluster.local", qid=0xBEEF)
    r = ask("web.default.svc.cluster.local")
    assert r["id"] == 0x1234
    assert (r["qr"], r["aa"], r["rd"], r["ra"], r["tc"], r["opcode"]) == (
        True,
        True,
        True,
        False,
        False,
        0,
    )
    assert r["counts"] == (1, 1, 0, 0)
    assert r["answers"] == [("10.96.0.10", 5)]
    out = dns.resolve(packet, DOMAIN, fake_lookup, 512)
    assert out is not None and out[:2] == b"\xbe\xef" and out[12 : len(packet)] == packet[12:]
    no_rd = dns.resolve(query("web.default.svc.cluster.local", rd=False), DOMAIN, fake_lookup, 512)
    assert no_rd is not None and not decode(no_rd)["rd"]


def test_question_is_echoed_with_its_case() -> None:
    r = ask("WeB.default.svc.Cluster.local")
    assert r["question"] == query("WeB.default.svc.Cluster.local")[12:]
    assert r["answers"] == [("10.96.0.10", 5)]


def test_udp_limit_truncates() -> None:
    q = dns.parse(query("many.default.svc.cluster.local"))
    assert q is not None
    addrs = [f"10.0.0.{i}" for i in range(40)]
    big = decode(dns.response(q, dns.NOERROR, addrs))
    assert not big["tc"] and len(big["answers"]) == 40
    small = decode(dns.response(q, dns.NOERROR, addrs, limit=512))
    assert small["tc"] and small["answers"] == [] and small["rcode"] == dns.NOERROR


# -- answers -------------------------------------------------------------------------


def test_answers() -> None:
    assert ask("web.default.svc.cluster.local")["answers"] == [("10.96.0.10", 5)]
    aaaa = ask("web.default.svc.cluster.local", dns.AAAA)
    assert (aaaa["rcode"], aaaa["answers"]) == (dns.NOERROR, [])
    headless = ask("headless.ns1.svc.cluster.local")
    assert (headless["rcode"], headless["answers"]) == (dns.NOERROR, [])
    for name in [
        "nope.default.svc.cluster.local",
        "web.other.svc.cluster.local",
        "web.default.svc.cluster.local.default.svc.cluster.local",  # search list
        "x.web.default.svc.cluster.local",
        "web.default.pod.cluster.local",
        "default.svc.cluster.local",
        "cluster.local",
    ]:
        assert ask(name)["rcode"] == dns.NXDOMAIN, name
        assert ask(name, dns.AAAA)["rcode"] == dns.NXDOMAIN, name
    for name in ["example.com", "web.default.svc.cluster.local.example.com", "local", "."]:
        r = ask(name)
        assert (r["rcode"], r["answers"], r["aa"], r["ra"]) == (dns.REFUSED, [], True, False)
    assert ask("web.default.svc.evilcluster.local")["rcode"] == dns.REFUSED


def test_other_class_is_refused() -> None:
    packet = query("web.default.svc.cluster.local")[:-2] + b"\x00\x03"  # CHAOS
    out = dns.resolve(packet, DOMAIN, fake_lookup, 512)
    assert out is not None and decode(out)["rcode"] == dns.REFUSED


def test_only_valid_labels_reach_the_lookup() -> None:
    asked: list[tuple[str, str]] = []

    def lookup(namespace: str, name: str) -> list[str] | None:
        asked.append((namespace, name))
        return None

    for bad in ["..", "a/b", "a.b", "a%2f", "-a", "a_b", "a\x00"]:
        packet = query("web.default.svc.cluster.local")
        packet = packet[:12] + bytes([len(bad)]) + bad.encode() + packet[16:]
        out = dns.resolve(packet, DOMAIN, lookup, 512)
        assert out is not None and decode(out)["rcode"] == dns.NXDOMAIN
    assert asked == []
    ask("a-1.b2.svc.cluster.local", lookup=lookup)
    assert asked == [("b2", "a-1")]


def test_lookup_failure_is_servfail() -> None:
    def down(namespace: str, name: str) -> list[str] | None:
        raise ConnectionRefusedError

    assert ask("web.default.svc.cluster.local", lookup=down)["rcode"] == dns.SERVFAIL
    assert ask("example.com", lookup=down)["rcode"] == dns.REFUSED


# -- the API lookup ------------------------------------------------------------------


class FakeApi(dns.ApiLookup):
    def __init__(self, objects: dict[str, dict[str, Any]], ttl: float = 2.0) -> None:
        super().__init__("https://127.0.0.1:6443", ssl.create_default_context(), ttl)
        self.objects = objects
        self.calls: list[str] = []

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(self.path(kind, namespace, name))
        return self.objects.get(self.path(kind, namespace, name))


def test_request_path() -> None:
    api = dns.ApiLookup("https://127.0.0.1:6443", ssl.create_default_context())
    assert (api.host, api.port) == ("127.0.0.1", 6443)
    assert api.path("services", "ns1", "web") == "/api/v1/namespaces/ns1/services/web"
    assert api.path("endpoints", "a/b", "..") == "/api/v1/namespaces/a%2Fb/endpoints/.."
    prefixed = dns.ApiLookup("https://example.invalid/k8s/", ssl.create_default_context())
    assert (prefixed.host, prefixed.port) == ("example.invalid", 443)
    assert prefixed.path("services", "a", "b") == "/k8s/api/v1/namespaces/a/services/b"


def service(ip: str | None, **spec: Any) -> dict[str, Any]:
    return {"kind": "Service", "spec": {**({"clusterIP": ip} if ip else {}), **spec}}


ENDPOINTS = {
    "subsets": [
        {
            "addresses": [{"ip": "10.244.1.5"}, {"ip": "fd00::5"}],
            "notReadyAddresses": [{"ip": "10.244.1.6"}],
        },
        {"addresses": [{"ip": "10.244.2.7"}]},
    ]
}
OBJECTS = {
    "/api/v1/namespaces/default/services/web": service("10.96.0.10"),
    "/api/v1/namespaces/default/services/six": service("fd00::10"),
    "/api/v1/namespaces/default/services/ext": service(None, type="ExternalName"),
    "/api/v1/namespaces/ns1/services/headless": service("None"),
    "/api/v1/namespaces/ns1/endpoints/headless": ENDPOINTS,
    "/api/v1/namespaces/ns1/services/empty": service("None"),
}


def test_lookup_reads_services_and_endpoints() -> None:
    api = FakeApi(OBJECTS)
    assert api("default", "web") == ["10.96.0.10"]
    assert api("default", "six") == []
    assert api("default", "ext") == []
    assert api("ns1", "headless") == ["10.244.1.5", "10.244.2.7"]
    assert api("ns1", "empty") == []
    assert api("ns1", "missing") is None
    assert api.calls[-1] == "/api/v1/namespaces/ns1/services/missing"


def test_lookup_cache_keeps_answers_and_absences_for_ttl() -> None:
    api = FakeApi(dict(OBJECTS), ttl=60)
    for _ in range(3):
        assert api("default", "web") == ["10.96.0.10"]
        assert api("default", "new") is None
    assert len(api.calls) == 2
    api.objects["/api/v1/namespaces/default/services/new"] = service("10.96.0.99")
    assert api("default", "new") is None  # still cached
    api._cache.clear()  # the ttl passes
    assert api("default", "new") == ["10.96.0.99"]
    fresh = FakeApi(OBJECTS, ttl=0)
    fresh("default", "web")
    fresh("default", "web")
    assert len(fresh.calls) == 2


def test_lookup_failures_are_not_cached() -> None:
    class Flaky(FakeApi):
        fail = True

        def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
            if self.fail:
                raise ConnectionRefusedError
            return super().get(kind, namespace, name)

    api = Flaky(OBJECTS, ttl=60)
    with pytest.raises(OSError):
        api("default", "web")
    api.fail = False
    assert api("default", "web") == ["10.96.0.10"]


def test_read_kubeconfig(tmp_path: Path) -> None:
    path = tmp_path / "kubeconfig"
    path.write_text(
        pki.kubeconfig("https://127.0.0.1:6443", tmp_path / "ca.crt", Path("a.crt"), Path("a.key"))
    )
    assert dns.read_kubeconfig(path) == (
        "https://127.0.0.1:6443",
        str(tmp_path / "ca.crt"),
        str(tmp_path / "a.crt"),  # relative to the kubeconfig's folder
        str(tmp_path / "a.key"),
    )


# -- over HTTPS, and the process -----------------------------------------------------


class Api:
    """An API server stand-in on 127.0.0.1: GETs of OBJECTS, client certificate required."""

    def __init__(self, d: Path) -> None:
        pki.make_ca(d)
        cert, key = pki.issue(d, "apiserver", "/CN=kube-apiserver", ["IP:127.0.0.1"])
        pki.issue(d, "admin", "/O=system:masters/CN=fabric-admin")
        self.requests: list[tuple[str, str, str]] = []
        requests = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                assert isinstance(self.connection, ssl.SSLSocket)
                peer = self.connection.getpeercert() or {}
                cn = dict(x[0] for x in cast(Any, peer)["subject"])["commonName"]
                requests.append((self.path, self.headers.get("Accept", ""), cn))
                obj = OBJECTS.get(self.path)
                body = json.dumps(obj or {"kind": "Status", "code": 404}).encode()
                self.send_response(200 if obj else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        context.load_verify_locations(d / "ca.crt")
        context.verify_mode = ssl.CERT_REQUIRED
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.kubeconfig = d / "kubeconfig"
        self.kubeconfig.write_text(
            pki.kubeconfig(
                f"https://127.0.0.1:{self.httpd.server_address[1]}",
                d / "ca.crt",
                d / "admin.crt",
                d / "admin.key",
            )
        )
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed for the certificates")
    server = Api(tmp_path_factory.mktemp("pki"))
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def test_lookup_over_https(api: Api) -> None:
    lookup = dns.ApiLookup.from_kubeconfig(api.kubeconfig)
    api.requests.clear()
    assert lookup("default", "web") == ["10.96.0.10"]
    assert lookup("ns1", "headless") == ["10.244.1.5", "10.244.2.7"]
    assert lookup("default", "missing") is None
    assert api.requests == [
        ("/api/v1/namespaces/default/services/web", "application/json", "fabric-admin"),
        ("/api/v1/namespaces/ns1/services/headless", "application/json", "fabric-admin"),
        ("/api/v1/namespaces/ns1/endpoints/headless", "application/json", "fabric-admin"),
        ("/api/v1/namespaces/default/services/missing", "application/json", "fabric-admin"),
    ]


def test_https_needs_the_cluster_ca(api: Api, tmp_path: Path) -> None:
    other = tmp_path / "other"
    pki.make_ca(other)
    lookup = dns.ApiLookup.from_kubeconfig(api.kubeconfig)
    lookup.context = ssl.create_default_context(cafile=other / "ca.crt")
    with pytest.raises(ssl.SSLError):
        lookup("default", "web")


def udp(port: int, packet: bytes, timeout: float = 5.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(packet, ("127.0.0.1", port))
        try:
            return s.recv(4096)
        except TimeoutError:
            return None


def tcp_exchange(s: socket.socket, packet: bytes) -> bytes:
    s.sendall(len(packet).to_bytes(2, "big") + packet)
    head = s.recv(2, socket.MSG_WAITALL)
    return s.recv(int.from_bytes(head, "big"), socket.MSG_WAITALL)


def test_process_over_udp_and_tcp(api: Api) -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(fabric_operator.__file__).parents[1])}
    cmd = [sys.executable, "-m", "fabric_operator.localcluster.dns"]
    args = ["--listen", f"127.0.0.1:{port}", "--kubeconfig", str(api.kubeconfig)]
    proc = subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        assert select.select([proc.stdout], [], [], 20)[0], "no output"
        assert proc.stdout.readline() == b"listening\n"

        def udp_ask(name: str, qtype: int = dns.A) -> dict[str, Any]:
            out = udp(port, query(name, qtype))
            assert out is not None, name
            return decode(out)

        r = udp_ask("web.default.svc.cluster.local")
        assert (r["rcode"], r["answers"], r["aa"]) == (dns.NOERROR, [("10.96.0.10", 5)], True)
        r = udp_ask("web.default.svc.cluster.local", dns.AAAA)
        assert (r["rcode"], r["answers"]) == (dns.NOERROR, [])
        assert udp_ask("nope.default.svc.cluster.local")["rcode"] == dns.NXDOMAIN
        assert udp_ask("example.com")["rcode"] == dns.REFUSED
        assert udp(port, b"\xff" * 7, timeout=0.5) is None
        assert udp(port, query("a.b")[:12] + b"\xc0\x0c\0\1\0\1", timeout=0.5) is None
        r = udp_ask("headless.ns1.svc.cluster.local")
        assert r["answers"] == [("10.244.1.5", 5), ("10.244.2.7", 5)]

        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            r = decode(tcp_exchange(s, query("web.default.svc.cluster.local")))
            assert r["answers"] == [("10.96.0.10", 5)]
            r = decode(tcp_exchange(s, query("example.com", dns.AAAA)))
            assert r["rcode"] == dns.REFUSED
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"\x00\x05garbage")  # a garbage message: the server hangs up
            assert s.recv(10) == b""
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            r = decode(tcp_exchange(s, query("web.default.svc.cluster.local", dns.AAAA)))
            assert (r["rcode"], r["answers"]) == (dns.NOERROR, [])
            r = decode(tcp_exchange(s, query("nope.default.svc.cluster.local")))
            assert r["rcode"] == dns.NXDOMAIN
        assert udp_ask("web.default.svc.cluster.local")["answers"] == [("10.96.0.10", 5)]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGTERM
    assert err == b""


def test_edns_query_gets_a_plain_answer() -> None:
    """glibc and dig add an OPT record; the answer has none (no EDNS here), so 512 bytes."""
    packet = query("web.default.svc.cluster.local")
    packet = packet[:10] + b"\x00\x01" + packet[12:] + b"\x00\x00\x29\x10\x00" + bytes(6)
    out = dns.resolve(packet, DOMAIN, fake_lookup, 512)
    assert out is not None
    r = decode(out)
    assert (r["counts"], r["answers"]) == ((1, 1, 0, 0), [("10.96.0.10", 5)])
