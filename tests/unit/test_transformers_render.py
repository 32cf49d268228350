"""`transformers serve`'s container (render/transformers.py), field by field, and its
launcher run for real with stand-ins for transformers and huggingface_hub (no torch here:
tests/gateway/test_transformers_serve.py runs the real server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fabric_operator.api.backend import LLMBackend
from fabric_operator.render import transformers
from fabric_operator.render.engine import EngineContainer

# Until api/v1alpha1.py has Engine.TRANSFORMERS, any engine parses: container() reads
# only the spec's model, options, image and Secret references.
ENGINE = "llamacpp-python"
REPO = "Qwen/Qwen2.5-0.5B-Instruct"
IMAGE = "registry.example/transformers-serve:5.25.0"
HF = {"model": {"huggingface": {"repo": REPO}}}
PVC = {"model": {"pvc": {"claimName": "weights", "path": "qwen2.5-0.5b/"}}}
HEAD = ["--host", "0.0.0.0", "--port", "8000"]


def backend(fields: dict[str, Any], name: str = "m") -> LLMBackend:
    spec = {"engine": ENGINE, "image": IMAGE, **HF, **fields}
    return LLMBackend.from_manifest({"metadata": {"name": name, "namespace": "ns"}, "spec": spec})


def render(fields: dict[str, Any] | None = None, name: str = "m") -> EngineContainer:
    return transformers.container(backend(fields or {}, name))


def env(c: EngineContainer) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.env}


# --- the container ----------------------------------------------------------------------


def test_no_default_image_the_spec_names_it() -> None:
    assert transformers.IMAGE is None
    assert render().image == IMAGE


def test_port_probes_and_user() -> None:
    c = render()
    assert (c.port, transformers.PORT) == (8000, 8000)
    assert (c.liveness_path, c.readiness_path) == ("/health", "/health")
    assert c.non_root is True
    assert c.init_containers == []


def test_the_launcher_runs_transformers_serve() -> None:
    c = render()
    assert c.command == ["python3", "-c", transformers.LAUNCHER]
    compile(transformers.LAUNCHER, "launcher", "exec")  # valid Python as rendered


@pytest.mark.parametrize(
    ("fields", "args"),
    [
        pytest.param({}, [REPO, *HEAD, "--device", "cpu"], id="hub-cpu"),
        pytest.param(PVC, ["/models/qwen2.5-0.5b", *HEAD, "--device", "cpu"], id="pvc-cpu"),
        pytest.param({"resources": {"gpu": {"count": 2}}}, [REPO, *HEAD], id="gpu-auto"),
        pytest.param(
            {"engineOptions": {"dtype": "bfloat16", "contextLength": 4096}},
            [REPO, *HEAD, "--device", "cpu", "--dtype", "bfloat16", "--max-model-len", "4096"],
            id="options",
        ),
        pytest.param(
            {"engineOptions": {"quantization": "bnb-4bit"}, "resources": {"gpu": {"count": 1}}},
            [REPO, *HEAD, "--quantization", "bnb-4bit"],
            id="bnb",
        ),
    ],
)
def test_args(fields: dict[str, Any], args: list[str]) -> None:
    assert render(fields).args == args


def test_tensor_parallel_has_no_flag() -> None:
    """transformers serve has none: device_map "auto" spreads the weights instead."""
    args = render({"engineOptions": {"tensorParallel": 2}, "resources": {"gpu": {"count": 2}}})
    assert args.args == [REPO, *HEAD]


def test_env_served_name_cache_and_no_update_check() -> None:
    assert render().env == [
        {"name": "HF_HOME", "value": "/cache/huggingface"},
        {"name": "HF_HUB_DISABLE_UPDATE_CHECK", "value": "1"},
        {"name": "FABRIC_SERVED_MODEL_NAME", "value": "m"},
        {"name": "FABRIC_SERVED_DIR", "value": "/cache/served"},
    ]
    assert env(render({"servedModelName": "team/qwen-small"}))["FABRIC_SERVED_MODEL_NAME"] == (
        "team/qwen-small"
    )


def test_revision_goes_to_the_download_not_the_server() -> None:
    c = render({"model": {"huggingface": {"repo": REPO, "revision": "a1b2c3"}}})
    assert env(c)["FABRIC_MODEL_REVISION"] == "a1b2c3"
    assert "a1b2c3" not in " ".join(c.args)
    assert "FABRIC_MODEL_REVISION" not in env(render(PVC))


def test_hf_token_from_its_secret_and_no_api_key_variable() -> None:
    """The server has no key: a key Secret must not look as if it guarded anything."""
    c = render(
        {
            "hfTokenSecretRef": {"name": "hf", "key": "token"},
            "apiKeySecretRef": {"name": "keys", "key": "api"},
        }
    )
    secrets = [e for e in c.env if "valueFrom" in e]
    assert secrets == [
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}
    ]
    assert all("value" not in e for e in secrets)


def test_the_cache_volume_holds_hf_home_and_the_served_dir() -> None:
    c = render()
    assert c.volumes == [{"name": "cache", "emptyDir": {}}]
    assert c.volume_mounts == [{"name": "cache", "mountPath": "/cache"}]
    values = env(c)
    assert values["HF_HOME"].startswith("/cache/")
    assert values["FABRIC_SERVED_DIR"].startswith("/cache/")


# --- the launcher, run ------------------------------------------------------------------

# Stand-ins: `transformers.cli.transformers` prints what it was run with; huggingface_hub's
# snapshot_download records its arguments and returns a folder.
FAKE_CLI = """\
import json, os, sys
print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd()}))
"""
FAKE_HUB = """\
import json, os
def snapshot_download(repo, revision=None, ignore_patterns=None):
    path = os.path.join(os.environ["FAKE_SNAPSHOTS"], repo.replace("/", "--"))
    os.makedirs(path, exist_ok=True)
    with open(os.environ["FAKE_SNAPSHOTS"] + "/calls.jsonl", "a") as f:
        f.write(json.dumps([repo, revision, ignore_patterns]) + "\\n")
    return path
"""


@pytest.fixture
def fakes(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    (root / "transformers" / "cli").mkdir(parents=True)
    for init in (root / "transformers", root / "transformers" / "cli"):
        (init / "__init__.py").write_text("")
    (root / "transformers" / "cli" / "transformers.py").write_text(FAKE_CLI)
    (root / "huggingface_hub").mkdir()
    (root / "huggingface_hub" / "__init__.py").write_text(FAKE_HUB)
    return root


def launch(
    fakes: Path, tmp_path: Path, c: EngineContainer, *extra: str
) -> subprocess.CompletedProcess[str]:
    """The container's command and args as the kubelet would run them, on this python."""
    variables = {e["name"]: e["value"] for e in c.env if "value" in e}
    variables["FABRIC_SERVED_DIR"] = str(tmp_path / "served")
    assert c.command is not None
    return subprocess.run(
        [sys.executable, *c.command[1:], *c.args, *extra],
        env={
            "PATH": os.environ["PATH"],
            "PYTHONPATH": str(fakes),
            "FAKE_SNAPSHOTS": str(tmp_path / "snapshots"),
            **variables,
        },
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_launcher_links_a_pvc_folder_under_the_served_name(fakes: Path, tmp_path: Path) -> None:
    c = transformers.container(backend({"servedModelName": "team/qwen-small", **PVC}))
    ran = launch(fakes, tmp_path, c, "--continuous-batching")
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout)
    cpu = ["--device", "cpu"]
    assert out["argv"] == ["serve", "team/qwen-small", *HEAD, *cpu, "--continuous-batching"]
    assert out["cwd"] == str(tmp_path / "served")
    link = tmp_path / "served" / "team" / "qwen-small"
    assert link.is_symlink() and os.readlink(link) == "/models/qwen2.5-0.5b"
    assert not (tmp_path / "snapshots").exists()  # nothing downloaded for a PVC


def test_launcher_downloads_a_hub_repo_at_its_revision(fakes: Path, tmp_path: Path) -> None:
    c = render({"model": {"huggingface": {"repo": REPO, "revision": "v2"}}}, name="qwen")
    for _ in range(2):  # a restart finds the link of the last start and replaces it
        ran = launch(fakes, tmp_path, c)
        assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["argv"][:2] == ["serve", "qwen"]
    calls = (tmp_path / "snapshots" / "calls.jsonl").read_text().splitlines()
    repo, revision, skipped = json.loads(calls[-1])
    assert (repo, revision) == (REPO, "v2")
    assert "*.gguf" in skipped and "original/*" in skipped and "*.safetensors" not in skipped
    link = tmp_path / "served" / "qwen"
    assert os.readlink(link) == str(tmp_path / "snapshots" / "Qwen--Qwen2.5-0.5B-Instruct")


@pytest.mark.parametrize("name", ["/abs", "a/../b", "./m", "a//b", "m/", "repo:w.gguf", ".."])
def test_launcher_refuses_names_that_are_no_relative_path(
    fakes: Path, tmp_path: Path, name: str
) -> None:
    ran = launch(fakes, tmp_path, render({"servedModelName": name, **PVC}))
    assert ran.returncode == 1
    assert "transformers serve needs a relative path" in ran.stderr
    assert not (tmp_path / "served").exists()
