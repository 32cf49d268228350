"""Hugging Face Text Generation Inference (`text-generation-launcher`).

Checked against TGI 3.3.x (launcher/src/main.rs, router/src/server.rs). TGI is in
maintenance mode upstream: kept working, no new features built on it. API_KEY guards the
generation routes; /health stays open to probes.
"""

from __future__ import annotations

from fabric_operator.api.backend import LLMBackend
from fabric_operator.render.engine import (
    EngineContainer,
    flag,
    plain_env,
    pvc_model_path,
    secrets_env,
    shm_volume,
    tensor_parallel,
)

IMAGE = {
    "nvidia": "ghcr.io/huggingface/text-generation-inference:3.3.5",
    "amd": "ghcr.io/huggingface/text-generation-inference:3.3.5-rocm",
}
# The image's default (PORT=80) needs a privileged port; 8080 does not.
PORT = 8080
DATA = "/data"


def container(backend: LLMBackend) -> EngineContainer:
    spec, opts = backend.spec, backend.spec.options
    hf = spec.source.huggingface
    model = hf.repo if hf else pvc_model_path(backend)
    args = ["--model-id", str(model), "--hostname", "0.0.0.0", "--port", str(PORT)]
    flag(args, "--revision", hf.revision if hf else None)
    # Always: without it the launcher shards over every visible GPU, whatever tp says.
    flag(args, "--num-shard", tensor_parallel(backend))
    flag(args, "--max-total-tokens", opts.context_length)
    flag(args, "--quantize", opts.quantization)
    flag(args, "--dtype", opts.dtype)

    # The image's own HF_HOME (/data), on the cache volume.
    env = [plain_env("HF_HOME", DATA), *secrets_env(backend, "API_KEY")]
    shm, shm_mount = shm_volume(backend)
    return EngineContainer(
        image=IMAGE[spec.gpu_vendor],
        port=PORT,
        args=args,
        env=env,
        volumes=[shm],
        volume_mounts=[shm_mount],
        cache_path=DATA,
        python="python3",
        # Its Python lives under /root/.local/share/uv, which only root can read
        # (huggingface/text-generation-inference#3082, open as of 3.3.7).
        non_root=False,
    )
