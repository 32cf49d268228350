"""A real LLM engine for tests: llama-cpp-python's OpenAI-compatible server on CPU, serving
the tiny random model of `tests.support.tiny_model`.

The engine lives in a venv of its own (hack/get-tiny-engine.sh builds it once and caches
it), so its dependencies never mix with the project's. Fixtures for conftests:

    from tests.support.engine import tiny_engine_fixture, tiny_gguf_fixture  # noqa: F401

gives `tiny_gguf` (the model file) and `tiny_engine` (a running server, with key and alias).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from fabric_operator.localcluster import free_port
from tests.support.tiny_model import write_tiny_gguf

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "hack" / "get-tiny-engine.sh"
TINY_ALIAS = "tiny-llama"
TINY_KEY = "sk-tiny-engine-test"

_python: dict[str, str | BaseException] = {}


def _build_impossible() -> str | None:
    """Why this machine cannot build the engine at all, if it cannot (then skip, not fail)."""
    if os.environ.get("FABRIC_TINY_ENGINE_PYTHON"):
        return None
    missing = [t for t in ("bash", "cmake", "c++", "python3") if shutil.which(t) is None]
    return f"{', '.join(missing)} not found" if missing else None


def tiny_engine_python() -> str:
    """A python that can run `-m llama_cpp.server`: the script runs once per session.

    A failed build fails the tests loudly; they skip only where a build cannot happen.
    """
    if "path" not in _python:
        try:
            out = subprocess.run(
                ["bash", str(SCRIPT)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                check=False,
                timeout=1800,
            )
        except subprocess.TimeoutExpired as e:
            _python["path"] = RuntimeError(f"{SCRIPT} did not finish in {e.timeout}s")
        else:
            lines = out.stdout.strip().splitlines()
            if out.returncode == 0 and lines:
                _python["path"] = lines[-1]
            else:
                reason = out.stderr.strip()[-3000:] or f"exit status {out.returncode}"
                _python["path"] = RuntimeError(f"{SCRIPT} failed:\n{reason}")
    got = _python["path"]
    if isinstance(got, str):
        return got
    if (why := _build_impossible()) is not None:
        pytest.skip(f"tiny engine build failed: {why}")
    pytest.fail(str(got), pytrace=False)


@dataclass
class LlamaServer:
    """A running `llama_cpp.server`; `base_url` ends in /v1, as OpenAI clients expect."""

    process: subprocess.Popen[bytes]
    host: str
    port: int
    alias: str | None
    api_key: str | None
    log: Path
    ready_s: float  # process start to the first answer of /v1/models

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self, grace: float = 10) -> None:
        """Terminate by PID, kill if it lingers: the server must not outlive the tests."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _wait_ready(server: LlamaServer, timeout: float) -> None:
    """Poll GET /v1/models (with the key) until it answers 200; fail fast on exit or 4xx."""
    request = urllib.request.Request(f"{server.base_url}/models")
    if server.api_key:
        request.add_header("Authorization", f"Bearer {server.api_key}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"llama_cpp.server exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        try:
            with urllib.request.urlopen(request, timeout=2):
                return
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"/v1/models answered {e.code}:\n{server.log_tail()}") from e
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{server.base_url}/models did not answer in {timeout}s")


@contextlib.contextmanager
def run_llama_server(
    model: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    alias: str | None = None,
    api_key: str | None = None,
    n_ctx: int | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
) -> Iterator[LlamaServer]:
    """`python -m llama_cpp.server` as a subprocess, ready when yielded, stopped at exit."""
    port = port or free_port(host)
    args = [
        *(tiny_engine_python(), "-m", "llama_cpp.server"),
        *("--model", str(model), "--host", host, "--port", str(port)),
        # --verbose false: llama.cpp's loader log is noise (and may show a harmless
        # UnicodeDecodeError while dumping byte tokens).
        *("--verbose", "false"),
    ]
    if alias:
        args += ["--model_alias", alias]
    if api_key:
        args += ["--api_key", api_key]
    if n_ctx:
        args += ["--n_ctx", str(n_ctx)]
    args += list(extra_args)
    log_fd, log_name = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    finally:
        os.close(log_fd)
    server = LlamaServer(process, host, port, alias, api_key, Path(log_name), 0.0)
    try:
        _wait_ready(server, timeout)
        server.ready_s = time.monotonic() - started
        yield server
    finally:
        server.stop()
        server.log.unlink(missing_ok=True)


@pytest.fixture(scope="session", name="tiny_gguf")
def tiny_gguf_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, written once per session (never committed: it is generated)."""
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny-model") / "tiny.gguf")


@pytest.fixture(scope="session", name="tiny_engine")
def tiny_engine_fixture(tiny_gguf: Path) -> Iterator[LlamaServer]:
    """One engine per session with a key and an alias, as a gateway's upstream would be."""
    with run_llama_server(tiny_gguf, alias=TINY_ALIAS, api_key=TINY_KEY) as server:
        yield server
