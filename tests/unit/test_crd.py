"""The committed CRD is the generated one, and it is a structural schema Kubernetes accepts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from fabric_operator.api.crd import (
    crd_manifest,
    crd_yaml,
    crd_yaml_for_server,
    supports_cel,
    without_cel,
)
from fabric_operator.api.v1alpha1 import LLMBackendSpec
from fabric_operator.cli import main
from tests.conftest import REPO

CRD_FILE = REPO / "crds" / "llm.fabric.dev_llmbackends.yaml"


def test_committed_crd_matches_models() -> None:
    assert CRD_FILE.read_text() == crd_yaml(), (
        "crds/ differs from the API models: run `make crd` and commit the result"
    )


def test_cli_prints_the_crd(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crd"]) == 0
    assert capsys.readouterr().out == crd_yaml()
    assert main(["crd", "--without-cel"]) == 0
    out = capsys.readouterr().out
    assert out == crd_yaml(cel=False) and "x-kubernetes-validations" not in out


def _walk(schema: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(schema, dict):
        yield path, schema
        for key, value in schema.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            yield from _walk(value, f"{path}[{i}]")


def _schema() -> dict[str, Any]:
    version = crd_manifest()["spec"]["versions"][0]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def test_schema_is_structural() -> None:
    for path, node in _walk(_schema()):
        assert "$ref" not in node, path
        assert "title" not in node, path
        assert node.get("additionalProperties") is not False, path
        assert node.get("default", 0) is not None, path
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True, path


def test_schema_validates_what_it_can() -> None:
    spec = _schema()["properties"]["spec"]
    props = spec["properties"]
    assert spec["required"] == ["engine"]
    assert spec["oneOf"] == [{"required": ["model"]}, {"required": ["remote"]}]
    assert props["engine"]["enum"] == [
        "vllm",
        "tgi",
        "llamacpp",
        "llamacpp-python",
        "ollama",
        "sglang",
        "transformers",
        "openllm",
        "openai-compatible",
        "remote",
    ]
    assert props["remote"]["required"] == ["baseURL"]
    assert props["fallback"]["maxItems"] == 8
    assert props["replicas"] == {
        "default": 1,
        "description": LLMBackendSpec.model_fields["replicas"].description,
        "maximum": 1000,
        "minimum": 0,
        "type": "integer",
    }
    assert props["model"]["oneOf"] == [
        {"required": [s]} for s in ("huggingface", "url", "ollama", "pvc", "openllm")
    ]
    gpu = props["resources"]["properties"]["gpu"]["properties"]
    assert gpu["count"]["minimum"] == 0
    assert gpu["vendor"]["enum"] == ["nvidia", "amd"]
    memory = props["resources"]["properties"]["limits"]["properties"]["memory"]
    assert memory["x-kubernetes-int-or-string"] is True and "pattern" in memory
    util = props["engineOptions"]["properties"]["gpuMemoryUtilization"]
    assert (util["minimum"], util["exclusiveMinimum"], util["maximum"]) == (0, True, 1)
    assert props["affinity"]["x-kubernetes-preserve-unknown-fields"] is True
    for path, node in _walk(spec):
        kind = node.get("type")
        leaf = isinstance(kind, str) and kind != "object"
        if leaf and not path.endswith((".items", ".additionalProperties")):
            assert node.get("description"), f"{path} has no description for kubectl explain"


def test_crd_names_columns_and_subresources() -> None:
    crd = crd_manifest()
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "llmbackends.llm.fabric.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == ["llmb"]
    version = spec["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert "status" in version["subresources"]
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert [c["name"] for c in version["additionalPrinterColumns"] if "priority" not in c] == [
        "Engine",
        "Model",
        "Ready",
        "Status",
        "Endpoint",
        "Age",
    ]
    assert columns["Endpoint"]["jsonPath"] == ".status.endpoint"
    conditions = _schema()["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


def test_crd_yaml_round_trips() -> None:
    assert yaml.safe_load(crd_yaml()) == crd_manifest()


def test_render_cli_prints_children_and_refuses_bad_specs(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["render", str(REPO / "examples")]) == 0
    kinds = [d["kind"] for d in yaml.safe_load_all(capsys.readouterr().out)]
    assert kinds == ["Deployment", "Service"] * 3  # the order they are applied in
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: llm.fabric.dev/v1alpha1\nkind: LLMBackend\nmetadata: {name: x}\n"
        "spec: {engine: ollama, model: {huggingface: {repo: a/b}}}\n"
    )
    assert main(["render", str(bad)]) == 1
    assert "spec.model.huggingface: engine ollama cannot load" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("version", "cel"),
    [
        ("v1.20.2", False),
        ("v1.24.17-eks-1", False),
        ("v1.25.0", True),
        ("v1.28.3-gke.1286000", True),
        ("v2.0.0", True),
        ("", False),
    ],
)
def test_the_cel_rules_only_go_to_servers_that_check_them(version: str, cel: bool) -> None:
    assert supports_cel(version) is cel
    served = yaml.safe_load(
        crd_yaml_for_server(json.dumps({"serverVersion": {"gitVersion": version}}))
    )
    assert ("x-kubernetes-validations" in json.dumps(served)) is cel
    assert served == crd_manifest(cel=cel)


def test_without_cel_takes_out_the_rules_and_nothing_else() -> None:
    schema = {"a": {"x-kubernetes-validations": [1], "b": [{"x-kubernetes-validations": 2}]}}
    assert without_cel(schema) == {"a": {"b": [{}]}}
    full = json.dumps(crd_manifest())
    assert full.count("x-kubernetes-validations") == 2
    assert len(json.dumps(crd_manifest(cel=False))) < len(full)
