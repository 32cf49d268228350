"""spec.autoscaling, spec.routing and status.autoscaling: defaults, the CRD schema's
bounds and columns, and the rules validation.py adds (each naming its field)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from fabric_operator.api.crd import PRINTER_COLUMNS, openapi_schema
from fabric_operator.api.v1alpha1 import (
    Autoscaling,
    LLMBackendSpec,
    LLMBackendStatus,
    Routing,
    RoutingStrategy,
)
from fabric_operator.validation import validate

LLAMACPP: dict[str, Any] = {"engine": "llamacpp", "model": {"url": "https://h.invalid/m.gguf"}}
REMOTE: dict[str, Any] = {"engine": "remote", "remote": {"baseURL": "https://api.openai.com/v1"}}


def problems(spec: dict[str, Any], name: str = "m") -> list[tuple[str, str]]:
    backend, found = validate({"metadata": {"name": name}, "spec": spec})
    assert backend is not None
    return [(p.field, p.message) for p in found]


def test_autoscaling_defaults() -> None:
    spec = LLMBackendSpec.model_validate({**LLAMACPP, "autoscaling": {"maxReplicas": 3}})
    assert spec.autoscaling == Autoscaling(
        min_replicas=1,
        max_replicas=3,
        target_requests=4,
        scale_down_delay_seconds=300,
        hold_timeout_seconds=600,
        max_held_requests=100,
        fallback_after_seconds=None,
    )
    assert spec.routing is None
    assert spec.model_dump(by_alias=True, exclude_none=True)["autoscaling"] == {
        "minReplicas": 1,
        "maxReplicas": 3,
        "targetRequests": 4,
        "scaleDownDelaySeconds": 300,
        "holdTimeoutSeconds": 600,
        "maxHeldRequests": 100,
    }


def test_routing_defaults() -> None:
    routing = LLMBackendSpec.model_validate({**LLAMACPP, "routing": {}}).routing
    assert routing == Routing(strategy=RoutingStrategy.LEAST_IN_FLIGHT, prefix_characters=2048)
    assert Routing.model_validate({"strategy": "PrefixAffinity"}).strategy == "PrefixAffinity"


@pytest.mark.parametrize(
    ("autoscaling", "field"),
    [
        ({}, "maxReplicas"),
        ({"maxReplicas": 0}, "maxReplicas"),
        ({"maxReplicas": 1001}, "maxReplicas"),
        ({"maxReplicas": 2, "minReplicas": -1}, "minReplicas"),
        ({"maxReplicas": 2, "targetRequests": 0}, "targetRequests"),
        ({"maxReplicas": 2, "scaleDownDelaySeconds": -1}, "scaleDownDelaySeconds"),
        ({"maxReplicas": 2, "holdTimeoutSeconds": 0}, "holdTimeoutSeconds"),
        ({"maxReplicas": 2, "maxHeldRequests": -1}, "maxHeldRequests"),
        ({"maxReplicas": 2, "fallbackAfterSeconds": -1}, "fallbackAfterSeconds"),
        ({"maxReplicas": 2, "scaleToZero": True}, "scaleToZero"),
    ],
)
def test_the_model_refuses_out_of_bounds_autoscaling(
    autoscaling: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as err:
        LLMBackendSpec.model_validate({**LLAMACPP, "autoscaling": autoscaling})
    assert [e["loc"] for e in err.value.errors()] == [("autoscaling", field)]


@pytest.mark.parametrize(
    "routing",
    [{"strategy": "RoundRobin"}, {"prefixCharacters": 63}, {"prefixCharacters": 65537}],
)
def test_the_model_refuses_bad_routing(routing: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        LLMBackendSpec.model_validate({**LLAMACPP, "routing": routing})


def test_the_crd_schema_carries_the_fields_and_bounds() -> None:
    props = openapi_schema()["properties"]
    scaling = props["spec"]["properties"]["autoscaling"]
    assert scaling["required"] == ["maxReplicas"]
    bounds = {
        name: (p.get("minimum"), p.get("maximum"), p.get("default"))
        for name, p in scaling["properties"].items()
    }
    assert bounds == {
        "minReplicas": (0, 1000, 1),
        "maxReplicas": (1, 1000, None),
        "targetRequests": (1, 10000, 4),
        "scaleDownDelaySeconds": (0, 86400, 300),
        "holdTimeoutSeconds": (1, 3600, 600),
        "maxHeldRequests": (0, 100000, 100),
        "fallbackAfterSeconds": (0, 3600, None),
    }
    routing = props["spec"]["properties"]["routing"]["properties"]
    assert routing["strategy"]["enum"] == ["LeastInFlight", "PrefixAffinity"]
    assert routing["strategy"]["default"] == "LeastInFlight"
    assert (routing["prefixCharacters"]["minimum"], routing["prefixCharacters"]["maximum"]) == (
        64,
        65536,
    )
    status = props["status"]["properties"]["autoscaling"]["properties"]
    assert {name: p["type"] for name, p in status.items()} == {
        "desiredReplicas": "integer",
        "reason": "string",
        "message": "string",
        "demand": "integer",
        "lastScaleTime": "string",
        "lastDemandTime": "string",
        "gateways": "integer",
    }
    assert status["lastScaleTime"]["format"] == "date-time"
    assert "ScaledToZero" in status["reason"]["description"]
    # kubectl explain says who owns spec.replicas once autoscaling is on.
    assert "autoscaler owns it" in props["spec"]["properties"]["replicas"]["description"]


def test_kubectl_get_wide_shows_desired_replicas_and_why() -> None:
    columns = [(c["name"], c["jsonPath"], c.get("priority", 0)) for c in PRINTER_COLUMNS]
    ready = [name for name, _, _ in columns].index("Ready")
    assert columns[ready + 1 : ready + 3] == [
        ("Desired", ".status.autoscaling.desiredReplicas", 1),
        ("Scaling", ".status.autoscaling.reason", 1),
    ]


def test_status_keeps_the_autoscaling_status() -> None:
    status = LLMBackendStatus.model_validate(
        {"autoscaling": {"desiredReplicas": 0, "reason": "ScaledToZero", "unknown": 1}}
    )
    assert status.autoscaling is not None
    assert (status.autoscaling.desired_replicas, status.autoscaling.reason) == (0, "ScaledToZero")


def test_valid_autoscaling_has_no_problems() -> None:
    spec = {
        **LLAMACPP,
        "replicas": 7,  # outside the bounds: the autoscaler owns it, not an error
        "fallback": ["openai"],
        "autoscaling": {"minReplicas": 0, "maxReplicas": 4, "fallbackAfterSeconds": 20},
        "routing": {"strategy": "PrefixAffinity", "prefixCharacters": 4096},
    }
    assert problems(spec) == []
    assert problems({**LLAMACPP, "autoscaling": {"minReplicas": 3, "maxReplicas": 3}}) == []


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {**LLAMACPP, "autoscaling": {"minReplicas": 5, "maxReplicas": 2}},
            [("spec.autoscaling.minReplicas", "5 is more than maxReplicas (2)")],
        ),
        (
            {**LLAMACPP, "autoscaling": {"maxReplicas": 2, "fallbackAfterSeconds": 10}},
            [
                (
                    "spec.autoscaling.fallbackAfterSeconds",
                    "sends held requests to spec.fallback, which is empty; list a backend "
                    "there or remove fallbackAfterSeconds",
                )
            ],
        ),
        (
            {**REMOTE, "autoscaling": {"maxReplicas": 2}},
            [("spec.autoscaling", "a remote backend runs no pods; remove it")],
        ),
        (
            {**REMOTE, "routing": {"strategy": "PrefixAffinity"}},
            [("spec.routing", "a remote backend runs no pods; remove it")],
        ),
    ],
)
def test_autoscaling_mistakes_are_named(
    spec: dict[str, Any], expected: list[tuple[str, str]]
) -> None:
    assert problems(spec) == expected


def test_out_of_bounds_autoscaling_names_the_field_in_status() -> None:
    backend, found = validate(
        {"metadata": {"name": "m"}, "spec": {**LLAMACPP, "autoscaling": {"maxReplicas": 0}}}
    )
    assert backend is None
    assert [p.field for p in found] == ["spec.autoscaling.maxReplicas"]
