"""The platform admin's tenancy settings in the operator's --config: the remote hosts
`engine: remote` backends may call, and the gateway's namespace; and the InvalidSpec a
refused remote host gives."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from fabric_operator import cli
from fabric_operator.config import OperatorConfig
from fabric_operator.controller.reconciler import Reconciler, Settings, new_store
from fabric_operator.remotehosts import DEFAULT_HOSTS
from fabric_operator.validation import validate
from tests.unit.test_reconciler import BACKEND, FakeKube


def remote(url: str, **extra: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "m", "namespace": "n"},
        "spec": {"engine": "remote", "remote": {"baseURL": url}, **extra},
    }


def problems(url: str, config: OperatorConfig | None = None) -> list[str]:
    _, found = validate(remote(url), config or OperatorConfig())
    return [str(p) for p in found]


def test_the_config_file_holds_the_admins_lists(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "remoteHosts: [api.openai.com, '*.example.net', 10.1.2.3]\n"
        "remoteHttpHosts: [vllm.ml-platform.svc.cluster.local]\n"
        "gatewayNamespace: fabric-system\n"
    )
    config = OperatorConfig.load(path)
    assert config.remote().https == ("api.openai.com", "*.example.net", "10.1.2.3")
    assert config.remote().http == ("vllm.ml-platform.svc.cluster.local",)
    assert config.gateway_namespace == "fabric-system"


def test_absent_lists_are_the_documented_providers_over_https_only() -> None:
    hosts = OperatorConfig().remote()
    assert hosts.https == DEFAULT_HOSTS and hosts.http == ()
    assert OperatorConfig.model_validate({"remoteHosts": []}).remote().https == ()


@pytest.mark.parametrize(
    "pattern",
    ["https://api.example.com", "api.example.com:443", "api.example.com/v1", "*", "a..b", ""],
)
def test_a_pattern_that_could_never_match_is_refused_at_start(pattern: str) -> None:
    """A scheme, port or path in the list would allow nothing, silently."""
    with pytest.raises(ValidationError, match="not a host name"):
        OperatorConfig.model_validate({"remoteHosts": [pattern]})
    with pytest.raises(ValidationError, match="not a host name"):
        OperatorConfig.model_validate({"remoteHttpHosts": [pattern]})


def test_a_bad_gateway_namespace_is_refused() -> None:
    with pytest.raises(ValidationError, match="not a namespace name"):
        OperatorConfig.model_validate({"gatewayNamespace": "Fabric_System"})


def test_the_cli_refuses_a_bad_config_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("remoteHosts: ['https://api.example.com']\n")
    assert cli.main(["run", f"--config={path}", "--kubeconfig=/nonexistent"]) == 2
    assert "not a host name" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("url", "config", "why"),
    [
        ("https://evil.example/v1", {}, "host evil.example is not an allowed remote host"),
        ("http://api.openai.com/v1", {}, "host api.openai.com is allowed over https only"),
        (
            "https://qwen.team-b.svc.cluster.local:8000/v1",
            {},
            "host qwen.team-b.svc.cluster.local is not an allowed remote host",
        ),
        ("https://api.openai.com/v1", {"remoteHosts": ["api.example.com"]}, "not an allowed"),
        ("http://models.internal/v1", {"remoteHosts": ["models.internal"]}, "https only"),
    ],
)
def test_a_refused_remote_host_is_invalid_spec_naming_the_field(
    url: str, config: dict[str, Any], why: str
) -> None:
    [problem] = problems(url, OperatorConfig.model_validate(config))
    assert problem.startswith("spec.remote.baseURL: ") and why in problem


@pytest.mark.parametrize(
    ("url", "config"),
    [
        ("https://api.openai.com/v1", {}),
        ("https://myres.openai.azure.com/openai/v1", {}),
        ("https://api.example.com/v1", {"remoteHosts": ["api.example.com"]}),
        ("http://models.internal:8000/v1", {"remoteHttpHosts": ["models.internal"]}),
        ("https://models.internal/v1", {"remoteHosts": [], "remoteHttpHosts": ["models.internal"]}),
    ],
)
def test_an_allowed_remote_host_is_valid(url: str, config: dict[str, Any]) -> None:
    assert problems(url, OperatorConfig.model_validate(config)) == []


def test_the_host_is_not_checked_for_engine_backends() -> None:
    spec = {"engine": "llamacpp", "model": {"url": "https://evil.example/m.gguf"}}
    _, found = validate({"metadata": {"name": "m"}, "spec": spec}, OperatorConfig())
    assert found == []


def test_a_refused_remote_backend_is_invalid_with_one_warning_and_no_route() -> None:
    kube = FakeKube()
    store = new_store()
    obj = copy.deepcopy(BACKEND)
    obj["spec"] = {"engine": "remote", "remote": {"baseURL": "https://evil.example/v1"}}
    store.put("LLMBackend", obj)
    rec = Reconciler(store, kube, Settings())  # type: ignore[arg-type]
    assert rec.reconcile("n", "m") is None
    status = kube.statuses[-1]
    assert status["phase"] == "Invalid"
    ready, _, degraded, _ = status["conditions"]
    assert (degraded["status"], degraded["reason"]) == ("True", "InvalidSpec")
    assert degraded["message"].startswith("spec.remote.baseURL: host evil.example is not")
    assert ready["status"] == "False"  # the gateway routes only Ready remote backends
    assert kube.events == [("Warning", "InvalidSpec")]
    store.put("LLMBackend", {**obj, "status": status})  # the status, as the watch echoes it
    rec.reconcile("n", "m")
    assert kube.events == [("Warning", "InvalidSpec")] and len(kube.statuses) == 1

    # The admin allows the host (the operator restarts with the new config): Remote.
    allowed = OperatorConfig.model_validate({"remoteHosts": ["evil.example"]})
    Reconciler(store, kube, Settings(config=allowed)).reconcile("n", "m")  # type: ignore[arg-type]
    assert kube.statuses[-1]["phase"] == "Remote"
