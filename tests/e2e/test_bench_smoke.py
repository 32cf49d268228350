"""The benchmark harness keeps working (N = 5). Nothing here asserts on time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.e2e


def test_benchmark_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'operator'}:{REPO}")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.reconcile",
            "--backends",
            "5",
            "--latency-samples",
            "3",
            "--idle-seconds",
            "1",
            "--json",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "create → children p50/p90/p99/max ms" in proc.stdout
    results = json.loads(out.read_text())
    assert set(results) >= {
        "machine",
        "targets",
        "latency",
        "throughput",
        "updates",
        "restart",
        "idle",
        "footprint",
        "cpu",
    }
    # Counts, not times: these are exact and must hold on any machine.
    # NetworkPolicy, Deployment and Service: a create and its managedFields patch each,
    # then one status write: 7 (a retried managedFields patch would make it more).
    assert results["throughput"]["5"]["requests_per_backend"] == 7
    assert results["restart"]["requests"] == 0
    assert results["restart"]["writes_apiserver"] == 0
    assert results["idle"]["requests"] == 0


def test_serving_benchmark_smoke_run(tmp_path: Path) -> None:
    """bench/serving.py end to end on the tiny model: real engine processes, the gateway
    with each routing strategy, the autoscaler's step on a simulated clock."""
    out = tmp_path / "serving.json"
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'operator'}:{REPO}")
    proc = subprocess.run(
        [
            sys.executable,
            *("-m", "bench.serving", "--smoke"),
            *("--conversations", "2", "--turns", "2", "--concurrency", "2"),
            *("--json", str(out)),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["routing"]) == {
        "round-robin (direct, as a Service)",
        "gateway LeastInFlight",
        "gateway PrefixAffinity",
    }
    for name, run in results["routing"].items():
        assert (run["requests"], run["errors"]) == (4, 0), (name, run)
    # Simulated time (the decision alone, a reading every 50 ms): exact on any machine.
    step = results["autoscaler"]
    assert step["seconds_to_desired"] <= 10.0, step
    assert [r for _, r in step["replica_changes"]][-1] == 6
