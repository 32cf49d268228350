"""A stand-in for a gateway replica's load endpoint, whose numbers the test sets.

Serves the contract the autoscaler reads: `GET /load` -> one JSON report, and
`GET /load?watch=1` -> NDJSON, the first report at once, then one on every change and a
heartbeat every HEARTBEAT seconds. Counts the streams opened and the lines served, so a
test can wait for "the operator is listening" instead of sleeping.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

HEARTBEAT = 0.5


class LoadServer:
    def __init__(self, gateway: str = "stub-gateway-0") -> None:
        self.gateway = gateway
        self.backends: dict[str, dict[str, int]] = {}
        self.connects = 0  # watch streams opened
        self.lines = 0  # reports sent on watch streams
        self.streaming = 0  # watch streams open now
        self._changed = threading.Condition()
        self._version = 0
        self._closing = False
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/load"

    def start(self) -> LoadServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._changed:
            self._closing = True
            self._changed.notify_all()
        self._server.shutdown()
        self._server.server_close()

    def set(self, key: str, in_flight: int = 0, held: int = 0, engine: int = 0) -> None:
        """Set one backend's counts ("namespace/name"); every stream reports it at once.
        `engine`: what its engine pods report running or waiting (left out when 0)."""
        with self._changed:
            if in_flight or held or engine:
                self.backends[key] = {"inFlight": in_flight, "held": held}
                if engine:
                    self.backends[key]["engine"] = engine
            else:
                self.backends.pop(key, None)  # absent means zero
            self._version += 1
            self._changed.notify_all()

    def report(self) -> bytes:
        with self._changed:
            body = {"gateway": self.gateway, "backends": dict(self.backends)}
        return json.dumps(body).encode()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if url.path != "/load":
                    self.send_error(404)
                    return
                if parse_qs(url.query).get("watch") != ["1"]:
                    body = server.report()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                with server._changed:
                    server.connects += 1
                    server.streaming += 1
                try:
                    self._stream()
                except OSError:
                    pass  # the operator went away
                finally:
                    with server._changed:
                        server.streaming -= 1

            def _stream(self) -> None:
                seen = -1
                while True:
                    with server._changed:
                        if seen == server._version:
                            server._changed.wait(HEARTBEAT)
                        if server._closing:
                            break
                        seen = server._version
                    line = server.report() + b"\n"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    self.wfile.flush()
                    with server._changed:
                        server.lines += 1
                self.wfile.write(b"0\r\n\r\n")

        return Handler
