"""Amazon Bedrock and Vertex AI as remote providers, without a network: the operator
accepts their documented hosts and refuses a backend of theirs without its credential;
the default allow-list names their regional hosts, never a domain where anyone may name
a host (a bucket's); the gateway sends a Bedrock key as the bearer and never sends a
Vertex key."""

from __future__ import annotations

from typing import Any

import pytest

from fabric_operator.gateway.routes import Backend
from fabric_operator.remotehosts import DEFAULT_HOSTS, RemoteHosts
from fabric_operator.validation import validate

BEDROCK_RUNTIME = "https://bedrock-runtime.us-west-2.amazonaws.com/openai/v1"
BEDROCK_MANTLE = "https://bedrock-mantle.eu-central-1.api.aws/v1"
VERTEX = (
    "https://us-central1-aiplatform.googleapis.com/v1/projects/p/locations/us-central1/"
    "endpoints/openapi"
)
VERTEX_GLOBAL = "https://aiplatform.googleapis.com/v1/projects/p/locations/global/endpoints/openapi"


def remote(provider: str, url: str, key: bool = True) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "engine": "remote",
        "remote": {"baseURL": url, "provider": provider, "model": "m"},
    }
    if key:
        spec["apiKeySecretRef"] = {"name": "creds", "key": "key"}
    return {"metadata": {"name": "r", "namespace": "team-a"}, "spec": spec}


@pytest.mark.parametrize(
    ("provider", "url"),
    [
        ("bedrock", BEDROCK_RUNTIME),
        ("bedrock", BEDROCK_MANTLE),
        ("vertex", VERTEX),
        ("vertex", VERTEX_GLOBAL),
    ],
)
def test_the_documented_endpoints_are_valid_remotes(provider: str, url: str) -> None:
    backend, problems = validate(remote(provider, url))
    assert backend is not None and problems == []


@pytest.mark.parametrize(("provider", "url"), [("bedrock", BEDROCK_RUNTIME), ("vertex", VERTEX)])
def test_bedrock_and_vertex_need_their_credential(provider: str, url: str) -> None:
    _, problems = validate(remote(provider, url, key=False))
    assert [p.field for p in problems] == ["spec.apiKeySecretRef"]
    print(problems[0].message)


@pytest.mark.parametrize(
    "url",
    [
        "https://attacker-bucket.s3.amazonaws.com/openai/v1",  # anyone's S3 bucket
        "https://attacker.storage.googleapis.com/v1",  # anyone's Cloud Storage bucket
        "https://bedrock-runtime.us-west-2.amazonaws.com.evil.example/openai/v1",
        "http://bedrock-runtime.us-west-2.amazonaws.com/openai/v1",  # https only
    ],
)
def test_hosts_around_the_providers_are_not_allowed(url: str) -> None:
    assert RemoteHosts().refusal(url) is not None
    _, problems = validate(remote("bedrock", url))
    assert [p.field for p in problems] == ["spec.remote.baseURL"]
    assert len(problems[0].message) < 400  # the long default list is not spelled out


def test_no_default_pattern_covers_a_whole_cloud_domain() -> None:
    wide = [h for h in DEFAULT_HOSTS if h.startswith("*.")]
    assert wide == ["*.openai.azure.com"]
    assert len(set(DEFAULT_HOSTS)) == len(DEFAULT_HOSTS)


def test_bedrock_sends_its_key_as_the_bearer_and_vertex_never_sends_its_key() -> None:
    bedrock = Backend(
        id="ns/b", model="b", urls=(BEDROCK_RUNTIME,), api_key="k", provider="bedrock"
    )
    assert bedrock.headers() == {"authorization": "Bearer k"}
    vertex = Backend(id="ns/v", model="v", urls=(VERTEX,), api_key='{"private_key": "x"}')
    vertex.provider = "vertex"
    assert vertex.headers() == {} and vertex.header_bytes == []
