"""Pure rendering: an LLMBackend in, its child manifests out. No API calls here."""

from fabric_operator.render.workload import Children, render

__all__ = ["Children", "render"]
