"""`fabric-operator gateway` as its own process, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from fabric_operator.localcluster import free_port
from tests.support.upstream import REPO, Process, wait_http


@contextlib.contextmanager
def gateway(
    *args: str,
    config: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    workdir: Path,
    ready_path: str = "/healthz",
    port: int = 0,
) -> Iterator[Process]:
    """The gateway on `port` (default: a free one); `config` is written as its static file
    if given. Its JSON log is at workdir/gateway.log."""
    port, metrics = port or free_port(), free_port()
    flags = [f"--address=127.0.0.1:{port}", f"--metrics-address=127.0.0.1:{metrics}", *args]
    if config is not None:
        path = workdir / "gateway.yaml"
        path.write_text(yaml.safe_dump(config))
        flags.append(f"--config={path}")
    log = open(workdir / "gateway.log", "ab")  # noqa: SIM115 - the child process writes it
    proc = subprocess.Popen(
        [sys.executable, "-m", "fabric_operator", "gateway", *flags],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "operator"), **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    p = Process(proc, f"http://127.0.0.1:{port}")
    p.metrics_url = f"http://127.0.0.1:{metrics}/metrics"  # type: ignore[attr-defined]
    p.load_url = f"http://127.0.0.1:{metrics}/load"  # type: ignore[attr-defined]
    try:
        wait_http(p.url + ready_path, proc, timeout=30, need_ok=True)
        yield p
    finally:
        p.stop()
        log.close()
