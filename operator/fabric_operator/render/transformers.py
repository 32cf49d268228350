"""Hugging Face Transformers' OpenAI-compatible server (`transformers serve`).

Checked against transformers 5.25.0 (transformers/cli/serve.py, cli/serving/server.py,
model_manager.py, utils.py), run on CPU with torch 2.13.0 (tests/gateway,
tests/e2e/test_transformers_in_cluster.py).

- No official image: Hugging Face's Docker Hub images are its CI's (built from git main,
  without the `serving` extras), so there is no IMAGE to pin and spec.image is required:
  any image with `pip install "transformers[serving]"` (and torch) will do.
- The model is a positional argument (`transformers serve MODEL`), a Hub repo or a local
  path, loaded before the server listens (so /health answering means loaded). With it
  the server is pinned: a request naming another model is refused (400), and there is no
  option for another name. So a launcher (LAUNCHER, run by the image's python3) gives
  the weights the served name: it downloads a Hub repo into HF_HOME first (the revision
  from FABRIC_MODEL_REVISION), links `/cache/served/<servedModelName>` to the weights'
  folder, and runs `transformers serve <servedModelName> ...` from /cache/served, a
  local path by that name. Without a model the server would load any Hub repo a request
  names: this module always passes one.
- No API key, no /metrics (like Ollama: keep it behind the gateway, with a
  networkPolicy). Its routes beyond the OpenAI ones (/v1/chat/completions,
  /v1/completions, /v1/responses, /v1/models) include unauthenticated POST /reset (the
  model reloads on the next request) and /load_model.
- Tool calls come back as choices[0].message.tool_calls (streamed too) for the model
  types it has a response template for (qwen2, qwen2_moe, qwen3, qwen3_moe, qwen3_next,
  qwen3_5, gemma4, Qwen2/2.5/3 VL) or a tokenizer that ships `response_template`;
  tool_choice and response_format are ignored (logged), nothing constrains the output.
- One request at a time unless --continuous-batching (works on CPU too); not on by
  default, pass it in extraArgs. No tensor parallelism: on GPUs the weights are spread
  over the pod's devices (device_map "auto").
"""

from __future__ import annotations

from fabric_operator.api.backend import LLMBackend
from fabric_operator.render.engine import (
    EngineContainer,
    empty_dir,
    flag,
    plain_env,
    pvc_model_path,
    secret_env,
)

IMAGE = None  # no official image: spec.image is required (see above)
PORT = 8000  # its default (host default: localhost, so --host is always passed)
CACHE = "/cache"
SERVED = f"{CACHE}/served"  # the served name's link lives here, the server's working dir
# Weights transformers never loads from a Hub repo: not downloaded.
SKIPPED = ("*.gguf", "*.onnx", "*.onnx_data", "*.h5", "*.msgpack", "*.ot", "*.tflite")
SKIPPED_DIRS = ("original/*", "onnx/*", "openvino/*")

# Run as `python3 -c LAUNCHER MODEL ARGS...`: MODEL is a local path (/models/...) or a Hub
# repo; ARGS go to `transformers serve` after the model; the rest comes from FABRIC_*
# variables. The served name must be a relative path without `.` or `..` (transformers
# reads `a:b.gguf` as a GGUF file in repo `a`, and `a@b` as revision b of repo a unless a
# path by that name exists, which the link makes sure of).
LAUNCHER = f"""\
import os, sys
name, model, args = os.environ["FABRIC_SERVED_MODEL_NAME"], sys.argv[1], sys.argv[2:]
served = os.environ["FABRIC_SERVED_DIR"]
parts = name.split("/")
if name.startswith("/") or {{"", ".", ".."}} & set(parts) or ":" in name and name.endswith(".gguf"):
    sys.exit(f"served model name {{name!r}}: transformers serve needs a relative path")
if not model.startswith("/"):
    from huggingface_hub import snapshot_download
    model = snapshot_download(
        model,
        revision=os.environ.get("FABRIC_MODEL_REVISION") or None,
        ignore_patterns={[*SKIPPED, *SKIPPED_DIRS]!r},
    )
link = os.path.join(served, name)
os.makedirs(os.path.dirname(link), exist_ok=True)
if os.path.lexists(link):
    os.unlink(link)
os.symlink(model, link)
os.chdir(served)
cli = [sys.executable, "-m", "transformers.cli.transformers", "serve", name, *args]
os.execv(sys.executable, cli)
"""


def container(backend: LLMBackend) -> EngineContainer:
    spec, opts = backend.spec, backend.spec.options
    hf = spec.source.huggingface
    model = hf.repo if hf else pvc_model_path(backend)
    args = [str(model), "--host", "0.0.0.0", "--port", str(PORT)]
    if not spec.gpu_count:
        args += ["--device", "cpu"]  # "auto" would do the same, said plainly
    flag(args, "--dtype", opts.dtype)
    flag(args, "--max-model-len", opts.context_length)
    flag(args, "--quantization", opts.quantization)  # bnb-4bit or bnb-8bit (GPU)

    env = [
        plain_env("HF_HOME", f"{CACHE}/huggingface"),
        # The CLI would otherwise ask PyPI for a newer transformers at every start.
        plain_env("HF_HUB_DISABLE_UPDATE_CHECK", "1"),
        plain_env("FABRIC_SERVED_MODEL_NAME", backend.served_model_name),
        plain_env("FABRIC_SERVED_DIR", SERVED),
    ]
    if hf and hf.revision:
        env.append(plain_env("FABRIC_MODEL_REVISION", hf.revision))
    if spec.hf_token_secret_ref:
        env.append(secret_env("HF_TOKEN", spec.hf_token_secret_ref))
    cache, cache_mount = empty_dir("cache", CACHE)
    return EngineContainer(
        image=spec.image or "",  # required by validation: there is no default
        port=PORT,
        command=["python3", "-c", LAUNCHER],
        args=args,
        env=env,
        volumes=[cache],
        volume_mounts=[cache_mount],
        non_root=True,
        liveness_path="/health",
        readiness_path="/health",
    )
