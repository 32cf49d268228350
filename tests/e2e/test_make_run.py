"""`make run` ends with the example CPU backend answering: the README's promise, checked.

Runs `hack/dev.py` (what `make run` runs after setting up) exactly as a user would, with
no KUBECONFIG: it must start its own cluster with a real node, the operator and the
gateway, and print a base_url, a key and a curl line; the printed curl line is then run as
printed and must get a real completion from the engine pod. Ctrl-C must stop everything it
started and leave nothing on the host (links, routes, mounts, namespaces, processes).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.support.kube import wait_for
from tests.support.realcluster import left_nothing, node_parts, processes_of, snapshot

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

BANNER_END = "Ctrl-C stops everything."


def _read_until(proc: subprocess.Popen[str], marker: str, timeout: float) -> list[str]:
    """Lines of the script's output up to `marker`; fails on exit or timeout."""
    lines: list[str] = []
    done = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if marker in line:
                break
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    if not done.wait(timeout):
        raise AssertionError(f"no {marker!r} within {timeout}s:\n" + "\n".join(lines))
    assert any(marker in line for line in lines), "exited early:\n" + "\n".join(lines)
    return lines


def test_make_run_ends_answering(tmp_path: Path) -> None:
    node_parts("pause", "engine")  # built (or cached) before the "before" picture
    before = snapshot()
    workdir = tmp_path / "dev"
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "hack" / "dev.py"), f"--workdir={workdir}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's Ctrl-C reaches it
    )
    try:
        lines = _read_until(proc, BANNER_END, 600)
        out = "\n".join(lines)
        print(out)
        base_url = re.search(r"base_url: (\S+)", out)
        key = re.search(r"api key:\s+(\S+)", out)
        curl = next((line.strip() for line in lines if line.strip().startswith("curl ")), None)
        took = re.search(r"first answer through the gateway, ([\d.]+) s after the apply", out)
        assert base_url and key and curl and took, out
        assert key.group(1) in curl

        # The printed line, run as printed, gets a real completion.
        answered = subprocess.run(
            ["bash", "-c", curl], capture_output=True, text=True, timeout=60, check=True
        )
        body = json.loads(answered.stdout)
        assert body["object"] == "chat.completion", body
        assert body["model"] == "tiny"
        assert isinstance(body["choices"][0]["message"]["content"], str)
        assert body["usage"]["completion_tokens"] > 0

        # Without the key, the gateway refuses.
        request = json.loads(shlex.split(curl)[-1])
        refused = httpx.post(f"{base_url.group(1)}/chat/completions", json=request, timeout=30)
        assert refused.status_code == 401, refused.text
        print(f"figures: apply -> first answer {took.group(1)} s")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=120)
    assert code == 0
    wait_for("every process of the run gone", lambda: not processes_of(workdir), 30)
    assert left_nothing(before), (before, snapshot())
