"""bench/gateway keeps working: a tiny run, asserting what it measured, never how fast."""

from __future__ import annotations

import json
from pathlib import Path

from bench import gateway as bench


def test_gateway_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "gateway.json"
    args = ["--seconds", "0.3", "--concurrency", "1,3", "--paced", "20", "--json", str(out)]
    assert bench.main(args) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(r["stream"], r["clients"], r["paced_rps"]) for r in runs] == [
        (False, 1, None),
        (False, 3, None),
        (True, 1, None),
        (True, 3, None),
        (False, 10, 20.0),
        (True, 10, 20.0),
    ]
    for run in runs:
        assert run["requests"] > 0 and run["errors"] == 0
        assert run["gateway_p50_ms"] > 0 and run["direct_p50_ms"] > 0
