"""`fabric-operator usage` against a fake Prometheus HTTP API on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from fabric_operator import cli

RESULT = [
    {"metric": {"tenant": "team-a/key", "model": "qwen", "kind": "prompt"}, "value": [0, "1200.4"]},
    {
        "metric": {"tenant": "team-a/key", "model": "qwen", "kind": "completion"},
        "value": [0, "300"],
    },
    {"metric": {"tenant": "team-b/key", "model": "qwen", "kind": "prompt"}, "value": [0, "7.6"]},
]


@pytest.fixture
def prometheus() -> Iterator[tuple[str, list[str]]]:
    queries: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            parts = urllib.parse.urlsplit(self.path)
            assert parts.path == "/api/v1/query"
            queries.append(urllib.parse.parse_qs(parts.query)["query"][0])
            body: dict[str, Any] = {
                "status": "success",
                "data": {"resultType": "vector", "result": RESULT},
            }
            raw = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", queries
    finally:
        server.shutdown()
        server.server_close()


def test_usage_prints_tokens_per_tenant_and_model(
    prometheus: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    url, queries = prometheus
    assert cli.main(["usage", "--prometheus", url, "--since", "30d", "--json"]) == 0
    assert queries == ["sum by (tenant, model, kind) (increase(fabric_gateway_tokens_total[30d]))"]
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows == [
        {"tenant": "team-a/key", "model": "qwen", "prompt": 1200, "completion": 300, "total": 1500},
        {"tenant": "team-b/key", "model": "qwen", "prompt": 8, "completion": 0, "total": 8},
    ]
    assert cli.main(["usage", "--prometheus", url]) == 0
    out = capsys.readouterr().out
    assert "TENANT" in out and "team-a/key  qwen" in out and "over the last 7d" in out


def test_usage_refuses_what_is_no_duration_or_label(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["usage", "--prometheus", "http://127.0.0.1:1", "--since", "7 days"])
    assert cli.main(["usage", "--prometheus", "http://127.0.0.1:1", "--by", "key"]) == 2
    assert cli.main(["usage", "--prometheus", "http://127.0.0.1:1", "--timeout", "1"]) == 1
