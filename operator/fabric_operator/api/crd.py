"""Generate the LLMBackend CustomResourceDefinition from the pydantic models.

Kubernetes wants a *structural* OpenAPI v3.0 schema: no $ref, no nullable unions, no
`additionalProperties: false`, boolean `exclusiveMinimum`. Pydantic emits JSON Schema
2020-12, so this module translates one into the other. The committed file in `crds/` is
this module's output; a test fails when they drift.
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml

from fabric_operator.api import v1alpha1 as api

JSON = dict[str, Any]

# Keys of JSON Schema that a CRD schema does not accept or that carry no meaning there.
_DROPPED_KEYS = {"title", "$defs", "discriminator", "const"}


def _resolve(ref: str, defs: JSON) -> JSON:
    name = ref.rsplit("/", 1)[-1]
    return dict(defs[name])


def _structural(schema: JSON, defs: JSON) -> JSON:
    """Return `schema` as a structural CRD schema (recursively)."""
    schema = dict(schema)
    if "$ref" in schema:
        target = _resolve(schema.pop("$ref"), defs)
        # The field's own description wins over the referenced class docstring.
        target.update(schema)
        schema = target

    any_of = schema.pop("anyOf", None)
    if any_of is not None:
        non_null = [s for s in any_of if s.get("type") != "null"]
        if schema.get("x-kubernetes-int-or-string"):
            schema.pop("default", None)
        elif len(non_null) == 1:
            merged = _structural(non_null[0], defs)
            merged.update({k: v for k, v in schema.items() if k != "default"})
            schema = merged
        else:
            raise ValueError(f"cannot express union in a structural schema: {any_of}")

    if schema.get("default", ...) is None:
        del schema["default"]
    for key in _DROPPED_KEYS:
        schema.pop(key, None)

    if schema.get("x-kubernetes-int-or-string"):
        schema.pop("type", None)
        return schema

    if "exclusiveMinimum" in schema and not isinstance(schema["exclusiveMinimum"], bool):
        schema["minimum"] = schema.pop("exclusiveMinimum")
        schema["exclusiveMinimum"] = True
    if "exclusiveMaximum" in schema and not isinstance(schema["exclusiveMaximum"], bool):
        schema["maximum"] = schema.pop("exclusiveMaximum")
        schema["exclusiveMaximum"] = True

    if "properties" in schema:
        schema["type"] = "object"
        schema["properties"] = {k: _structural(v, defs) for k, v in schema["properties"].items()}
        schema.pop("additionalProperties", None)
    elif schema.get("type") == "object":
        extra = schema.pop("additionalProperties", True)
        if extra is True or extra == {}:
            schema["x-kubernetes-preserve-unknown-fields"] = True
        else:
            schema["additionalProperties"] = _structural(extra, defs)

    if "items" in schema:
        schema["items"] = _structural(schema["items"], defs)
    return schema


def _model_schema(model: type[api.Model]) -> JSON:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(raw, raw.get("$defs", {}))


def openapi_schema() -> JSON:
    """The openAPIV3Schema of the LLMBackend CRD."""
    spec = _model_schema(api.LLMBackendSpec)
    status = _model_schema(api.LLMBackendStatus)
    return {
        "type": "object",
        "description": "LLMBackend runs an LLM inference server (vLLM, TGI, llama.cpp or "
        "Ollama) behind an OpenAI-compatible endpoint.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def _column(name: str, path: str, kind: str = "string", priority: int = 0, desc: str = "") -> JSON:
    column: JSON = {"name": name, "type": kind, "jsonPath": path}
    if priority:
        column["priority"] = priority
    if desc:
        column["description"] = desc
    return column


PRINTER_COLUMNS = [
    _column("Engine", ".spec.engine", desc="Inference server"),
    _column("Model", ".status.servedModelName", desc="Name clients pass as model"),
    _column("Ready", ".status.ready", desc="Ready/desired replicas"),
    # Wide only, next to Ready: most backends are not autoscaled, and the default view
    # stays one line on a terminal.
    _column(
        "Desired",
        ".status.autoscaling.desiredReplicas",
        kind="integer",
        priority=1,
        desc="Replicas the autoscaler wants",
    ),
    _column(
        "Scaling",
        ".status.autoscaling.reason",
        priority=1,
        desc="Why the autoscaler wants them",
    ),
    _column("Status", ".status.phase", desc="Summary of the conditions"),
    _column("Endpoint", ".status.endpoint", desc="OpenAI-compatible base URL"),
    _column("Age", ".metadata.creationTimestamp", kind="date"),
    _column("GPUs", ".spec.resources.gpu.count", kind="integer", priority=1),
    _column("Reason", '.status.conditions[?(@.type=="Ready")].reason', priority=1),
    _column("Restarts", ".status.restarts", kind="integer", priority=1),
    _column(
        "Start",
        ".status.lastStart.totalSeconds",
        kind="integer",
        priority=1,
        desc="Seconds the newest pod took from creation to ready",
    ),
    _column(
        "Tools",
        ".status.toolCalling",
        priority=1,
        desc="How the engine answers tools (parser, jinja, builtin, provider) or off",
    ),
]


# The API server version that checks x-kubernetes-validations (CEL) by default (beta and
# on in 1.25, GA in 1.29). Before 1.23 the field does not exist, and kubectl's client-side
# validation refuses a CRD that has it: such servers are given the CRD without.
CEL_SINCE = (1, 25)
CEL_KEY = "x-kubernetes-validations"


def supports_cel(git_version: str) -> bool:
    """Whether a server of this version (`v1.20.2`, `v1.28.3-gke.1`) takes the CEL rules."""
    found = re.match(r"v?(\d+)\.(\d+)", git_version)
    return found is not None and (int(found[1]), int(found[2])) >= CEL_SINCE


def without_cel(schema: Any) -> Any:
    """`schema` with every x-kubernetes-validations taken out."""
    if isinstance(schema, dict):
        return {k: without_cel(v) for k, v in schema.items() if k != CEL_KEY}
    if isinstance(schema, list):
        return [without_cel(v) for v in schema]
    return schema


def crd_manifest(*, cel: bool = True) -> JSON:
    """The whole CustomResourceDefinition as a dict (without the CEL rules for servers that
    do not know them)."""
    manifest = _crd_manifest()
    return manifest if cel else without_cel(manifest)


def _crd_manifest() -> JSON:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {
                "app.kubernetes.io/name": "fabric-operator",
                "app.kubernetes.io/component": "crd",
            },
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["all", "fabric"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }


HEADER = "# Generated by `fabric-operator crd` from fabric_operator/api/v1alpha1.py. Do not edit.\n"


def crd_yaml(*, cel: bool = True) -> str:
    return HEADER + yaml.safe_dump(crd_manifest(cel=cel), sort_keys=False, width=100)


def crd_yaml_for_server(version_json: str) -> str:
    """The CRD for the server `kubectl version -o json` describes."""
    server = json.loads(version_json).get("serverVersion") or {}
    return crd_yaml(cel=supports_cel(str(server.get("gitVersion", ""))))
