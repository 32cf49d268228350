"""Ollama (`ollama serve`), with the model pulled by an init container.

Ollama has no load signal and pulls models on demand; pulling in an init container makes
"Ready" mean "the model is on disk", and `ollama cp` publishes it under servedModelName.
Ollama has no built-in API key: put the fabric gateway in front of it.
"""

from __future__ import annotations

import shlex

from fabric_operator.api.backend import LLMBackend
from fabric_operator.render.engine import CACHE_PATH, EngineContainer, Manifest, plain_env

IMAGE = {
    "cpu": "ollama/ollama:0.13.5",
    "nvidia": "ollama/ollama:0.13.5",
    "amd": "ollama/ollama:0.13.5-rocm",
}
PORT = 11434
# The model store on the cache volume (the image's default, ~/.ollama/models, is in HOME).
MODELS = f"{CACHE_PATH}/models"
PULL_CONTAINER = "pull-model"  # the init container that pulls the model (controller/lists.py)


def pull_script(tag: str, served: str) -> str:
    """Shell run by the init container: serve locally, pull, alias, stop."""
    lines = [
        "set -e",
        "ollama serve & server=$!",
        "until ollama list >/dev/null 2>&1; do sleep 1; done",
        f"ollama pull {shlex.quote(tag)}",
    ]
    if served != tag:
        lines.append(f"ollama cp {shlex.quote(tag)} {shlex.quote(served)}")
    lines.append('kill "$server"')
    return "\n".join(lines)


def container(backend: LLMBackend) -> EngineContainer:
    spec = backend.spec
    tag = str(spec.source.ollama)
    image = IMAGE[spec.gpu_vendor if spec.gpu_count else "cpu"]
    env = [
        plain_env("OLLAMA_HOST", f"0.0.0.0:{PORT}"),
        plain_env("OLLAMA_MODELS", MODELS),
        # The default (5m) unloads an idle model; a server keeps it loaded.
        plain_env("OLLAMA_KEEP_ALIVE", "-1"),
    ]
    if spec.options.context_length:
        env.append(plain_env("OLLAMA_CONTEXT_LENGTH", str(spec.options.context_length)))
    # The cache volume (and HOME) are mounted in it by the common code.
    pull: Manifest = {
        "name": PULL_CONTAINER,
        "image": spec.image or image,
        "command": ["/bin/sh", "-c", pull_script(tag, backend.served_model_name)],
        "env": [plain_env("OLLAMA_HOST", "127.0.0.1:11434"), plain_env("OLLAMA_MODELS", MODELS)],
    }
    if spec.image_pull_policy:
        pull["imagePullPolicy"] = spec.image_pull_policy
    return EngineContainer(
        image=image,
        port=PORT,
        command=["/bin/ollama"],
        args=["serve"],
        env=env,
        init_containers=[pull],
        liveness_path="/",
        readiness_path="/api/tags",
        startup_seconds=600,
    )
