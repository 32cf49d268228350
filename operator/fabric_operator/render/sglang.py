"""SGLang's OpenAI-compatible server (`python3 -m sglang.launch_server`).

Checked against the SGLang 0.5.19 and 0.5.23 wheels (srt/server_args.py, utils'
add_api_key_middleware): flags take dashes only; the host defaults to 127.0.0.1. The key
is only a flag (--api-key, no variable), so it travels as $(SGLANG_API_KEY), expanded by
the kubelet from a Secret-backed variable (the Deployment holds the reference, not the
key; the engine's command line does hold it). /health and /metrics stay open to probes and
scrapers; every other route needs the key.
"""

from __future__ import annotations

from fabric_operator.api.backend import LLMBackend
from fabric_operator.render.engine import (
    CACHE_PATH,
    EngineContainer,
    flag,
    plain_env,
    pvc_model_path,
    secret_env,
    shm_volume,
    tensor_parallel,
)

# The last CUDA 12 build (0.5.20 and later need CUDA 13 drivers). No ROCm tag is named by
# the project's own docs: an AMD backend names its image (validation says so).
IMAGE = "lmsysorg/sglang:v0.5.19-cu129"
PORT = 30000
KEY_ENV = "SGLANG_API_KEY"


def container(backend: LLMBackend) -> EngineContainer:
    spec, opts = backend.spec, backend.spec.options
    hf = spec.source.huggingface
    model = hf.repo if hf else pvc_model_path(backend)
    args = [
        "--model-path",
        str(model),
        "--host",
        "0.0.0.0",
        "--port",
        str(PORT),
        "--served-model-name",
        backend.served_model_name,
        "--enable-metrics",
    ]
    flag(args, "--revision", hf.revision if hf else None)
    tp = tensor_parallel(backend)
    if tp > 1:
        flag(args, "--tp-size", tp)
    flag(args, "--context-length", opts.context_length)
    flag(args, "--mem-fraction-static", opts.gpu_memory_utilization)
    flag(args, "--quantization", opts.quantization)
    flag(args, "--dtype", opts.dtype)
    env = [plain_env("HF_HOME", f"{CACHE_PATH}/huggingface")]
    if spec.hf_token_secret_ref:
        env.append(secret_env("HF_TOKEN", spec.hf_token_secret_ref))
    if spec.api_key_secret_ref:
        env.append(secret_env(KEY_ENV, spec.api_key_secret_ref))
        args += ["--api-key", f"$({KEY_ENV})"]
    shm, shm_mount = shm_volume(backend)
    return EngineContainer(
        image=IMAGE,
        port=PORT,
        command=["python3", "-m", "sglang.launch_server"],
        args=args,
        env=env,
        volumes=[shm],
        volume_mounts=[shm_mount],
        python="python3",
    )
