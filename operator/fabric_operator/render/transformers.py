"""Hugging Face Transformers' OpenAI-compatible server (`transformers serve`).

Checked against transformers 5.25.0 (transformers/cli/serve.py, cli/serving/server.py,
model_manager.py, utils.py) and its flags back to 5.10; run on CPU with torch 2.13.0
(tests/gateway/test_transformers_serve.py, tests/e2e/test_transformers_in_cluster.py).

- No official image: Hugging Face's Docker Hub images are its CI's (built from git main,
  without the `serving` extras). The backend names one (validation): python3 with
  `transformers[serving]` >= 5.10 (the model became a positional argument then; 5.0 had
  --force-model) and torch; --max-model-len (engineOptions.contextLength) needs 5.25.
- The model is a positional argument (`transformers serve MODEL`), a Hub repo or a local
  path, loaded before the server listens (so /health answering means loaded; it answers
  503 once the model's process died, and the server exits). With it the server is pinned:
  a request naming another model is refused (400) and there is no option for another
  name. So a launcher (LAUNCHER, run by the image's python3) gives the weights the served
  name: it downloads a Hub repo into HF_HOME first (what spec.cache.preload leaves there
  is found, not fetched again), links `/served/<servedModelName>` (a volume of the pod's)
  to the weights' folder and runs `transformers serve <servedModelName> ...` from
  /served, a local path by that name. Without a model the server would load any Hub
  repo a request names: this module always passes one.
- No API key, no /metrics (like Ollama: keep it behind the gateway, with a
  networkPolicy). Besides the OpenAI routes (/v1/chat/completions, /v1/completions,
  /v1/responses, /v1/models) it answers unauthenticated POST /reset (the model's process
  stops; it reloads on the next request) and POST /load_model.
- Tool calls come back as choices[0].message.tool_calls (streamed too) for the model types
  it has a response template for (qwen2, qwen2_moe, qwen3, qwen3_moe, qwen3_next, qwen3_5,
  gemma4, the Qwen VL ones) or a tokenizer that ships `response_template`; tool_choice and
  response_format are ignored (logged): nothing constrains the output.
- One request at a time unless --continuous-batching (works on CPU too): not on by
  default, extraArgs can add it. No tensor parallelism: on GPUs the weights are spread
  over the pod's devices (device_map "auto"). The model runs in a process of its own
  (multiprocessing spawn): two Python processes with torch, ~0.4 GB each before weights.
"""

from __future__ import annotations

from fabric_operator.api.backend import LLMBackend
from fabric_operator.render.engine import (
    CACHE_PATH,
    EngineContainer,
    empty_dir,
    flag,
    plain_env,
    pvc_model_path,
    secret_env,
)

PORT = 8000  # its default (the host's default is localhost: --host is always passed)
# The served name's link and the server's working dir: a volume of the pod's own (the
# cache may be a claim shared by other backends).
SERVED = "/served"
# Not downloaded from a Hub repo: files transformers does not load; pickled *.bin too
# when the repo has safetensors, and Mistral's consolidated copy beside an index. The same
# as cache.PRELOAD_SCRIPT (test-checked, by running both): what one fetched into HF_HOME,
# the other finds there.
SKIPPED = ["original/*", "*.pt", "*.pth", "*.gguf", "*.onnx", "*.msgpack", "*.h5"]

# Run as `python3 -c LAUNCHER MODEL ARGS...`: MODEL is a local path (/models/...) or a Hub
# repo; ARGS go to `transformers serve` after the model; the rest comes from FABRIC_*
# variables. The served name must be a relative path without `.` or `..` (transformers
# reads `a:b.gguf` as a GGUF file in repo `a`, and `a@b` as revision b of repo a unless a
# path by that name exists, which the link makes sure of).
LAUNCHER = f"""\
import os, sys
name, model, args = os.environ["FABRIC_SERVED_MODEL_NAME"], sys.argv[1], sys.argv[2:]
served = os.environ["FABRIC_SERVED_DIR"]
gguf = ":" in name and name.endswith(".gguf")
if name.startswith("/") or {{"", ".", ".."}} & set(name.split("/")) or gguf:
    sys.exit(f"served model name {{name!r}}: transformers serve needs a relative path")
if not model.startswith("/"):  # a Hub repo: fetched as cache.PRELOAD_SCRIPT fetches it
    from huggingface_hub import HfApi, snapshot_download
    revision, skip = os.environ.get("FABRIC_MODEL_REVISION") or None, {SKIPPED!r}
    try:
        files = HfApi().list_repo_files(model, revision=revision)
    except Exception:  # the Hub out of reach: the weights may be in the cache already
        model = snapshot_download(model, revision=revision, local_files_only=True)
    else:
        if any(f.endswith(".safetensors") for f in files):
            skip.append("*.bin")
            if any(f.endswith("model.safetensors.index.json") for f in files):
                skip.append("consolidated*.safetensors")
        model = snapshot_download(model, revision=revision, ignore_patterns=skip)
link = os.path.join(served, name)
os.makedirs(os.path.dirname(link), exist_ok=True)
new = link + ".new"
if os.path.lexists(new):
    os.unlink(new)
os.symlink(model, new)
os.replace(new, link)  # a restart's link replaces the last one's
os.chdir(served)
cli = [sys.executable, "-m", "transformers.cli.transformers", "serve", name, *args]
os.execv(sys.executable, cli)
"""


def served_name_error(name: str) -> str | None:
    """Why the launcher would refuse this served name (validation can say it at apply
    time; LAUNCHER's own check is the same, test-checked)."""
    gguf = ":" in name and name.endswith(".gguf")
    if name.startswith("/") or {"", ".", ".."} & set(name.split("/")) or gguf:
        return (
            f"{name!r}: transformers serve takes the served name as a relative path "
            "(no leading /, no empty, . or .. segment, no :<file>.gguf)"
        )
    return None


def container(backend: LLMBackend) -> EngineContainer:
    spec, opts = backend.spec, backend.spec.options
    assert spec.image is not None  # validation: there is no official image
    hf = spec.source.huggingface
    model = hf.repo if hf else pvc_model_path(backend)
    args = [str(model), "--host", "0.0.0.0", "--port", str(PORT)]
    if not spec.gpu_count:
        args += ["--device", "cpu"]  # "auto" would do the same, said plainly
    flag(args, "--dtype", opts.dtype)
    flag(args, "--max-model-len", opts.context_length)
    flag(args, "--quantization", opts.quantization)  # bnb-4bit or bnb-8bit (GPU)

    env = [
        plain_env("HF_HOME", f"{CACHE_PATH}/huggingface"),
        # The CLI would otherwise ask PyPI for a newer transformers at every start.
        plain_env("HF_HUB_DISABLE_UPDATE_CHECK", "1"),
        plain_env("FABRIC_SERVED_MODEL_NAME", backend.served_model_name),
        plain_env("FABRIC_SERVED_DIR", SERVED),
    ]
    if hf and hf.revision:
        env.append(plain_env("FABRIC_MODEL_REVISION", hf.revision))
    if spec.hf_token_secret_ref:
        env.append(secret_env("HF_TOKEN", spec.hf_token_secret_ref))
    served, served_mount = empty_dir("served", SERVED)
    return EngineContainer(
        image=spec.image,
        port=PORT,
        command=["python3", "-c", LAUNCHER],
        args=args,
        env=env,
        volumes=[served],
        volume_mounts=[served_mount],
        python="python3",  # huggingface_hub comes with transformers: preload works
        liveness_path="/health",
        readiness_path="/health",
    )
