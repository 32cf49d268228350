"""fabric-operator: serve LLMs on Kubernetes behind OpenAI-compatible endpoints."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fabric-operator")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"
