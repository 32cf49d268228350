"""transformers serve: facts pending."""

from __future__ import annotations

from fabric_operator.api.backend import LLMBackend
from fabric_operator.render.engine import EngineContainer

IMAGE = "unset"
PORT = 8000


def container(backend: LLMBackend) -> EngineContainer:
    raise NotImplementedError
