"""OpenLLM (`openllm serve`, 0.6.x): a model of its catalogue, served by BentoML.

Checked against openllm 0.6.30 and bentoml 1.4.8 (openllm/__main__.py, local.py,
common.py; bentoml _internal/server/base_app.py): `openllm serve <model>` resolves a tag of
the bentoml/openllm-models catalogue (not a Hub id), builds the model's environment under
OPENLLM_HOME, and runs `bentoml serve` on port 3000, OpenAI routes under /v1, /livez and
/readyz (500 until the model is loaded). No official image is published for 0.6 and the
catalogue is cloned from GitHub at start: the backend names an image with openllm installed
and, for clusters without internet access, the catalogue and environment built in
(OPENLLM_HOME, left as the image sets it: the image's user, not the restricted one, owns
it). No API key: put the fabric gateway in front.
"""

from __future__ import annotations

from fabric_operator.api.backend import LLMBackend
from fabric_operator.render.engine import CACHE_PATH, EngineContainer, plain_env, secret_env

PORT = 3000


def container(backend: LLMBackend) -> EngineContainer:
    spec = backend.spec
    assert spec.image is not None  # validation: there is no official image
    env = [plain_env("HF_HOME", f"{CACHE_PATH}/huggingface")]
    if spec.hf_token_secret_ref:  # gated models of the catalogue
        env.append(secret_env("HF_TOKEN", spec.hf_token_secret_ref))
    return EngineContainer(
        image=spec.image,
        port=PORT,
        command=["openllm", "serve"],
        args=[str(spec.source.openllm), "--port", str(PORT)],
        env=env,
        liveness_path="/livez",
        readiness_path="/readyz",
        non_root=False,
    )
