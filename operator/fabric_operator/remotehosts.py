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

# The documented providers' OpenAI-compatible endpoints (README: Remote providers).
DEFAULT_HOSTS = (
    "api.openai.com",
    "*.openai.azure.com",
    "api.anthropic.com",
    "generativelanguage.googleapis.com",
)


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
        return (
            f"host {host} is not an allowed remote host (the platform admin's list: "
            f"{', '.join(self.https + self.http) or 'empty'})"
        )
