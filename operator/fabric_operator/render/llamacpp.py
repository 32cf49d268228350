"""llama.cpp's `llama-server` (OpenAI-compatible, GGUF models).

Checked against llama.cpp tools/server/README.md (late 2025 builds).
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

# Pinned by build: the rolling tags move under a running backend (server-cuda broke at
# b9282). --jinja (tool calling) is the default from b7170.
BUILD = "b10290"
IMAGE = {
    "cpu": f"ghcr.io/ggml-org/llama.cpp:server-{BUILD}",
    "nvidia": f"ghcr.io/ggml-org/llama.cpp:server-cuda-{BUILD}",
    "amd": f"ghcr.io/ggml-org/llama.cpp:server-rocm-{BUILD}",
}
# Pass host and port always: the server's own defaults (127.0.0.1, a moving port) do not
# suit a pod.
PORT = 8080
ALL_LAYERS = 999


def container(backend: LLMBackend) -> EngineContainer:
    spec, opts = backend.spec, backend.spec.options
    source = spec.source
    args = [
        "--host",
        "0.0.0.0",
        "--port",
        str(PORT),
        "--alias",
        backend.served_model_name,
        "--metrics",
    ]
    if source.huggingface:
        args += ["--hf-repo", source.huggingface.repo]
        flag(args, "--hf-file", source.huggingface.file)
    elif source.url:
        args += ["--model-url", source.url]
    else:
        args += ["--model", str(pvc_model_path(backend))]
    flag(args, "--ctx-size", opts.context_length)
    gpus = spec.gpu_count
    if gpus:
        flag(args, "--n-gpu-layers", ALL_LAYERS)

    env = [plain_env("LLAMA_CACHE", CACHE_PATH), *secrets_env(backend, "LLAMA_API_KEY")]
    return EngineContainer(
        image=IMAGE[spec.gpu_vendor if gpus else "cpu"], port=PORT, args=args, env=env
    )
