"""A process-backed node simulator: CPU llama.cpp pods run for real, as local processes.

The e2e suite has no kubelet and no container runtime. `NodeSimulator` (kwok-style)
patches pod status to look Running; `ProcessNodeSimulator` goes one step further for the
pods users judge an LLM operator by: a pod scheduled onto a simulated node whose container
runs the CPU llama.cpp server image (`ghcr.io/ggml-org/llama.cpp:server`, no GPU limits)
is run as a real engine, llama-cpp-python's OpenAI server (`python -m llama_cpp.server`,
from `tests.support.engine.tiny_engine_python()`), on an address of its own. Every other
pod (vLLM, TGI, Ollama, GPU llama.cpp) stays simulated exactly as `NodeSimulator` does.

What a kubelet does, and this stand-in does too:
- **Address.** Each pod gets 198.18.0.N (N in 64-95; RFC 2544, added to `lo` by
  `tests.support.netaddr.local_address`) as `status.podIP`/`podIPs`, so the real Endpoints
  controller publishes it (it refuses 127.0.0.0/8) and whatever resolves the Service's
  Endpoints reaches the process. The engine's wildcard `--host 0.0.0.0` binds that address.
- **Env.** `value` (with `$(VAR)` expansion, in args too) and `valueFrom.secretKeyRef`,
  read from the Secret through the API when the container starts; a missing Secret or key
  is `CreateContainerConfigError` (waiting, retried), as a kubelet reports it.
- **Probes.** The container's startupProbe, readinessProbe and livenessProbe are executed
  for real against the process (httpGet: path, port by number or by the name of a
  container port, host, headers, periodSeconds, timeoutSeconds, failureThreshold,
  successThreshold, initialDelaySeconds; tcpSocket too), with the kubelet's semantics:
  readiness and liveness run only once the startup probe succeeded; only the readiness
  probe sets the container `ready` and the pod's `ContainersReady`/`Ready` conditions;
  a failed startup or liveness probe kills the container (`Killing`, then restart).
- **Exits and restarts.** A process that exits gives a `terminated` state with its exit
  code (128+signal for a signal; reason `Error`, or `Completed` for 0) and is restarted
  with the kubelet's back-off: at once the first time, then 10 s doubling up to 300 s
  (reset after 10 min), `waiting: CrashLoopBackOff` with the previous termination as
  `lastState` in between, `restartCount` counting every new container.
- **Deletion.** A pod being deleted gets SIGTERM (by PID), SIGKILL after its grace period
  (`deletionGracePeriodSeconds`), then the pod is removed with grace 0.
- **Events** on the pod (source `procsim`): Started, Killing, BackOff, Failed, and
  Unhealthy (once per probe and distinct message per container start).
- **Logs** per container start, in the kubelet's layout:
  `<workdir>/pods/<namespace>_<pod>_<uid>/engine/<restartCount>.log`.

llama-server arguments → llama_cpp.server (an argument or `LLAMA_ARG_*` variable not in
this table, or a value the stand-in cannot honour, fails the pod visibly: an Event
`Failed` and a `terminated` state, reason `StartError`, exit code 128, with the message;
then the usual back-off. Never silently dropped):

| llama-server                          | llama_cpp.server                                    |
|---------------------------------------|-----------------------------------------------------|
| `--host 0.0.0.0` (or `::`)            | `--host <pod IP>` (any other host is refused)       |
| `--port P` (default 8080)             | `--port P`                                          |
| `-a/--alias NAME`                     | `--model_alias NAME`                                |
| `-mu/--model-url URL`                 | `--model <tiny GGUF>`                               |
| `-hf/--hf-repo R` [`-hff/--hf-file F`]| `--model <tiny GGUF>`                               |
| `-m/--model /models/P` on a PVC mount | `--model <workdir>/pvc/<ns>/<claim>/<subPath>/P`    |
| `-c/--ctx-size N`                     | `--n_ctx N`                                         |
| `-np/--parallel 1`                    | (one request at a time: the same); N > 1 is refused |
| `--metrics`                           | `/metrics` served by the shim (below)               |
| `LLAMA_API_KEY` env, `--api-key K`    | `API_KEY` env (llama_cpp.server's own setting; it   |
|                                       | keeps the key off the command line)                 |
| `-t`, `-tb`, `-b`, `-ub`, `-s`, `-ngl`| `--n_threads`, `--n_threads_batch`, `--n_batch`,    |
|                                       | `--n_ubatch`, `--seed`, `--n_gpu_layers`            |
| `--mlock`, `--no-mmap`, `--embedding` | `--use_mlock true`, `--use_mmap false`,             |
|                                       | `--embedding true`                                  |
| `--rope-freq-base/-scale X`           | `--rope_freq_base/--rope_freq_scale X`              |
| `--jinja`                             | (the GGUF's Jinja chat template is always used)     |

The model: the suite generates a tiny random GGUF (`tests.support.tiny_model`) and no hub
is reachable, so a URL or Hugging Face source maps onto that file, as if downloaded into
`LLAMA_CACHE`. A PVC source maps the claim onto a local folder
`<workdir>/pvc/<namespace>/<claimName>`; the simulator puts the tiny GGUF at the path the
pod names there when it first starts the pod (the volume "holds" the model). A `--model`
outside a PVC mount (the image's own files, other volume kinds) is refused.

Always added: `--verbose false` (llama.cpp's loader log is noise) and
`--interrupt_requests false` (llama_cpp.server would otherwise cut a running stream short
when another request arrives; llama-server queues it). Every other container env variable
is passed through, except ones llama_cpp.server would read as its own settings (`MODEL`,
`PORT`, `HOST`, `API_KEY`... case-insensitive) or `PYTHON*`: those are refused.

The shim: llama-server answers `GET /health` (the operator's probes) and, with
`--metrics`, `GET /metrics`; llama_cpp.server has neither. A `sitecustomize.py` that
procsim writes (loaded only with `FABRIC_PROCSIM_SHIM=1`) adds them to the app:
`/health` is public and answers `{"status": "ok"}` (llama_cpp.server loads the model
before it listens, so listening means loaded; llama-server would answer 503 while
loading); `/metrics` needs the key like llama-server's and counts requests per path and
status as `procsim_http_requests_total{path,code}` (not llama-server's metric names).

Not emulated: the pod's securityContext and resource limits (the process runs as the
test's user, unconstrained), image pulls, init containers and extra containers (refused),
exec probes (refused), `envFrom`/configMap/fieldRef env (refused), llama-server's parallel
slots (concurrent requests queue).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from fabric_operator.render.llamacpp import IMAGE as LLAMACPP_IMAGES
from fabric_operator.render.workload import BACKEND_LABEL, GPU_RESOURCE
from tests.support.engine import tiny_engine_python
from tests.support.kube import Cluster, _now
from tests.support.netaddr import local_address
from tests.support.simulator import MANAGED, NodeSimulator, _status

log = logging.getLogger("procsim")

SIMULATED_LABEL = "fabric.dev/simulated"
# The address pool: 198.18.0.64-95 (the integration tests use lower numbers).
ADDRESSES = range(64, 96)
WILDCARDS = {"0.0.0.0", "::", "[::]"}
DEFAULT_PORT = 8080
LLAMA_SERVER_COMMANDS = (["/app/llama-server"], ["llama-server"])
# The CPU image as rendered, or pinned to a build (`:server-b6000`) or a digest.
_CPU_IMAGE = re.compile(re.escape(LLAMACPP_IMAGES["cpu"]) + r"(-b\d+)?(@sha256:[0-9a-f]{64})?")

# Kubelet's container restart back-off (pkg/kubelet: 10 s initial, 300 s max).
BACKOFF_INITIAL, BACKOFF_MAX = 10.0, 300.0

# ---- translation: llama-server's container -> llama_cpp.server's command ----------------

# llama-server flag or alias -> (canonical name, takes a value)
_FLAGS: dict[str, tuple[str, bool]] = {
    "--host": ("host", True),
    "--port": ("port", True),
    "-a": ("alias", True),
    "--alias": ("alias", True),
    "-m": ("model", True),
    "--model": ("model", True),
    "-mu": ("model-url", True),
    "--model-url": ("model-url", True),
    "-hf": ("hf-repo", True),
    "-hfr": ("hf-repo", True),
    "--hf-repo": ("hf-repo", True),
    "-hff": ("hf-file", True),
    "--hf-file": ("hf-file", True),
    "-c": ("ctx-size", True),
    "--ctx-size": ("ctx-size", True),
    "-np": ("parallel", True),
    "--parallel": ("parallel", True),
    "--metrics": ("metrics", False),
    "--api-key": ("api-key", True),
    "-t": ("threads", True),
    "--threads": ("threads", True),
    "-tb": ("threads-batch", True),
    "--threads-batch": ("threads-batch", True),
    "-b": ("batch-size", True),
    "--batch-size": ("batch-size", True),
    "-ub": ("ubatch-size", True),
    "--ubatch-size": ("ubatch-size", True),
    "-s": ("seed", True),
    "--seed": ("seed", True),
    "-ngl": ("gpu-layers", True),
    "--gpu-layers": ("gpu-layers", True),
    "--n-gpu-layers": ("gpu-layers", True),
    "--mlock": ("mlock", False),
    "--no-mmap": ("no-mmap", False),
    "--embedding": ("embedding", False),
    "--embeddings": ("embedding", False),
    "--rope-freq-base": ("rope-freq-base", True),
    "--rope-freq-scale": ("rope-freq-scale", True),
    "--jinja": ("jinja", False),
}
# llama-server's environment variables (arguments win over them, as in llama-server).
_ENV_FLAGS = {
    "LLAMA_API_KEY": "api-key",
    "LLAMA_ARG_HOST": "host",
    "LLAMA_ARG_PORT": "port",
    "LLAMA_ARG_ALIAS": "alias",
    "LLAMA_ARG_MODEL": "model",
    "LLAMA_ARG_MODEL_URL": "model-url",
    "LLAMA_ARG_HF_REPO": "hf-repo",
    "LLAMA_ARG_HF_FILE": "hf-file",
    "LLAMA_ARG_CTX_SIZE": "ctx-size",
    "LLAMA_ARG_N_PARALLEL": "parallel",
    "LLAMA_ARG_THREADS": "threads",
    "LLAMA_ARG_N_GPU_LAYERS": "gpu-layers",
    "LLAMA_ARG_ENDPOINT_METRICS": "metrics",
}
# One-to-one: canonical -> (llama_cpp.server flag, value type)
_DIRECT: dict[str, tuple[str, type]] = {
    "alias": ("--model_alias", str),
    "ctx-size": ("--n_ctx", int),
    "threads": ("--n_threads", int),
    "threads-batch": ("--n_threads_batch", int),
    "batch-size": ("--n_batch", int),
    "ubatch-size": ("--n_ubatch", int),
    "seed": ("--seed", int),
    "gpu-layers": ("--n_gpu_layers", int),
    "rope-freq-base": ("--rope_freq_base", float),
    "rope-freq-scale": ("--rope_freq_scale", float),
}
_SWITCHES = {
    "mlock": ("--use_mlock", "true"),
    "no-mmap": ("--use_mmap", "false"),
    "embedding": ("--embedding", "true"),
}
_TRUE = {"1", "true", "on", "enabled", "yes"}
_FALSE = {"0", "false", "off", "disabled", "no"}


class UntranslatableError(Exception):
    """The pod cannot be run faithfully: it fails visibly (Event + StartError)."""


class ConfigError(Exception):
    """What a kubelet reports as CreateContainerConfigError: a missing Secret or key."""


@dataclass(frozen=True)
class Launch:
    """How to start the stand-in engine for one container."""

    args: list[str]  # after the interpreter
    env: dict[str, str]  # the container's passed-through env and translated settings
    host: str
    port: int
    model: Path
    model_on_volume: bool  # a PVC path: the simulator puts the tiny GGUF there


_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion of env values and args (`$$` escapes)."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _REF.sub(one, text)


def resolve_env(
    container: Mapping[str, Any], secret: Callable[[str, str], str | None]
) -> dict[str, str]:
    """The container's environment as a kubelet builds it; `secret(name, key)` returns the
    value, None for a missing key, and raises ConfigError for a missing Secret."""
    if container.get("envFrom"):
        raise UntranslatableError("envFrom is not supported by procsim")
    out: dict[str, str] = {}
    for item in container.get("env") or []:
        name = str(item["name"])
        source = item.get("valueFrom")
        if source is None:
            out[name] = expand(str(item.get("value", "")), out)
            continue
        ref = source.get("secretKeyRef")
        if ref is None:
            raise UntranslatableError(
                f"env {name}: only value and valueFrom.secretKeyRef are supported, "
                f"not {', '.join(sorted(source))}"
            )
        try:
            value = secret(str(ref["name"]), str(ref["key"]))
            if value is None:
                raise ConfigError(f"couldn't find key {ref['key']} in Secret {ref['name']}")
        except ConfigError:
            if ref.get("optional"):
                continue
            raise
        out[name] = value
    return out


def _typed(flag: str, value: str, kind: type) -> str:
    try:
        return str(kind(value))
    except ValueError:
        raise UntranslatableError(f"{flag} {value!r}: not a valid {kind.__name__}") from None


def _volume_path(
    path: str,
    container: Mapping[str, Any],
    volumes: list[Mapping[str, Any]],
    namespace: str,
    pvc_root: Path,
) -> Path:
    """Where a container path on a PVC mount lives here (see the module docstring)."""
    mounts = sorted(
        container.get("volumeMounts") or [], key=lambda m: len(m["mountPath"]), reverse=True
    )
    for mount in mounts:
        root = str(mount["mountPath"]).rstrip("/")
        if path != root and not path.startswith(root + "/"):
            continue
        volume = next((v for v in volumes if v.get("name") == mount["name"]), {})
        claim = volume.get("persistentVolumeClaim")
        if claim is None:
            raise UntranslatableError(
                f"--model {path}: volume {mount['name']} is not a PersistentVolumeClaim; "
                "procsim maps only PVCs to local folders"
            )
        rel = path[len(root) :].lstrip("/")
        sub = str(mount.get("subPath", ""))
        return pvc_root / namespace / str(claim["claimName"]) / sub / rel
    raise UntranslatableError(f"--model {path}: not on a volume (procsim has no image filesystem)")


def _from_env(
    env: Mapping[str, str], settings: frozenset[str]
) -> tuple[dict[str, str], dict[str, str]]:
    """(llama-server settings given as env, env passed through to the process)."""
    given: dict[str, str] = {}
    passthrough: dict[str, str] = {}
    for name, value in env.items():
        if name in _ENV_FLAGS:
            given[_ENV_FLAGS[name]] = value
        elif name.startswith("LLAMA_ARG_"):
            raise UntranslatableError(f"env {name}: no llama_cpp.server equivalent in procsim")
        elif name.lower() in settings or name.upper().startswith("PYTHON"):
            raise UntranslatableError(f"env {name} would configure the stand-in, not llama-server")
        else:
            passthrough[name] = value
    if "metrics" in given:  # a boolean variable
        flag_value = given.pop("metrics").strip().lower()
        if flag_value in _TRUE:
            given["metrics"] = "true"
        elif flag_value not in _FALSE:
            raise UntranslatableError(f"LLAMA_ARG_ENDPOINT_METRICS={flag_value!r}: not a boolean")
    return given, passthrough


def _parse_args(args: list[str]) -> dict[str, str]:
    """llama-server's arguments by canonical name (`--flag=value` accepted too)."""
    given: dict[str, str] = {}
    tokens = iter(args)
    for token in tokens:
        name, eq, inline = token.partition("=") if token.startswith("--") else (token, "", "")
        if name not in _FLAGS:
            what = "argument" if token.startswith("-") else "positional argument"
            raise UntranslatableError(
                f"llama-server {what} {name!r} has no llama_cpp.server equivalent in procsim"
            )
        canonical, takes_value = _FLAGS[name]
        if takes_value:
            value = inline if eq else next(tokens, None)
            if value is None:
                raise UntranslatableError(f"llama-server argument {name} needs a value")
            given[canonical] = value
        elif eq:
            raise UntranslatableError(f"llama-server argument {name} takes no value")
        else:
            given[canonical] = "true"
    return given


def translate(
    container: Mapping[str, Any],
    env: Mapping[str, str],
    *,
    pod_ip: str,
    model: Path,
    namespace: str = "default",
    volumes: list[Mapping[str, Any]] | None = None,
    pvc_root: Path = Path("pvc"),
    settings: frozenset[str] = frozenset(),
) -> Launch:
    """llama-server's container (args and env, already resolved) -> the stand-in's launch.

    `settings`: llama_cpp.server's own setting names (it reads them from the environment
    too); a container variable of that name is refused rather than passed through."""
    command = container.get("command")
    if command and list(command) not in LLAMA_SERVER_COMMANDS:
        raise UntranslatableError(f"command {command}: procsim runs only llama-server")
    given, passthrough = _from_env(env, settings)
    given |= _parse_args([expand(str(a), env) for a in container.get("args") or []])

    host = given.get("host", "127.0.0.1")
    if host not in WILDCARDS:
        raise UntranslatableError(
            f"--host {host}: only a wildcard address maps onto the pod's own address"
        )
    port = int(_typed("--port", given.get("port", str(DEFAULT_PORT)), int))
    parallel = int(_typed("--parallel", given.get("parallel", "1"), int))
    if parallel > 1:
        raise UntranslatableError(
            f"--parallel {parallel}: llama_cpp.server has no parallel slots "
            "(it serves one request at a time)"
        )
    if "hf-file" in given and "hf-repo" not in given:
        raise UntranslatableError("--hf-file without --hf-repo")
    on_volume = False
    if "model-url" in given or "hf-repo" in given:
        path = model
    elif "model" in given:
        path = _volume_path(given["model"], container, volumes or [], namespace, pvc_root)
        on_volume = True
    else:
        raise UntranslatableError("no model: one of --model, --model-url or --hf-repo is needed")

    args = ["-m", "llama_cpp.server", "--model", str(path), "--host", pod_ip, "--port", str(port)]
    for canonical, (target, kind) in _DIRECT.items():
        if canonical in given:
            args += [target, _typed(f"--{canonical}", given[canonical], kind)]
    for canonical, (target, value) in _SWITCHES.items():
        if canonical in given:
            args += [target, value]
    args += ["--verbose", "false", "--interrupt_requests", "false"]
    translated = {"FABRIC_PROCSIM_SHIM": "1"}
    if given.get("metrics") == "true":
        translated["FABRIC_PROCSIM_METRICS"] = "1"
    if "api-key" in given:
        translated["API_KEY"] = given["api-key"]
    return Launch(args, {**passthrough, **translated}, pod_ip, port, path, on_volume)


# The endpoints llama-server has and llama_cpp.server lacks (see the module docstring).
SHIM = '''\
"""procsim: llama-server's /health and /metrics for llama_cpp.server (test support)."""
import os

if os.environ.get("FABRIC_PROCSIM_SHIM") == "1":
    import llama_cpp.server.app as _app
    from fastapi import Depends
    from fastapi.responses import PlainTextResponse

    _create_app = _app.create_app

    def create_app(*args, **kwargs):
        app = _create_app(*args, **kwargs)

        @app.get("/health", include_in_schema=False)
        async def health():
            return {"status": "ok"}

        if os.environ.get("FABRIC_PROCSIM_METRICS") == "1":
            counts = {}

            @app.middleware("http")
            async def count(request, call_next):
                response = await call_next(request)
                key = (request.url.path, response.status_code)
                counts[key] = counts.get(key, 0) + 1
                return response

            @app.get(
                "/metrics", include_in_schema=False, dependencies=[Depends(_app.authenticate)]
            )
            async def metrics():
                lines = ["# TYPE procsim_http_requests_total counter"] + [
                    f'procsim_http_requests_total{{path="{p}",code="{c}"}} {n}'
                    for (p, c), n in sorted(counts.items())
                ]
                return PlainTextResponse("\\n".join(lines) + "\\n")

        return app

    _app.create_app = create_app
'''


# ---- probes ----------------------------------------------------------------------------

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Probe:
    """One probe of a container, run by the kubelet's rules (prober/worker.go)."""

    kind: str  # startup, readiness, liveness
    spec: Mapping[str, Any]
    ports: Mapping[str, int]  # the container's named ports
    period: float = 10.0
    timeout: float = 1.0
    failure_threshold: int = 3
    success_threshold: int = 1
    initial_delay: float = 0.0
    last: bool | None = None
    run: int = 0
    result: bool | None = None  # the result the kubelet acts on
    reported: set[str] = field(default_factory=set)

    @classmethod
    def from_spec(cls, kind: str, spec: Mapping[str, Any], ports: Mapping[str, int]) -> Probe:
        if "exec" in spec or "grpc" in spec:
            raise UntranslatableError(
                f"{kind}Probe: only httpGet and tcpSocket probes can run here"
            )
        return cls(
            kind,
            spec,
            ports,
            period=float(spec.get("periodSeconds", 10)),
            timeout=float(spec.get("timeoutSeconds", 1)),
            failure_threshold=int(spec.get("failureThreshold", 3)),
            success_threshold=int(spec.get("successThreshold", 1)),
            initial_delay=float(spec.get("initialDelaySeconds", 0)),
        )

    def reset(self) -> None:
        """A new container: counts start again (readiness starts as failed)."""
        self.last, self.run, self.result = None, 0, None
        self.reported.clear()

    def _port(self, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        if port not in self.ports:
            raise ValueError(f"unknown named port {port!r}")
        return self.ports[str(port)]

    def execute(self, pod_ip: str) -> tuple[bool, str]:
        """One probe against the process: (success, failure message as kubelet words it)."""
        if "tcpSocket" in self.spec:
            tcp = self.spec["tcpSocket"]
            host, port = tcp.get("host") or pod_ip, self._port(tcp["port"])
            try:
                with socket.create_connection((host, port), timeout=self.timeout):
                    return True, ""
            except OSError as err:
                return False, f"dial tcp {host}:{port}: {err}"
        get = self.spec["httpGet"]
        host = get.get("host") or pod_ip
        url = (
            f"{str(get.get('scheme', 'HTTP')).lower()}://{host}:{self._port(get['port'])}"
            f"{get.get('path', '/')}"
        )
        headers = {"User-Agent": "kube-probe/1.20", "Accept": "*/*"}
        headers |= {h["name"]: h["value"] for h in get.get("httpHeaders") or []}
        try:
            with _NO_PROXY.open(urllib.request.Request(url, headers=headers), timeout=self.timeout):
                return True, ""
        except urllib.error.HTTPError as err:
            if 200 <= err.code < 400:
                return True, ""
            return False, f"HTTP probe failed with statuscode: {err.code}"
        except (OSError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", err)
            return False, f'Get "{url}": {reason}'

    def record(self, ok: bool) -> bool:
        """Count a result; True when the acted-on result changed."""
        if ok == self.last:
            self.run += 1
        else:
            self.last, self.run = ok, 1
        threshold = self.success_threshold if ok else self.failure_threshold
        if self.run < threshold or self.result == ok:
            return False
        self.result = ok
        return True


@dataclass
class Backoff:
    """client-go's flowcontrol.Backoff for one container, as the kubelet uses it."""

    delay: float | None = None
    updated: float = 0.0

    def _expired(self, event: float) -> bool:
        return event - self.updated > 2 * BACKOFF_MAX

    def waiting(self, finished: float, now: float) -> float:
        """Seconds left before the container may restart (0: now)."""
        if self.delay is None or self._expired(finished):
            return 0.0
        return max(0.0, self.delay - (now - finished))

    def next(self, finished: float, now: float) -> None:
        if self.delay is None or self._expired(finished):
            self.delay = BACKOFF_INITIAL
        else:
            self.delay = min(self.delay * 2, BACKOFF_MAX)
        self.updated = now


def pod_phase(state: Mapping[str, Any], last_state: Mapping[str, Any]) -> str:
    """kubelet's getPhase for one container and restartPolicy Always."""
    if "running" in state or "terminated" in state:
        return "Running"
    return "Running" if "terminated" in last_state else "Pending"


def exit_code(returncode: int) -> int:
    """A container's exit code: 128 + the signal that ended it."""
    return returncode if returncode >= 0 else 128 - returncode


def rss_kb(pid: int) -> int:
    """VmRSS of a process, in kB (from /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"no VmRSS for {pid}")


def listening(ips: set[str]) -> list[str]:
    """`ip:port` of TCP sockets listening on any of these IPv4 addresses."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state != "0A":  # TCP_LISTEN
            continue
        addr, port = local.split(":")
        ip = socket.inet_ntoa(bytes.fromhex(addr)[::-1])
        if ip in ips:
            found.append(f"{ip}:{int(port, 16)}")
    return found


# ---- the kubelet stand-in for one pod ------------------------------------------------------


def _cpu_llamacpp(container: Mapping[str, Any]) -> bool:
    limits = (container.get("resources") or {}).get("limits") or {}
    return bool(_CPU_IMAGE.fullmatch(str(container.get("image", "")))) and not any(
        r in limits for r in GPU_RESOURCE.values()
    )


def runs_as_process(pod: Mapping[str, Any], node: Mapping[str, Any]) -> bool:
    """A pod on a simulated node with a CPU llama.cpp server container."""
    if (node.get("metadata", {}).get("labels") or {}).get(SIMULATED_LABEL) != "true":
        return False
    return any(_cpu_llamacpp(c) for c in pod["spec"].get("containers") or [])


class PodWorker:
    """Runs one pod's engine container as a process, like a kubelet's pod worker (in a
    thread of its own, plus one per probe)."""

    def __init__(self, sim: ProcessNodeSimulator, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        self.thread = threading.Thread(
            target=self._run, name=f"procsim-{meta['namespace']}/{meta['name']}", daemon=True
        )
        self.sim, self.pod = sim, pod
        self.namespace, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.node = pod["spec"]["nodeName"]
        containers = pod["spec"]["containers"]
        self.container = next((c for c in containers if _cpu_llamacpp(c)), containers[0])
        self.cname = str(self.container["name"])
        self.dir = sim.workdir / "pods" / f"{self.namespace}_{self.name}_{self.uid}"
        self.ip: str | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.pids: list[int] = []  # every process this pod ran, in order
        self.exit_codes: list[int] = []  # and how each one ended
        self.logs: list[Path] = []  # and its output
        self.attempts = 0  # containers created (restartCount = attempts - 1)
        # The container's state and last termination, as the API shows them.
        self.state: dict[str, Any] = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state: dict[str, Any] = {}
        self.started = self.ready = False
        self.started_at = ""
        self.started_mono = 0.0
        self.finished: float | None = None  # monotonic time of the last exit
        self.backoff = Backoff()
        self.backoff_reported: float | None = None
        self.stopping: tuple[float, str] | None = None  # (SIGKILL deadline, reason)
        self.gone = False
        self.deleted = threading.Event()
        self.halt = threading.Event()
        self.conditions: dict[str, tuple[str, str]] = {}
        self.start_time = _now()
        self.sent: dict[str, Any] | None = None
        self.config_error = ""
        self.config_retry = 0.0
        self.probes: dict[str, Probe] = {}
        self.probe_setup_error = ""
        ports = {str(p["name"]): int(p["containerPort"]) for p in self.container.get("ports") or []}
        try:
            for kind in ("startup", "readiness", "liveness"):
                spec = self.container.get(f"{kind}Probe")
                if spec:
                    self.probes[kind] = Probe.from_spec(kind, spec, ports)
        except UntranslatableError as err:
            self.probe_setup_error = str(err)
        # (container number, kind, ok, detail) from the probe threads, applied by this one
        self.results: queue.SimpleQueue[tuple[int, str, bool, str]] = queue.SimpleQueue()
        self.probe_history: list[tuple[float, str, bool, str]] = []  # (t, kind, ok, detail)

    # -- called by the simulator's thread --

    def observe(self, pod: dict[str, Any] | None) -> None:
        if pod is None:
            self.gone = True
        else:
            self.pod = pod

    # -- the worker's own thread --

    def start(self) -> None:
        self.thread.start()

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    def _run(self) -> None:
        if not self.probe_setup_error:
            for probe in self.probes.values():
                threading.Thread(
                    target=self._probe_loop,
                    args=(probe,),
                    name=f"{self.name}-{probe.kind}",
                    daemon=True,
                ).start()
        try:
            while not self.halt.is_set():
                try:
                    if self._step():
                        break
                    self._publish()
                except ApiException as err:
                    if err.status == 404:
                        self.gone = True
                    else:
                        log.warning("%s/%s: API %s", self.namespace, self.name, err.status)
                self.halt.wait(0.1)
        except Exception:
            self.sim.errors.append(f"{self.name}: {traceback.format_exc()}")
            raise
        finally:
            self._kill_now()
            if self.ip is not None:
                self.sim.release_address(self.ip)
                self.ip = None
            self.deleted.set()

    @property
    def restarts(self) -> int:
        return max(0, self.attempts - 1)

    def _step(self) -> bool:
        """One sync of the pod; True once the pod is gone."""
        meta = self.pod["metadata"]
        if self.gone or meta.get("deletionTimestamp"):
            return self._confirm_deletion(meta)
        if self.ip is None:
            self.ip = self.sim.take_address()
            if self.ip is None:
                self.state = {
                    "waiting": {"reason": "ContainerCreating", "message": "no free pod address"}
                }
                return False
        if self.process is not None:
            code = self.process.poll()
            if code is not None:
                self._exited(code)
            elif self.stopping is not None:
                self._enforce_deadline()
            else:
                self._probe_results()
        if self.process is None:
            self._maybe_start()
        return False

    def _confirm_deletion(self, meta: Mapping[str, Any]) -> bool:
        if self.process is not None and self.stopping is None:
            grace = meta.get("deletionGracePeriodSeconds")
            if grace is None:
                grace = self.pod["spec"].get("terminationGracePeriodSeconds", 30)
            self._terminate(float(grace), "Stopping container " + self.cname)
        if self.process is not None:
            code = self.process.poll()
            if code is None:
                self._enforce_deadline()
                return False
            self._exited(code)
        if not self.gone:  # the containers are gone: confirm, as the kubelet does
            with contextlib.suppress(ApiException):
                self.sim.core.delete_namespaced_pod(
                    self.name, self.namespace, grace_period_seconds=0
                )
        return True

    def _terminate(self, grace: float, message: str) -> None:
        assert self.process is not None
        self.sim.event(self, "Normal", "Killing", message)
        self.stopping = (time.monotonic() + grace, message)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGTERM)

    def _enforce_deadline(self) -> None:
        assert self.process is not None and self.stopping is not None
        if time.monotonic() >= self.stopping[0]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)

    def _kill_now(self) -> None:
        """The simulator stops: the process must not outlive it."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def _exited(self, returncode: int) -> None:
        code = exit_code(returncode)
        self.exit_codes.append(code)
        terminated = {
            "exitCode": code,
            "reason": "Completed" if code == 0 else "Error",
            "startedAt": self.started_at,
            "finishedAt": _now(),
            "containerID": self._container_id(),
        }
        if self.state.get("terminated"):
            self.last_state = {"terminated": self.state["terminated"]}
        self.state = {"terminated": terminated}
        self.process, self.stopping = None, None
        self.started = self.ready = False
        self.finished = time.monotonic()
        log.info("%s/%s: engine exited with %s", self.namespace, self.name, code)

    def _start_failed(self, message: str) -> None:
        """The container could not start (StartError): visible, then backed off."""
        self.attempts += 1
        self.sim.event(self, "Warning", "Failed", f"Error: {message}")
        if self.state.get("terminated"):
            self.last_state = {"terminated": self.state["terminated"]}
        now = _now()
        self.state = {
            "terminated": {
                "exitCode": 128,
                "reason": "StartError",
                "message": message,
                "startedAt": now,
                "finishedAt": now,
            }
        }
        self.finished = time.monotonic()

    def _maybe_start(self) -> None:
        assert self.ip is not None
        now = time.monotonic()
        if self.finished is not None:
            left = self.backoff.waiting(self.finished, now)
            if left > 0:
                if "terminated" in self.state:
                    self.last_state = {"terminated": self.state["terminated"]}
                delay = int(self.backoff.delay or 0)
                self.state = {
                    "waiting": {
                        "reason": "CrashLoopBackOff",
                        "message": f"back-off {delay}s restarting failed container="
                        f"{self.cname} pod={self.name}_{self.namespace}({self.uid})",
                    }
                }
                if self.backoff_reported != self.finished:
                    self.backoff_reported = self.finished
                    self.sim.event(
                        self, "Warning", "BackOff", "Back-off restarting failed container"
                    )
                return
            self.backoff.next(self.finished, now)
        if now < self.config_retry:
            return
        try:
            if self.probe_setup_error:
                raise UntranslatableError(self.probe_setup_error)
            self._check_pod_shape()
            env = resolve_env(self.container, self._secret)
        except ConfigError as err:
            if self.config_error != str(err):
                self.config_error = str(err)
                self.sim.event(self, "Warning", "Failed", f"Error: {err}")
            self.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(err)}}
            self.finished = None  # retried every second, without back-off
            self.config_retry = now + 1.0
            return
        except UntranslatableError as err:
            self._start_failed(f"procsim cannot run this container: {err}")
            return
        try:
            launch = translate(
                self.container,
                env,
                pod_ip=self.ip,
                model=self.sim.model,
                namespace=self.namespace,
                volumes=self.pod["spec"].get("volumes") or [],
                pvc_root=self.sim.workdir / "pvc",
                settings=self.sim.settings,
            )
        except UntranslatableError as err:
            self._start_failed(f"procsim cannot run this container: {err}")
            return
        self.config_error = ""
        self._spawn(launch)

    def _check_pod_shape(self) -> None:
        spec = self.pod["spec"]
        if spec.get("initContainers"):
            raise UntranslatableError("init containers are not supported")
        if len(spec["containers"]) != 1:
            raise UntranslatableError("only pods of one container (the engine) are supported")

    def _secret(self, name: str, key: str) -> str | None:
        try:
            secret = self.sim.core.read_namespaced_secret(name, self.namespace)
        except ApiException as err:
            if err.status == 404:
                raise ConfigError(f'secret "{name}" not found') from None
            raise
        data = secret.data or {}
        return base64.b64decode(data[key]).decode() if key in data else None

    def _spawn(self, launch: Launch) -> None:
        if launch.model_on_volume and not launch.model.exists():
            launch.model.parent.mkdir(parents=True, exist_ok=True)
            launch.model.symlink_to(self.sim.model)
        self.dir.mkdir(parents=True, exist_ok=True)
        logs = self.dir / self.cname
        logs.mkdir(exist_ok=True)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.dir),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": str(self.sim.shim_dir),
            **launch.env,
        }
        self.logs.append(logs / f"{self.attempts}.log")
        with open(self.logs[-1], "wb") as out:
            self.process = subprocess.Popen(
                [self.sim.python, *launch.args],
                cwd=self.dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.attempts += 1
        self.pids.append(self.process.pid)
        if "terminated" in self.state:
            self.last_state = {"terminated": self.state["terminated"]}
        self.started_at, self.started_mono = _now(), time.monotonic()
        self.state = {"running": {"startedAt": self.started_at}}
        self.started = "startup" not in self.probes
        self.ready = False
        for probe in self.probes.values():
            probe.reset()
        self.sim.event(
            self,
            "Normal",
            "Started",
            f"Started container {self.cname} (procsim: pid {self.process.pid}, "
            f"llama_cpp.server on {launch.host}:{launch.port})",
        )

    def _container_id(self) -> str:
        return f"procsim://{self.pids[-1]}" if self.pids else ""

    def _probe_loop(self, probe: Probe) -> None:
        """One probe's own ticker, as the kubelet runs a worker per probe: at once, then
        every period from the pod's start, only while its container runs (startup before
        the container has started, readiness and liveness after). Like Go's time.Ticker,
        a tick that fires during a slow probe waits (one at most): a probe that times out
        after a whole period is followed by the next one at once."""
        t0 = time.monotonic()
        consumed = -1  # the last tick acted on
        while not self.halt.is_set() and not self.deleted.is_set():
            latest = int((time.monotonic() - t0) // probe.period)  # the last tick fired
            if latest <= consumed:
                if self.halt.wait(max(0.0, t0 + (consumed + 1) * probe.period - time.monotonic())):
                    return
                continue
            consumed = latest
            number, proc, ip, stopping = self.attempts, self.process, self.ip, self.stopping
            if proc is None or ip is None or stopping is not None or proc.poll() is not None:
                continue
            if time.monotonic() - self.started_mono < probe.initial_delay:
                continue
            if (probe.kind == "startup") == self.started:
                continue
            try:
                ok, detail = probe.execute(ip)
            except ValueError as err:
                ok, detail = False, str(err)
            self.results.put((number, probe.kind, ok, detail))

    def _probe_results(self) -> None:
        """Act on the probes' results for the running container (older ones are dropped)."""
        while True:
            try:
                number, kind, ok, detail = self.results.get_nowait()
            except queue.Empty:
                return
            if number != self.attempts or self.process is None or self.stopping is not None:
                continue
            if self.process.poll() is not None:
                return  # it died meanwhile: the exit is what counts
            self.probe_history.append((time.monotonic(), kind, ok, detail))
            probe = self.probes[kind]
            if not ok and detail not in probe.reported:
                probe.reported.add(detail)
                self.sim.event(
                    self, "Warning", "Unhealthy", f"{kind.capitalize()} probe failed: {detail}"
                )
            if not probe.record(ok):
                continue
            if kind == "readiness":
                self.ready = ok
            elif kind == "startup" and ok:
                self.started = True
            elif not ok:  # startup or liveness failed: the container is restarted
                grace = float(self.pod["spec"].get("terminationGracePeriodSeconds", 30))
                self._terminate(
                    grace, f"Container {self.cname} failed {kind} probe, will be restarted"
                )
                return

    def _condition(self, type_: str, ok: bool) -> dict[str, Any]:
        status = "True" if ok else "False"
        before = self.conditions.get(type_)
        if before is None or before[0] != status:
            self.conditions[type_] = (status, _now())
        cond = {"type": type_, "status": status, "lastTransitionTime": self.conditions[type_][1]}
        if not ok:
            cond["reason"] = "ContainersNotReady"
            cond["message"] = f"containers with unready status: [{self.cname}]"
        return cond

    def status(self) -> dict[str, Any]:
        """The pod status a kubelet would report now."""
        ready = self.ready and self.process is not None
        container = {
            "name": self.cname,
            "image": self.container.get("image"),
            "imageID": f"procsim://{self.container.get('image')}",
            "ready": ready,
            "started": self.started and self.process is not None,
            "restartCount": self.restarts,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.pids:
            container["containerID"] = self._container_id()
        status: dict[str, Any] = {
            "phase": pod_phase(self.state, self.last_state),
            "startTime": self.start_time,
            "conditions": [
                self._condition("Initialized", True),
                self._condition("PodScheduled", True),
                self._condition("ContainersReady", ready),
                self._condition("Ready", ready),
            ],
            "containerStatuses": [container],
        }
        if self.ip is not None:
            status |= {"podIP": self.ip, "podIPs": [{"ip": self.ip}]}
        return status

    def _publish(self) -> None:
        status = self.status()
        if status != self.sent:
            self.sim.core.patch_namespaced_pod_status(self.name, self.namespace, {"status": status})
            self.sent = json.loads(json.dumps(status))


# ---- the simulator --------------------------------------------------------------------------


class ProcessNodeSimulator(NodeSimulator):
    """`NodeSimulator` whose CPU llama.cpp pods run as real engine processes.

    `namespaces` limits it to pods there (other tests' pods are left alone); `model` is
    the tiny GGUF every model source maps onto; `workdir` holds logs, the shim and the
    PVC folders. With `simulate_others=False` other pods are left Pending, as on a node
    whose kubelet cannot run them (deletions are still confirmed). `start()` may skip the
    test (no `ip`, or the engine cannot be built)."""

    def __init__(
        self,
        cluster: Cluster,
        workdir: Path,
        model: Path,
        *,
        namespaces: list[str] | None = None,
        addresses: range = ADDRESSES,
        interval: float = 0.25,
        simulate_others: bool = True,
    ) -> None:
        super().__init__(cluster, interval)
        self.workdir, self.model, self.namespaces = workdir, model, namespaces
        self.simulate_others = simulate_others
        self.shim_dir = workdir / "shim"
        # Its own client: pod workers call the API from their threads.
        api = config.new_client_from_config(str(cluster.kubeconfig))  # type: ignore[no-untyped-call]
        self.core = client.CoreV1Api(api)
        self.workers: dict[str, PodWorker] = {}
        self.finished: list[PodWorker] = []
        self.errors: list[str] = []
        self._wanted = addresses
        self._addresses = contextlib.ExitStack()
        self._free: list[str] = []
        self._lock = threading.Lock()
        self._nodes: dict[str, dict[str, Any]] = {}
        self._kinds: dict[str, bool] = {}
        self.python = ""
        self.settings: frozenset[str] = frozenset()

    def start(self) -> ProcessNodeSimulator:
        self.python = tiny_engine_python()
        fields = subprocess.run(
            [
                self.python,
                "-c",
                "from llama_cpp.server.settings import Settings; print(*Settings.model_fields)",
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout.split()
        self.settings = frozenset(f.lower() for f in fields) | {"config_file"}
        self.shim_dir.mkdir(parents=True, exist_ok=True)
        (self.shim_dir / "sitecustomize.py").write_text(SHIM)
        try:
            for n in self._wanted:
                self._free.append(self._addresses.enter_context(local_address(n)))
        except BaseException:  # pytest.skip included: give back what was added
            self._addresses.close()
            raise
        super().start()
        return self

    def stop(self) -> None:
        super().stop()
        for worker in list(self.workers.values()):
            worker.halt.set()
        for worker in list(self.workers.values()):
            worker.join(timeout=20)
        self._addresses.close()

    # -- addresses --

    def take_address(self) -> str | None:
        with self._lock:
            return self._free.pop(0) if self._free else None

    def release_address(self, ip: str) -> None:
        with self._lock:
            self._free.append(ip)

    # -- what tests look at --

    def pods(self, namespace: str, backend: str | None = None) -> list[PodWorker]:
        """Workers of live process-backed pods (oldest first)."""
        return [
            w
            for w in list(self.workers.values())
            if w.namespace == namespace
            and not w.deleted.is_set()
            and (backend is None or w.pod["metadata"]["labels"].get(BACKEND_LABEL) == backend)
        ]

    def _all(self) -> list[PodWorker]:
        return [*list(self.workers.values()), *self.finished]

    def worker(self, namespace: str, pod: str) -> PodWorker:
        for w in self._all():
            if (w.namespace, w.name) == (namespace, pod):
                return w
        raise KeyError(f"{namespace}/{pod} is not a process-backed pod")

    def every_pid(self, namespace: str, backend: str) -> list[int]:
        """Every process ever started for a backend's pods."""
        return [
            pid
            for w in self._all()
            if w.namespace == namespace
            and w.pod["metadata"]["labels"].get(BACKEND_LABEL) == backend
            for pid in w.pids
        ]

    def alive(self, pid: int) -> bool:
        """A process this simulator started is still running (it reaps its children)."""
        for w in self._all():
            proc = w.process
            if proc is not None and proc.pid == pid:
                return proc.poll() is None
        return False

    def event(self, worker: PodWorker, type_: str, reason: str, message: str) -> None:
        now = _now()
        body = {
            "metadata": {"generateName": f"{worker.name}.", "namespace": worker.namespace},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": worker.name,
                "namespace": worker.namespace,
                "uid": worker.uid,
                "fieldPath": f"spec.containers{{{worker.cname}}}",
            },
            "type": type_,
            "reason": reason,
            "message": message,
            "source": {"component": "procsim", "host": worker.node},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.core.create_namespaced_event(worker.namespace, body)  # type: ignore[arg-type]
        except ApiException as err:  # the namespace may be going away
            log.warning("event %s on %s: API %s", reason, worker.name, err.status)

    # -- the loop --

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except ApiException as err:
                log.warning("listing pods: API %s", err.status)
            except Exception:
                self.errors.append(f"simulator: {traceback.format_exc()}")
            self._stop.wait(self.interval)

    def _node(self, name: str) -> dict[str, Any]:
        if name not in self._nodes:
            node = self.core.read_node(name)
            self._nodes[name] = self.core.api_client.sanitize_for_serialization(node)
        return self._nodes[name]

    def _list(self) -> list[Any]:
        if self.namespaces is None:
            return list(self.core.list_pod_for_all_namespaces(label_selector=MANAGED).items)
        pods: list[Any] = []
        for ns in self.namespaces:
            pods += self.core.list_namespaced_pod(ns, label_selector=MANAGED).items
        return pods

    def _tick(self) -> None:
        seen: set[str] = set()
        for pod in self._list():
            meta = pod.metadata
            seen.add(meta.uid)
            if not pod.spec.node_name:
                continue
            data = self.core.api_client.sanitize_for_serialization(pod)
            if meta.uid not in self._kinds:
                self._kinds[meta.uid] = runs_as_process(data, self._node(pod.spec.node_name))
            if self._kinds[meta.uid]:
                worker = self.workers.get(meta.uid)
                if worker is None:
                    worker = self.workers[meta.uid] = PodWorker(self, data)
                    worker.start()
                worker.observe(data)
            else:
                self._simulate(pod)
        for uid, worker in list(self.workers.items()):
            if uid not in seen:
                worker.observe(None)
            if worker.deleted.is_set():
                self.finished.append(self.workers.pop(uid))

    def _simulate(self, pod: Any) -> None:
        """Other pods: what `NodeSimulator` does."""
        meta = pod.metadata
        if meta.deletion_timestamp:
            with contextlib.suppress(ApiException):
                self.core.delete_namespaced_pod(meta.name, meta.namespace, grace_period_seconds=0)
            return
        if not self.simulate_others:
            return
        mode = self.fail.get(meta.labels.get(BACKEND_LABEL, ""), "run")
        if self._applied.get(meta.uid) == mode:
            return
        self.core.patch_namespaced_pod_status(
            meta.name, meta.namespace, {"status": _status(pod, mode)}
        )
        self._applied[meta.uid] = mode


@contextlib.contextmanager
def process_node_simulator(
    cluster: Cluster, workdir: Path, model: Path, **kwargs: Any
) -> Iterator[ProcessNodeSimulator]:
    """The simulator, running; stopped (and every engine process with it) at exit."""
    sim = ProcessNodeSimulator(cluster, workdir, model, **kwargs).start()
    try:
        yield sim
    finally:
        sim.stop()
