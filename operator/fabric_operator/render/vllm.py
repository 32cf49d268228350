"""vLLM's OpenAI-compatible server (`vllm serve`).

Checked against vLLM v0.11 (docs and vllm/entrypoints/openai/cli_args.py).
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
    shm_volume,
    tensor_parallel,
)

IMAGE = {"nvidia": "vllm/vllm-openai:v0.11.0", "amd": "rocm/vllm:rocm7.0.0_vllm_0.11.2_20251210"}
PORT = 8000


def container(backend: LLMBackend) -> EngineContainer:
    spec, opts = backend.spec, backend.spec.options
    hf = spec.source.huggingface
    model = hf.repo if hf else pvc_model_path(backend)
    args = [
        str(model),
        "--host",
        "0.0.0.0",
        "--port",
        str(PORT),
        "--served-model-name",
        backend.served_model_name,
    ]
    flag(args, "--revision", hf.revision if hf else None)
    tp = tensor_parallel(backend)
    if tp > 1:
        flag(args, "--tensor-parallel-size", tp)
    flag(args, "--max-model-len", opts.context_length)
    flag(args, "--gpu-memory-utilization", opts.gpu_memory_utilization)
    flag(args, "--quantization", opts.quantization)
    flag(args, "--dtype", opts.dtype)

    # vLLM reads VLLM_API_KEY like --api-key, and /health stays open to probes.
    env = [plain_env("HF_HOME", f"{CACHE_PATH}/huggingface"), *secrets_env(backend, "VLLM_API_KEY")]
    shm, shm_mount = shm_volume(backend)
    return EngineContainer(
        image=IMAGE[spec.gpu_vendor],
        port=PORT,
        command=["vllm", "serve"],
        args=args,
        env=env,
        volumes=[shm],
        volume_mounts=[shm_mount],
        python="python3",
    )
