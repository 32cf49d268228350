"""Where `engine: remote` backends may send requests, and with them a Secret's value.

A team that may create LLMBackends but not read Secrets could otherwise point a remote
backend at a server of its own (or at another team's in-cluster Service) and have the
gateway send it any Secret of the namespace as the provider key. So the platform admin
lists the hosts (Helm `remote.allowedHosts`); anything else is refused by the operator
(InvalidSpec) and never routed by the gateway. https only, unless a host is also listed
for plain http.

Patterns are host names (or one IP address), exact or with one leading `*.` (any
subdomain, never the bare domain); no ports, paths or ranges: an allowed host is one the
admin names.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

# Amazon Bedrock's and Vertex AI's hosts are per region, and a pattern has one leading
# `*.` at most: `*.amazonaws.com` or `*.googleapis.com` would also allow hosts whose
# names anyone can take (an S3 bucket's `NAME.s3.amazonaws.com`, a Cloud Storage
# bucket's `NAME.storage.googleapis.com`), and with them a backend's key. So the regions
# are listed, as the providers document them (README: Remote providers); an admin adds
# a newer one to `remote.allowedHosts`.
#
# bedrock-runtime (Chat Completions under /openai/v1): "Regional availability by
# endpoints", Amazon Bedrock User Guide; bedrock-runtime is in every Bedrock Region.
BEDROCK_RUNTIME_REGIONS = (
    "us-east-1", "us-east-2", "us-west-1", "us-west-2", "us-gov-east-1", "us-gov-west-1",
    "ca-central-1", "ca-west-1", "sa-east-1",
    "eu-central-1", "eu-central-2", "eu-north-1", "eu-south-1", "eu-south-2",
    "eu-west-1", "eu-west-2", "eu-west-3",
    "ap-east-2", "ap-northeast-1", "ap-northeast-2", "ap-northeast-3", "ap-south-1",
    "ap-south-2", "ap-southeast-1", "ap-southeast-2", "ap-southeast-3", "ap-southeast-4",
    "ap-southeast-5", "ap-southeast-7",
    "me-central-1", "me-south-1", "il-central-1", "af-south-1",
)  # fmt: skip
# bedrock-mantle (OpenAI-compatible, under /v1): "Generate responses using OpenAI APIs".
BEDROCK_MANTLE_REGIONS = (
    "us-east-1", "us-east-2", "us-west-2", "ap-southeast-3", "ap-south-1", "ap-northeast-1",
    "eu-central-1", "eu-west-1", "eu-west-2", "eu-south-1", "eu-north-1", "sa-east-1",
)  # fmt: skip
# Vertex AI generative AI locations ("Generative AI on Vertex AI locations"); `global`
# is the host without a location prefix.
VERTEX_LOCATIONS = (
    "us-central1", "us-east1", "us-east4", "us-east5", "us-south1", "us-west1", "us-west4",
    "northamerica-northeast1", "southamerica-east1",
    "europe-central2", "europe-north1", "europe-southwest1", "europe-west1", "europe-west2",
    "europe-west3", "europe-west4", "europe-west6", "europe-west8", "europe-west9",
    "asia-east1", "asia-east2", "asia-northeast1", "asia-northeast3", "asia-south1",
    "asia-southeast1", "australia-southeast1", "me-central1", "me-central2", "me-west1",
)  # fmt: skip

# The documented providers' OpenAI-compatible endpoints (README: Remote providers).
DEFAULT_HOSTS = (
    "api.openai.com",
    "*.openai.azure.com",
    "api.anthropic.com",
    "generativelanguage.googleapis.com",
    *(f"bedrock-runtime.{r}.amazonaws.com" for r in BEDROCK_RUNTIME_REGIONS),
    *(f"bedrock-mantle.{r}.api.aws" for r in BEDROCK_MANTLE_REGIONS),
    "aiplatform.googleapis.com",
    *(f"{loc}-aiplatform.googleapis.com" for loc in VERTEX_LOCATIONS),
)
LISTED = 8  # hosts a refusal names before "and N more"


def _matches(host: str, pattern: str) -> bool:
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".openai.azure.com"
        return host.endswith(suffix) and len(host) > len(suffix)
    return host == pattern


@dataclass(frozen=True)
class RemoteHosts:
    """The admin's allow-list: hosts over https, and the few also allowed over http."""

    https: tuple[str, ...] = DEFAULT_HOSTS
    http: tuple[str, ...] = ()

    @classmethod
    def of(cls, https: Iterable[str] | None, http: Iterable[str] | None = None) -> RemoteHosts:
        return cls(tuple(https) if https is not None else DEFAULT_HOSTS, tuple(http or ()))

    def refusal(self, base_url: str) -> str | None:
        """Why `base_url` may not be called (None: it may), never quoting more than the
        URL's scheme and host."""
        try:
            parts = urlsplit(base_url)
            host = (parts.hostname or "").lower().rstrip(".")
            parts.port  # noqa: B018 - raises on a malformed port
        except ValueError:
            return "is not a valid URL"
        if parts.scheme not in ("https", "http") or not host:
            return "must be an http(s) URL with a host"
        if parts.username or parts.password:
            return "must not carry credentials"
        allowed = self.https + self.http if parts.scheme == "https" else self.http
        if any(_matches(host, p) for p in allowed):
            return None
        if parts.scheme == "http" and any(_matches(host, p) for p in self.https):
            return f"host {host} is allowed over https only"
        listed = _some(self.https + self.http)
        return f"host {host} is not an allowed remote host (the platform admin's list: {listed})"


def _some(hosts: tuple[str, ...]) -> str:
    """The list as a status message can hold it: its first hosts, and how many more."""
    if not hosts:
        return "empty"
    more = len(hosts) - LISTED
    return ", ".join(hosts[:LISTED]) + (f" and {more} more" if more > 0 else "")
