"""For tenancy tests: an upstream that records what it receives, and the chart's gateway
ServiceAccount with a token of its own.

    python -m tests.support.tenancy --port 8001 --name a --record /tmp/a.jsonl [--key K]

The recorder is tests.support.upstream's server, writing one JSON line per request
(path, authorization header, body) before answering: a test asserts on what a backend
received, not on what the gateway says it did.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
import yaml

from fabric_operator.localcluster import free_port
from tests.support.kube import Cluster
from tests.support.upstream import REPO, Process, Receive, Send, Upstream, wait_http


class Recorder:
    def __init__(self, args: argparse.Namespace) -> None:
        self.upstream = Upstream(args)
        self.record = Path(args.record)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["method"] != "GET":  # GET /v1/models is how the test sees it is up
            headers = dict(scope["headers"])
            line = {
                "path": scope["path"],
                "authorization": headers.get(b"authorization", b"").decode("latin-1"),
                "body": body.decode("utf-8", "replace"),
            }
            with self.record.open("a") as f:
                f.write(json.dumps(line) + "\n")
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return {"type": "http.disconnect"}
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.upstream(scope, replay, send)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", default="recorder")
    p.add_argument("--record", required=True, help="JSON lines file, one per request")
    p.add_argument("--key", help="require this bearer key")
    args = p.parse_args()
    args.status, args.delay, args.pieces, args.gap = 200, 0.0, 5, 0.0
    uvicorn.run(
        Recorder(args),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


@dataclass
class Recording:
    process: Process
    path: Path

    @property
    def url(self) -> str:
        return self.process.url

    def requests(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]


@contextlib.contextmanager
def recorder(
    name: str,
    workdir: Path,
    *,
    key: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    enter: list[str] | None = None,
) -> Iterator[Recording]:
    """A recording upstream as its own process (in another network namespace with
    `enter`), stopped at exit."""
    port = port or free_port(host)
    record = workdir / f"{name}.jsonl"
    proc = subprocess.Popen(
        [
            *(enter or []),
            *(sys.executable, "-m", "tests.support.tenancy"),
            *("--host", host, "--port", str(port), "--name", name, "--record", str(record)),
            *(("--key", key) if key else ()),
        ],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'operator'}"),
    )
    p = Process(proc, f"http://{host}:{port}/v1")
    try:
        wait_http(f"{p.url}/models", proc)
        yield Recording(p, record)
    finally:
        p.stop()


# ---- the chart's gateway ServiceAccount -----------------------------------------------------

RBAC_KINDS = {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}


def chart_gateway_rbac(
    helm: Path, release: str, namespace: str, watched: list[str]
) -> list[dict[str, Any]]:
    """The chart's gateway ServiceAccount and its (Cluster)Roles and bindings, as `helm
    template` renders them for a release in `namespace` serving `watched`."""
    out = subprocess.run(
        [
            *(str(helm), "template", release, str(REPO / "charts" / "fabric-operator")),
            *("--namespace", namespace, "--set", "gateway.enabled=true"),
            *("--set", "crds.install=false"),
            *("--set", "watch.namespaces={" + ",".join(watched) + "}"),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    name = f"{release}-fabric-operator-gateway"
    return [
        d
        for d in yaml.safe_load_all(out)
        if d and d["kind"] in RBAC_KINDS and d["metadata"]["name"] == name
    ]


def service_account_kubeconfig(cluster: Cluster, namespace: str, account: str, path: Path) -> Path:
    """A kubeconfig that is that ServiceAccount and nothing more (a token it was issued)."""
    token = cluster.kubectl(
        "create", "token", account, "-n", namespace, "--duration=1h"
    ).stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    server = admin["clusters"][0]["cluster"]
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "sa",
                "clusters": [{"name": "local", "cluster": server}],
                "users": [{"name": "sa", "user": {"token": token}}],
                "contexts": [{"name": "sa", "context": {"cluster": "local", "user": "sa"}}],
            }
        )
    )
    return path


if __name__ == "__main__":
    main()
