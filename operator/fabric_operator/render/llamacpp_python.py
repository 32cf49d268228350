"""llama-cpp-python's OpenAI-compatible server (`python3 -m llama_cpp.server`, GGUF models).

Checked against llama-cpp-python 0.3.2 to 0.3.35 (llama_cpp/server/settings.py, app.py):
settings are command-line flags in snake_case and environment variables of the same names
(pydantic-settings), so the key travels as API_KEY from a Secret. The server loads the
model before it listens and has no /health route (and every route needs the key): the
probes are TCP connects. Tool calling needs a function-calling chat format
(render/toolcalls.py); response_format takes json_object (with an optional `schema`), not
json_schema.
"""

from __future__ import annotations

from fabric_operator.api.backend import LLMBackend
from fabric_operator.render.engine import (
    CACHE_PATH,
    EngineContainer,
    flag,
    plain_env,
    pvc_model_path,
    secrets_env,
)

# The project's own image (docker/simple: CPU only, published now and then; v0.3.2 is the
# newest tag seen in use). No GPU build is published: a GPU backend names its own image
# (validation says so).
IMAGE = "ghcr.io/abetlen/llama-cpp-python:v0.3.2"
PORT = 8000
ALL_LAYERS = -1  # llama-cpp-python's "offload every layer"


def container(backend: LLMBackend) -> EngineContainer:
    spec, opts = backend.spec, backend.spec.options
    source = spec.source
    args = ["--host", "0.0.0.0", "--port", str(PORT), "--model_alias", backend.served_model_name]
    if source.huggingface:
        # Llama.from_pretrained: the repo, and the GGUF file (a glob) inside it.
        args += ["--hf_model_repo_id", source.huggingface.repo]
        args += ["--model", str(source.huggingface.file)]
    else:
        args += ["--model", str(pvc_model_path(backend))]
    flag(args, "--n_ctx", opts.context_length)
    if spec.gpu_count:
        flag(args, "--n_gpu_layers", ALL_LAYERS)

    env = [plain_env("HF_HOME", f"{CACHE_PATH}/huggingface"), *secrets_env(backend, "API_KEY")]
    return EngineContainer(
        image=IMAGE,
        port=PORT,
        command=["python3", "-m", "llama_cpp.server"],
        args=args,
        env=env,
        liveness_path=None,
        readiness_path=None,
    )
