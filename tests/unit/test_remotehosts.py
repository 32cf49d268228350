"""The admin's allow-list of remote hosts: what a team may point a remote backend at."""

from __future__ import annotations

import pytest

from fabric_operator.remotehosts import DEFAULT_HOSTS, RemoteHosts


@pytest.mark.parametrize(
    "url",
    [
        "https://api.openai.com/v1",
        "https://API.OpenAI.com./v1",
        "https://myres.openai.azure.com/openai/v1",
        "https://api.anthropic.com/v1",
        "https://generativelanguage.googleapis.com/v1beta/openai",
        "https://api.openai.com:443/v1",
    ],
)
def test_the_documented_providers_are_allowed_by_default(url: str) -> None:
    assert RemoteHosts().refusal(url) is None


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://api.openai.com/v1", "https only"),
        ("https://evil.example/v1", "not an allowed remote host"),
        ("https://api.openai.com.evil.example/v1", "not an allowed remote host"),
        ("https://openai.azure.com/v1", "not an allowed remote host"),  # no bare domain
        ("https://x.openai.azure.com.evil.example/v1", "not an allowed remote host"),
        ("https://qwen.team-b.svc.cluster.local:8000/v1", "not an allowed remote host"),
        ("https://10.0.0.7/v1", "not an allowed remote host"),
        ("https://user:pw@api.openai.com/v1", "credentials"),
        ("ftp://api.openai.com/v1", "http(s) URL"),
        ("https:///v1", "http(s) URL"),
        ("https://api.openai.com:99999/v1", "not a valid URL"),
    ],
)
def test_anything_else_is_refused_with_its_reason(url: str, why: str) -> None:
    refusal = RemoteHosts().refusal(url)
    assert refusal is not None and why in refusal


def test_the_admin_may_allow_a_host_over_http_and_an_internal_one() -> None:
    hosts = RemoteHosts.of(["llm.internal.example"], ["vllm.shared.svc.cluster.local"])
    assert hosts.refusal("https://llm.internal.example/v1") is None
    assert hosts.refusal("http://vllm.shared.svc.cluster.local:8000/v1") is None
    assert hosts.refusal("https://vllm.shared.svc.cluster.local:8000/v1") is None
    assert hosts.refusal("http://llm.internal.example/v1") is not None
    assert hosts.refusal("https://api.openai.com/v1") is not None  # the list replaces
    assert RemoteHosts.of(None).https == DEFAULT_HOSTS
    assert RemoteHosts.of([]).refusal("https://api.openai.com/v1") is not None
