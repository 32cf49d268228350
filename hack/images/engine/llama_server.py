#!/usr/bin/python3 -I
"""`/app/llama-server` of the fabric CPU engine image: llama.cpp's server CLI on llama-cpp-python.

No container registry is reachable here, so `ghcr.io/ggml-org/llama.cpp:server` cannot be
pulled; this image (hack/images/engine, built by hack/get-images.sh) answers the same
command line and environment as far as fabric-operator renders them
(operator/fabric_operator/render/llamacpp.py), and runs llama-cpp-python's OpenAI server
(`python -m llama_cpp.server`) on CPU instead. The rules are those of the retired
process-based pod simulator, minus what was only about being a process on the host: here
the container has its own network and filesystem, so `--host` is passed through and
`--model PATH` is a real path. Standard library only.

llama-server arguments (or their `LLAMA_ARG_*` variables; arguments win) →
llama_cpp.server. Anything not in this table, or a value that cannot be honoured, exits 2
with a message on stderr: never silently dropped.

| llama-server                          | llama_cpp.server                                    |
|---------------------------------------|-----------------------------------------------------|
| `--host H` (default 127.0.0.1)        | `--host H` (`[::]` → `::`; a `.sock` path refused)  |
| `--port P` (default 8080)             | `--port P`                                          |
| `-a/--alias NAME`                     | `--model_alias NAME`                                |
| `-mu/--model-url URL`                 | `--model /app/models/tiny.gguf` (see below)         |
| `-hf/--hf-repo R` [`-hff/--hf-file F`]| `--model /app/models/tiny.gguf` (see below)         |
| `-m/--model PATH`                     | `--model PATH`                                      |
| `-c/--ctx-size N`                     | `--n_ctx N`                                         |
| `-np/--parallel 1`                    | (one request at a time: the same); N > 1 is refused |
| `--metrics`                           | `/metrics` served by the shim (below)               |
| `LLAMA_API_KEY` env, `--api-key K`    | `API_KEY` env (keeps the key off the command line)  |
| `-t`, `-tb`, `-b`, `-ub`, `-s`, `-ngl`| `--n_threads`, `--n_threads_batch`, `--n_batch`,    |
|                                       | `--n_ubatch`, `--seed`, `--n_gpu_layers`            |
| `--mlock`, `--no-mmap`, `--embedding` | `--use_mlock true`, `--use_mmap false`,             |
|                                       | `--embedding true`                                  |
| `--rope-freq-base/-scale X`           | `--rope_freq_base/--rope_freq_scale X`              |
| `--jinja` (llama-server's default)    | `--chat_format chatml-function-calling` (below)     |
| `--no-jinja`                          | (the GGUF's chat template, no tool calls)           |

Tool calling: llama-server with `--jinja` renders `tools` through the GGUF's template and
parses the model's tool calls (a plain ChatML template gets its generic JSON format,
grammar-constrained). llama_cpp.server's nearest equivalent for the tiny model, whose
template is ChatML, is its `chatml-function-calling` format: the same ChatML prompts, and
tool calls constrained by a grammar. Without --jinja (`--no-jinja`) the GGUF's own
template is used and `tools` are not parsed.

The model: no model hub is reachable, so a URL or Hugging Face source maps onto the tiny
random-weight GGUF baked into the image at /app/models/tiny.gguf (generated at build time
by tests/support/tiny_model.py; label `dev.fabric.engine.model`). With `LLAMA_CACHE` set,
as llama-server does, the "download" is a copy of it into the cache (named after the URL's
file, or `<org>_<repo>_<file>`), made once: a later start finds it there and says so, as a
weight cache on a volume should make it. Without `LLAMA_CACHE`, nothing is written.

Always added: `--verbose false` (llama.cpp's loader log is noise) and
`--interrupt_requests false` (llama_cpp.server would otherwise cut a running stream short
when another request arrives; llama-server queues it). Every other environment variable
is passed through, except ones llama_cpp.server would read as its own settings (`MODEL`,
`PORT`, `HOST`, `API_KEY`...: the names listed in /app/llama-cpp-settings.txt, written at
build time, case-insensitive) or `PYTHON*`: those are refused.

The shim (/app/shim/sitecustomize.py, on the engine's PYTHONPATH only) adds what
llama-server has and llama_cpp.server lacks: `GET /health` and, with `--metrics`,
`GET /metrics` (needs the API key, like llama-server's).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

TINY_MODEL = "/app/models/tiny.gguf"
CHAT_FORMAT = "chatml-function-calling"  # what --jinja stands for (see above)
SETTINGS_FILE = "/app/llama-cpp-settings.txt"
SHIM_DIR = "/app/shim"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080

# llama-server flag or alias -> (canonical name, takes a value)
FLAGS: dict[str, tuple[str, bool]] = {
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
    "--no-jinja": ("no-jinja", False),
}
# llama-server's environment variables (arguments win over them, as in llama-server).
ENV_FLAGS = {
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
    "LLAMA_ARG_JINJA": "jinja",
}
# One-to-one: canonical -> (llama_cpp.server flag, value type)
DIRECT: dict[str, tuple[str, type]] = {
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
SWITCHES = {
    "mlock": ("--use_mlock", "true"),
    "no-mmap": ("--use_mmap", "false"),
    "embedding": ("--embedding", "true"),
}
TRUE = {"1", "true", "on", "enabled", "yes"}
FALSE = {"0", "false", "off", "disabled", "no"}


class UntranslatableError(Exception):
    """The command line cannot be honoured by llama_cpp.server: exit 2, never drop it."""


def _typed(flag: str, value: str, kind: type) -> str:
    try:
        return str(kind(value))
    except ValueError:
        raise UntranslatableError(f"{flag} {value!r}: not a valid {kind.__name__}") from None


def _from_env(
    env: Mapping[str, str], settings: frozenset[str]
) -> tuple[dict[str, str], dict[str, str]]:
    """(llama-server settings given as env, env passed through to the engine)."""
    given: dict[str, str] = {}
    passthrough: dict[str, str] = {}
    for name, value in env.items():
        if name in ENV_FLAGS:
            given[ENV_FLAGS[name]] = value
        elif name.startswith("LLAMA_ARG_"):
            raise UntranslatableError(f"env {name}: no llama_cpp.server equivalent")
        elif name.lower() in settings or name.upper().startswith("PYTHON"):
            raise UntranslatableError(
                f"env {name} would configure llama_cpp.server, not llama-server"
            )
        else:
            passthrough[name] = value
    for key, var in (("metrics", "LLAMA_ARG_ENDPOINT_METRICS"), ("jinja", "LLAMA_ARG_JINJA")):
        if key in given:  # a boolean variable
            flag_value = given.pop(key).strip().lower()
            if flag_value not in TRUE | FALSE:
                raise UntranslatableError(f"{var}={flag_value!r}: not a boolean")
            if flag_value in TRUE:
                given[key] = "true"
            elif key == "jinja":
                given["no-jinja"] = "true"
    return given, passthrough


def _parse_args(args: list[str]) -> dict[str, str]:
    """llama-server's arguments by canonical name (`--flag=value` accepted too)."""
    given: dict[str, str] = {}
    tokens = iter(args)
    for token in tokens:
        name, eq, inline = token.partition("=") if token.startswith("--") else (token, "", "")
        if name not in FLAGS:
            what = "argument" if token.startswith("-") else "positional argument"
            raise UntranslatableError(f"{what} {name!r} has no llama_cpp.server equivalent")
        canonical, takes_value = FLAGS[name]
        if takes_value:
            value = inline if eq else next(tokens, None)
            if value is None:
                raise UntranslatableError(f"argument {name} needs a value")
            given[canonical] = value
        elif eq:
            raise UntranslatableError(f"argument {name} takes no value")
        else:
            given[canonical] = "true"
    return given


def translate(
    args: list[str],
    env: Mapping[str, str],
    *,
    settings: frozenset[str] = frozenset(),
    python: str = "/usr/bin/python3",
) -> tuple[list[str], dict[str, str]]:
    """llama-server's arguments and environment -> (argv, env) of llama_cpp.server.

    `settings`: llama_cpp.server's own setting names (it reads them from the environment
    too); a variable of that name is refused rather than passed through."""
    given, passthrough = _from_env(env, settings | {"config_file"})
    from_args = _parse_args(args)
    if {"jinja", "no-jinja"} & from_args.keys():  # arguments win over the variable
        given.pop("jinja", None)
        given.pop("no-jinja", None)
    given |= from_args

    host = given.get("host", DEFAULT_HOST)
    if host.endswith(".sock"):
        raise UntranslatableError(f"--host {host}: llama_cpp.server cannot listen on a UNIX socket")
    if not host:
        raise UntranslatableError("--host: empty")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # llama-server takes [::]; uvicorn wants ::
    port = _typed("--port", given.get("port", str(DEFAULT_PORT)), int)
    parallel = int(_typed("--parallel", given.get("parallel", "1"), int))
    if parallel > 1:
        raise UntranslatableError(
            f"--parallel {parallel}: llama_cpp.server has no parallel slots "
            "(it serves one request at a time)"
        )
    if "hf-file" in given and "hf-repo" not in given:
        raise UntranslatableError("--hf-file without --hf-repo")
    if "model-url" in given or "hf-repo" in given:
        cache = env.get("LLAMA_CACHE")
        model = f"{cache.rstrip('/')}/{cache_name(given)}" if cache else TINY_MODEL
    elif "model" in given:
        model = given["model"]
    else:
        raise UntranslatableError("no model: one of --model, --model-url or --hf-repo is needed")

    argv = [python, "-m", "llama_cpp.server", "--model", model, "--host", host, "--port", port]
    for canonical, (target, kind) in DIRECT.items():
        if canonical in given:
            argv += [target, _typed(f"--{canonical}", given[canonical], kind)]
    for canonical, (target, value) in SWITCHES.items():
        if canonical in given:
            argv += [target, value]
    if "jinja" in given and "no-jinja" in given:
        raise UntranslatableError("--jinja and --no-jinja: choose one")
    if "no-jinja" not in given:  # --jinja is llama-server's default (b7170 on)
        argv += ["--chat_format", CHAT_FORMAT]
    argv += ["--verbose", "false", "--interrupt_requests", "false"]
    out = {
        **passthrough,
        "PYTHONPATH": SHIM_DIR,
        "PYTHONUNBUFFERED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "FABRIC_ENGINE_SHIM": "1",
    }
    if given.get("metrics") == "true":
        out["FABRIC_ENGINE_METRICS"] = "1"
    if "api-key" in given:
        out["API_KEY"] = given["api-key"]
    return argv, out


def cache_name(given: Mapping[str, str]) -> str:
    """The file a download lands in, in LLAMA_CACHE."""
    if "hf-repo" in given:
        repo = given["hf-repo"].split(":", 1)[0]
        return f"{repo.replace('/', '_')}_{given.get('hf-file', 'model.gguf').replace('/', '_')}"
    name = given["model-url"].split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return name if name.endswith(".gguf") and name != ".gguf" else "model.gguf"


def fetch(model: str, cache: str | None) -> None:
    """The stand-in's download: the baked model copied into the cache unless it is there."""
    if not cache or not model.startswith(cache.rstrip("/") + "/"):
        return
    target = Path(model)
    if target.exists():
        print(f"llama-server (fabric CPU stand-in): found in cache: {model}", file=sys.stderr)
        return
    partial = target.with_name(target.name + ".downloadInProgress")
    partial.write_bytes(Path(TINY_MODEL).read_bytes())
    partial.rename(target)
    print(f"llama-server (fabric CPU stand-in): downloaded to cache: {model}", file=sys.stderr)


def _settings() -> frozenset[str]:
    """llama_cpp.server's setting names, listed at build time (see the Containerfile)."""
    try:
        return frozenset(Path(SETTINGS_FILE).read_text().lower().split())
    except OSError as err:
        raise UntranslatableError(f"{SETTINGS_FILE}: {err.strerror} (a broken image)") from None


def main(argv: list[str]) -> None:
    if argv[1:] in (["-h"], ["--help"]):
        print(__doc__)
        sys.exit(0)
    try:
        args, env = translate(argv[1:], os.environ, settings=_settings(), python=sys.executable)
    except UntranslatableError as err:
        print(f"llama-server (fabric CPU stand-in): error: {err}", file=sys.stderr)
        print("  see `/app/llama-server --help` for what this image supports", file=sys.stderr)
        sys.exit(2)
    fetch(args[args.index("--model") + 1], os.environ.get("LLAMA_CACHE"))
    os.execve(args[0], args, env)


if __name__ == "__main__":
    main(sys.argv)
