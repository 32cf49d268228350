"""Any container that already speaks the OpenAI API (engine openai-compatible, spec.server).

The operator cannot know the server's flags, so it hands the model over the way every
image can take it: environment variables, which the user's args name with Kubernetes'
own $(VAR) expansion (`--model $(FABRIC_MODEL)`). The key goes into the variable the
server reads (spec.server.apiKeyEnv) and, for servers that take it only as a flag, into
FABRIC_API_KEY for `--api-key $(FABRIC_API_KEY)`: expanded by the kubelet, so the
Deployment holds only the reference, never the key.
"""

from __future__ import annotations

from fabric_operator.api.backend import LLMBackend
from fabric_operator.render.engine import (
    CACHE_PATH,
    EngineContainer,
    Manifest,
    plain_env,
    pvc_model_path,
    secret_env,
)

MODEL_ENV = "FABRIC_MODEL"
REVISION_ENV = "FABRIC_MODEL_REVISION"
SERVED_NAME_ENV = "FABRIC_SERVED_MODEL_NAME"
PORT_ENV = "FABRIC_PORT"
KEY_ENV = "FABRIC_API_KEY"
# What this module sets; spec.env may not replace them (validation).
MANAGED_ENV = frozenset({MODEL_ENV, REVISION_ENV, SERVED_NAME_ENV, PORT_ENV, KEY_ENV})


def model_reference(backend: LLMBackend) -> str:
    """The model as a server takes it: a Hub repo id, a path in the pod, or a URL."""
    source = backend.spec.source
    if source.huggingface is not None:
        return source.huggingface.repo
    if source.url is not None:
        return source.url
    return str(pvc_model_path(backend))


def container(backend: LLMBackend) -> EngineContainer:
    spec = backend.spec
    server = spec.server
    assert server is not None and spec.image is not None  # validation requires both
    hf = spec.source.huggingface
    env: list[Manifest] = [
        plain_env(MODEL_ENV, model_reference(backend)),
        plain_env(SERVED_NAME_ENV, backend.served_model_name),
        plain_env(PORT_ENV, str(server.port)),
        plain_env("HF_HOME", f"{CACHE_PATH}/huggingface"),
    ]
    if hf is not None and hf.revision:
        env.append(plain_env(REVISION_ENV, hf.revision))
    if spec.hf_token_secret_ref:
        env.append(secret_env("HF_TOKEN", spec.hf_token_secret_ref))
    if spec.api_key_secret_ref:
        env.append(secret_env(KEY_ENV, spec.api_key_secret_ref))
        if server.api_key_env and server.api_key_env != KEY_ENV:
            env.append(secret_env(server.api_key_env, spec.api_key_secret_ref))
    return EngineContainer(
        image=spec.image,
        port=server.port,
        command=list(server.command) if server.command else None,
        args=list(server.args or []),
        env=env,
        liveness_path=server.health_path,
        readiness_path=server.readiness_path or server.health_path,
    )
