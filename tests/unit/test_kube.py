"""Kube's requests as they leave the client: the bytes of an apply, the guard of a list
patch, how errors come back. The HTTP layer is replaced (no server); the real API server
sees these requests in tests/integration and tests/faults."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from fabric_operator.controller.kube import Kube
from fabric_operator.machinery.rest import applied_fields, apply_body


@dataclass
class Response:
    status: int
    data: bytes
    reason: str = ""
    headers: dict[str, str] = field(default_factory=dict)

    def read(self) -> bytes:
        return self.data

    def getheaders(self) -> dict[str, str]:
        return self.headers


@dataclass
class Rest:
    """Stands in for the client's REST layer: records requests, answers in turn."""

    answers: list[Response]
    sent: list[dict[str, Any]] = field(default_factory=list)

    def request(self, method: str, url: str, **kwargs: Any) -> Response:
        self.sent.append({"method": method, "url": url, **kwargs})
        return self.answers.pop(0)


def kube(*answers: Response) -> tuple[Kube, Rest]:
    config = client.Configuration(host="https://api.invalid")
    config.api_key = {"BearerToken": "t0ken"}
    config.api_key_prefix = {"BearerToken": "Bearer"}
    api = client.ApiClient(config)
    rest = Rest(list(answers))
    api.rest_client = rest  # type: ignore[assignment]
    return Kube(api), rest


OK = Response(200, b'{"metadata": {"name": "m", "resourceVersion": "8"}}')
SERVICE = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {"name": "m", "namespace": "n", "annotations": {"model": "llama-🦙 ü"}},
}


def test_an_apply_is_utf8_text_not_surrogate_escapes() -> None:
    """The API server's YAML decoder refuses the \\ud83e\\udd99 escapes json.dumps makes
    by default for characters beyond U+FFFF; JSON text in UTF-8 is YAML it reads."""
    k, rest = kube(OK)
    assert k.apply(SERVICE) == json.loads(OK.data)
    [req] = rest.sent
    assert req["method"] == "PATCH"
    assert req["url"] == (
        "https://api.invalid/api/v1/namespaces/n/services/m?fieldManager=fabric-operator&force=true"
    )
    assert req["headers"]["Content-Type"] == "application/apply-patch+yaml"
    assert req["headers"]["authorization"] == "Bearer t0ken"
    assert isinstance(req["body"], bytes) and "🦙".encode() in req["body"]
    assert b"\\u" not in req["body"]
    assert json.loads(req["body"]) == SERVICE
    assert k.request_counts() == {"apply services": 1}


# Each sent through the real API server (v1.20) and read back equal, in development.
TRICKY = (
    "a\x00\x01\x08\t\n\r\x1f\x7f\x80\x85\x9f\xa0\xb4\u00ad\u2028\u2029\ufeff\ufffd"
    "\ufffe\uffff\ue000🦙\U0010fffd\"\\'#: - {}[]&*!|>%@`"
)


@pytest.mark.parametrize("value", [*TRICKY, TRICKY, "llama-🦙", "模型-ü-Ω"])
def test_an_apply_body_is_yaml_that_reads_back_the_same(value: str) -> None:
    manifest = {"kind": "Service", "metadata": {"annotations": {value: [value, {"k": value}]}}}
    body = apply_body(manifest)
    assert json.loads(body) == manifest
    assert yaml.safe_load(body.decode()) == manifest  # an independent YAML 1.1 reader
    text = body.decode()
    assert not any(c in text for c in "\x7f\x85\u2028\u2029\ufeff\ufffe\uffff")
    assert not re.search(r"\\u[dD][89a-fA-F]", text)  # no surrogate escapes


def test_an_apply_without_force_and_other_kinds_paths() -> None:
    k, rest = kube(OK, OK)
    k.apply({**SERVICE, "kind": "Deployment"}, force=False)
    k.apply({**SERVICE, "kind": "NetworkPolicy"})
    assert [r["url"].split("?")[0].removeprefix("https://api.invalid") for r in rest.sent] == [
        "/apis/apps/v1/namespaces/n/deployments/m",
        "/apis/networking.k8s.io/v1/namespaces/n/networkpolicies/m",
    ]
    assert rest.sent[0]["url"].endswith("force=false")
    assert k.request_counts() == {"apply deployments": 1, "apply networkpolicies": 1}
    with pytest.raises(ValueError, match="unexpected child kind"):
        k.apply({**SERVICE, "kind": "Pod"})


def test_apply_errors_come_back_as_from_the_generated_methods() -> None:
    body = {"message": 'Service "m" is invalid: spec.ports[1].name: Duplicate value: "http"'}
    k, _ = kube(Response(422, json.dumps(body).encode(), "Unprocessable Entity"))
    with pytest.raises(ApiException) as err:
        k.apply(SERVICE)
    assert (
        err.value.status == 422 and json.loads(err.value.body or "")["message"] == body["message"]
    )


def test_a_list_patch_is_a_json_patch_behind_a_resource_version_test() -> None:
    k, rest = kube(OK)
    ops = [{"op": "replace", "path": "/spec/ports", "value": [{"port": 8080}]}]
    assert k.patch_guarded("Service", "n", "m", "7", ops) == json.loads(OK.data)
    [req] = rest.sent
    assert req["url"].endswith("/api/v1/namespaces/n/services/m?fieldManager=fabric-operator")
    assert req["headers"]["Content-Type"] == "application/json-patch+json"
    assert req["body"] == [{"op": "test", "path": "/metadata/resourceVersion", "value": "7"}, *ops]
    assert k.request_counts() == {"patch services": 1}


def test_a_failed_test_is_a_conflict_a_refused_object_is_not() -> None:
    failed_test = {
        "message": "the server rejected our request due to an error in our request",
        "reason": "Invalid",
        "details": {},
        "code": 422,
    }
    refused = {
        "message": 'Service "m" is invalid: spec.ports: Required value',
        "details": {"name": "m", "kind": "Service", "causes": [{"field": "spec.ports"}]},
        "code": 422,
    }
    k, _ = kube(
        Response(422, json.dumps(failed_test).encode()),
        Response(422, json.dumps(refused).encode()),
        Response(404, b'{"message": "services \\"m\\" not found"}'),
    )
    with pytest.raises(ApiException) as err:
        k.patch_guarded("Service", "n", "m", "7", [])
    assert err.value.status == 409
    assert "changed since resourceVersion 7" in json.loads(err.value.body or "")["message"]
    for status in (422, 404):
        with pytest.raises(ApiException) as err:
            k.patch_guarded("Service", "n", "m", "7", [])
        assert err.value.status == status


NOT_FOUND = Response(404, b'{"message": "not found", "code": 404}', "Not Found")


def test_reads_and_deletes_go_to_their_paths_and_404_is_an_answer() -> None:
    secret = {"data": {"api-key": "c2VjcmV0"}, "stringData": {"extra": "x"}}
    k, rest = kube(
        Response(200, json.dumps(secret).encode()),
        NOT_FOUND,
        OK,
        NOT_FOUND,
        Response(200, b'{"kind": "LLMBackend"}'),
        NOT_FOUND,
        Response(200, b'{"kind": "Status", "status": "Success"}'),
        Response(409, b'{"message": "uid precondition failed"}', "Conflict"),
        Response(200, b'{"gitVersion": "v1.20.2"}'),
    )
    assert k.secret_keys("n", "key") == {"api-key", "extra"}  # names only, values dropped
    assert k.secret_keys("n", "gone") is None
    assert k.get("Deployment", "n", "m") == json.loads(OK.data)
    assert k.get("Service", "n", "m") is None
    assert k.backend_exists("n", "m") is True
    assert k.backend_exists("n", "gone") is False
    k.delete("Deployment", "n", "m", "uid-1")
    k.delete("Service", "n", "m", "uid-2")  # replaced by another object: left alone
    k.ping()
    assert [(r["method"], r["url"].removeprefix("https://api.invalid")) for r in rest.sent] == [
        ("GET", "/api/v1/namespaces/n/secrets/key"),
        ("GET", "/api/v1/namespaces/n/secrets/gone"),
        ("GET", "/apis/apps/v1/namespaces/n/deployments/m"),
        ("GET", "/api/v1/namespaces/n/services/m"),
        ("GET", "/apis/llm.fabric.dev/v1alpha1/namespaces/n/llmbackends/m"),
        ("GET", "/apis/llm.fabric.dev/v1alpha1/namespaces/n/llmbackends/gone"),
        ("DELETE", "/apis/apps/v1/namespaces/n/deployments/m"),
        ("DELETE", "/api/v1/namespaces/n/services/m"),
        ("GET", "/version"),
    ]
    assert rest.sent[6]["body"] == {
        "preconditions": {"uid": "uid-1"},
        "propagationPolicy": "Background",
    }
    assert k.request_counts() == {
        "get secrets": 2,
        "get deployments": 1,
        "get services": 1,
        "get llmbackends": 2,
        "delete deployments": 1,
        "delete services": 1,
    }  # the health report's ping is not a reconcile request


def test_other_errors_are_raised() -> None:
    k, _ = kube(
        Response(403, b'{"message": "secrets \\"k\\" is forbidden"}', "Forbidden"),
        Response(500, b'{"message": "etcd timeout"}', "Internal Server Error"),
    )
    with pytest.raises(ApiException) as err:
        k.secret_keys("n", "k")
    assert err.value.status == 403
    with pytest.raises(ApiException) as err:
        k.delete("Deployment", "n", "m", "uid")
    assert err.value.status == 500


def test_status_is_a_merge_patch_of_the_status_subresource() -> None:
    k, rest = kube(OK)
    status = {"phase": "Ready", "conditions": [{"type": "Ready", "message": "1/1 🦙"}]}
    assert k.patch_status("n", "m", status) == json.loads(OK.data)
    [req] = rest.sent
    assert req["method"] == "PATCH"
    assert (
        req["url"]
        == "https://api.invalid/apis/llm.fabric.dev/v1alpha1/namespaces/n/llmbackends/m/status"
    )
    assert req["headers"]["Content-Type"] == "application/merge-patch+json"
    assert req["body"] == {"status": status}
    assert k.request_counts() == {"patch llmbackends/status": 1}


def test_an_event_names_the_backend_and_a_refused_event_fails_nothing() -> None:
    backend = {"metadata": {"name": "m", "namespace": "n", "uid": "u1", "resourceVersion": "5"}}
    k, rest = kube(OK, Response(403, b'{"message": "events is forbidden"}', "Forbidden"))
    k.post_event(backend, "Warning", "InvalidSpec", "x" * 2000, "2026-12-02T00:00:00Z")
    k.post_event(backend, "Normal", "Ready", "ready", "2026-12-02T00:00:00Z")  # no raise
    req = rest.sent[0]
    assert (req["method"], req["url"]) == ("POST", "https://api.invalid/api/v1/namespaces/n/events")
    event = req["body"]
    assert event["involvedObject"] == {
        "apiVersion": "llm.fabric.dev/v1alpha1",
        "kind": "LLMBackend",
        "name": "m",
        "namespace": "n",
        "uid": "u1",
        "resourceVersion": "5",
    }
    assert event["metadata"]["name"].startswith("m.") and event["metadata"]["namespace"] == "n"
    assert (event["type"], event["reason"], len(event["message"])) == (
        "Warning",
        "InvalidSpec",
        1024,
    )
    assert k.request_counts() == {"create events": 2}


def test_names_are_one_path_segment_each() -> None:
    k, rest = kube(NOT_FOUND)
    assert k.get("Service", "n", "a/b?c") is None
    assert rest.sent[0]["url"] == "https://api.invalid/api/v1/namespaces/n/services/a%2Fb%3Fc"


# --- a child's first write: a create, recorded as if applied ------------------------------

CREATED_SERVICE = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {
        "name": "m",
        "namespace": "n",
        "annotations": {"a": "1"},
        "ownerReferences": [{"kind": "LLMBackend", "name": "m", "uid": "u", "controller": True}],
    },
    "spec": {
        "type": "ClusterIP",
        "selector": {"llm.fabric.dev/backend": "m"},
        "ports": [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}],
        "extra": {},
    },
}
# What v1.20 recorded for a POST of that Service (sessionAffinity: a default) ...
UPDATE_FIELDS = {
    "f:metadata": {
        "f:annotations": {".": {}, "f:a": {}},
        "f:ownerReferences": {".": {}, 'k:{"uid":"u"}': {".": {}, "f:kind": {}, "f:uid": {}}},
    },
    "f:spec": {
        "f:ports": {
            ".": {},
            'k:{"port":8080,"protocol":"TCP"}': {".": {}, "f:name": {}, "f:port": {}},
        },
        "f:selector": {".": {}, "f:llm.fabric.dev/backend": {}},
        "f:sessionAffinity": {},
        "f:type": {},
        "f:extra": {},
    },
}
# ... and for a server-side apply of it: no defaults, no "." but on list entries, no {}.
APPLY_FIELDS = {
    "f:metadata": {
        "f:annotations": {"f:a": {}},
        "f:ownerReferences": {'k:{"uid":"u"}': {".": {}, "f:kind": {}, "f:uid": {}}},
    },
    "f:spec": {
        "f:ports": {'k:{"port":8080,"protocol":"TCP"}': {".": {}, "f:name": {}, "f:port": {}}},
        "f:selector": {"f:llm.fabric.dev/backend": {}},
        "f:type": {},
    },
}


def test_applied_fields_drop_what_the_server_defaulted() -> None:
    assert applied_fields(UPDATE_FIELDS, CREATED_SERVICE) == APPLY_FIELDS
    # A list entry whose keys the manifest does not hold is not ours to own.
    other = {"f:spec": {"f:ports": {'k:{"port":9,"protocol":"TCP"}': {".": {}}}}}
    assert applied_fields(other, CREATED_SERVICE) == {"f:spec": {"f:ports": {}}}
    assert applied_fields({"f:finalizers": {'v:"a"': {}, 'v:"b"': {}}}, {"finalizers": ["a"]}) == {
        "f:finalizers": {'v:"a"': {}}
    }


def created(entries: list[dict[str, Any]], version: str = "1") -> Response:
    obj = {"metadata": {"name": "m", "resourceVersion": version, "managedFields": entries}}
    return Response(201, json.dumps(obj).encode())


ENTRY = {"manager": "fabric-operator", "operation": "Update", "fieldsV1": UPDATE_FIELDS}
OTHER = {"manager": "kube-controller-manager", "operation": "Update", "fieldsV1": {}}


def test_a_create_is_a_post_then_its_fields_are_recorded_as_applied() -> None:
    k, rest = kube(created([OTHER, ENTRY]), OK)
    assert k.create(CREATED_SERVICE) == json.loads(OK.data)
    post, patch = rest.sent
    assert post["method"] == "POST"
    assert (
        post["url"]
        == "https://api.invalid/api/v1/namespaces/n/services?fieldManager=fabric-operator"
    )
    assert post["body"] == CREATED_SERVICE
    assert patch["method"] == "PATCH"
    assert patch["headers"]["Content-Type"] == "application/json-patch+json"
    assert patch["url"].endswith("/api/v1/namespaces/n/services/m?fieldManager=fabric-operator")
    # Guarded by the entry itself (a controller's status write changes the version).
    assert patch["body"] == [
        {"op": "test", "path": "/metadata/managedFields/1/manager", "value": "fabric-operator"},
        {"op": "test", "path": "/metadata/managedFields/1/operation", "value": "Update"},
        {
            "op": "replace",
            "path": "/metadata/managedFields/1",
            "value": {**ENTRY, "operation": "Apply", "fieldsV1": APPLY_FIELDS},
        },
    ]
    assert k.request_counts() == {"create services": 1, "patch services": 1}


def test_an_entry_that_moved_is_looked_up_again_and_a_failure_fails_nothing() -> None:
    moved = Response(422, b'{"message": "testing value failed", "details": {}}')
    fresh = json.dumps({"metadata": {"name": "m", "managedFields": [ENTRY]}}).encode()
    k, rest = kube(created([ENTRY]), moved, Response(200, fresh), OK)
    assert k.create(CREATED_SERVICE) == json.loads(OK.data)
    assert [r["method"] for r in rest.sent] == ["POST", "PATCH", "GET", "PATCH"]
    assert rest.sent[3]["body"][0]["path"] == "/metadata/managedFields/0/manager"
    # The child exists whatever happens next: logged, never raised.
    k, rest = kube(created([ENTRY]), Response(500, b'{"message": "etcd"}', "Internal"))
    assert k.create(CREATED_SERVICE)["metadata"]["resourceVersion"] == "1"
    # Nothing to upgrade (an older server, another manager name): nothing more sent.
    k, rest = kube(created([OTHER]))
    k.create(CREATED_SERVICE)
    assert [r["method"] for r in rest.sent] == ["POST"]


def test_a_name_taken_is_a_409_from_the_create_and_nothing_else_is_sent() -> None:
    taken = {"message": 'services "m" already exists', "reason": "AlreadyExists", "code": 409}
    k, rest = kube(Response(409, json.dumps(taken).encode(), "Conflict"))
    with pytest.raises(ApiException) as err:
        k.create(CREATED_SERVICE)
    assert err.value.status == 409 and [r["method"] for r in rest.sent] == ["POST"]
