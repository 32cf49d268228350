"""`transformers serve`'s container (render/transformers.py) and its pod, field by field,
and its launcher run for real with stand-ins for transformers and huggingface_hub (no
torch here: tests/gateway/test_transformers_serve.py runs the real server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fabric_operator.api.backend import LLMBackend
from fabric_operator.render import cache, render, transformers
from fabric_operator.render.engine import EngineContainer
from fabric_operator.validation import validate

ENGINE = "transformers"
REPO = "Qwen/Qwen2.5-0.5B-Instruct"
IMAGE = "registry.example/transformers-serve:5.25.0"
HF = {"model": {"huggingface": {"repo": REPO}}}
PVC = {"model": {"pvc": {"claimName": "weights", "path": "qwen2.5-0.5b/"}}}
HEAD = ["--host", "0.0.0.0", "--port", "8000"]


def backend(fields: dict[str, Any], name: str = "m") -> LLMBackend:
    spec = {"engine": ENGINE, "image": IMAGE, **HF, **fields}
    return LLMBackend.from_manifest({"metadata": {"name": name, "namespace": "ns"}, "spec": spec})


def container(fields: dict[str, Any] | None = None, name: str = "m") -> EngineContainer:
    return transformers.container(backend(fields or {}, name))


def env(c: EngineContainer) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.env}


# --- the container ----------------------------------------------------------------------


def test_no_default_image_the_spec_names_it() -> None:
    assert not hasattr(transformers, "IMAGE")
    assert container().image == IMAGE


def test_port_probes_user_and_preload() -> None:
    c = container()
    assert (c.port, transformers.PORT) == (8000, 8000)
    assert (c.liveness_path, c.readiness_path) == ("/health", "/health")
    assert c.non_root is True  # restricted by default: runs as 65532 (e2e proves it)
    assert c.python == "python3"  # spec.cache.preload can fetch the weights first
    assert c.init_containers == []


def test_the_launcher_runs_transformers_serve() -> None:
    c = container()
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
    assert container(fields).args == args


def test_tensor_parallel_has_no_flag() -> None:
    """transformers serve has none: device_map "auto" spreads the weights instead."""
    args = container({"engineOptions": {"tensorParallel": 2}, "resources": {"gpu": {"count": 2}}})
    assert args.args == [REPO, *HEAD]


def test_env_served_name_cache_and_no_update_check() -> None:
    assert container().env == [
        {"name": "HF_HOME", "value": "/cache/huggingface"},
        {"name": "HF_HUB_DISABLE_UPDATE_CHECK", "value": "1"},
        {"name": "FABRIC_SERVED_MODEL_NAME", "value": "m"},
        {"name": "FABRIC_SERVED_DIR", "value": "/served"},
    ]
    named = env(container({"servedModelName": "team/qwen-small"}))
    assert named["FABRIC_SERVED_MODEL_NAME"] == "team/qwen-small"


def test_revision_goes_to_the_download_not_the_server() -> None:
    c = container({"model": {"huggingface": {"repo": REPO, "revision": "a1b2c3"}}})
    assert env(c)["FABRIC_MODEL_REVISION"] == "a1b2c3"
    assert "a1b2c3" not in " ".join(c.args)
    assert "FABRIC_MODEL_REVISION" not in env(container(PVC))


def test_hf_token_from_its_secret_and_no_api_key_variable() -> None:
    """The server has no key: a key Secret must not look as if it guarded anything."""
    c = container(
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


def test_the_served_dir_is_the_pods_own_volume() -> None:
    """Not on the cache, which may be a claim other backends share."""
    c = container()
    assert c.volumes == [{"name": "served", "emptyDir": {}}]
    assert c.volume_mounts == [{"name": "served", "mountPath": "/served"}]


# --- the pod around it (render/workload.py) -----------------------------------------------


def pod(fields: dict[str, Any]) -> dict[str, Any]:
    deployment = render(backend(fields)).deployment
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def test_pod_restricted_with_home_cache_and_served_volumes() -> None:
    spec = pod(PVC)
    assert spec["securityContext"]["runAsUser"] == 65532
    assert spec["securityContext"]["runAsNonRoot"] is True
    [engine] = spec["containers"]
    assert engine["image"] == IMAGE
    assert engine["command"] == ["python3", "-c", transformers.LAUNCHER]
    assert engine["args"][0] == "/models/qwen2.5-0.5b"
    mounts = {m["mountPath"]: m for m in engine["volumeMounts"]}
    assert {"/served", "/cache", "/models"} <= set(mounts)
    assert mounts["/models"]["readOnly"] is True
    names = {e["name"]: e.get("value") for e in engine["env"]}
    assert names["HOME"].startswith("/") and names["HOME"] in mounts  # writable HOME
    assert names["HF_HOME"].startswith(mounts["/cache"]["mountPath"] + "/")
    probes = [engine[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe")]
    assert probes == ["/health", "/health"]
    assert engine["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert engine["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]


def test_preload_fetches_into_the_hf_home_the_launcher_reads() -> None:
    spec = pod({"cache": {"preload": True, "size": "20Gi"}})
    [preload] = spec["initContainers"]
    [engine] = spec["containers"]
    assert preload["image"] == IMAGE
    assert preload["command"][:2] == ["python3", "-c"]
    assert preload["command"][3] == REPO
    hf_home = {e["name"]: e.get("value") for e in preload["env"]}["HF_HOME"]
    assert hf_home == {e["name"]: e.get("value") for e in engine["env"]}["HF_HOME"]


# --- the launcher, run ------------------------------------------------------------------

# Stand-ins: `transformers.cli.transformers` prints what it was run with; huggingface_hub's
# snapshot_download records its arguments and returns a folder.
FAKE_CLI = """\
import json, os, sys
print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd()}))
"""
FAKE_HUB = """\
import json, os
class HfApi:
    def list_repo_files(self, repo, revision=None):
        if "FAKE_REPO_FILES" not in os.environ:
            raise OSError("the Hub is out of reach")
        return json.loads(os.environ["FAKE_REPO_FILES"])
def snapshot_download(repo, revision=None, **kwargs):
    path = os.path.join(os.environ["FAKE_SNAPSHOTS"], repo.replace("/", "--"))
    os.makedirs(path, exist_ok=True)
    with open(os.environ["FAKE_SNAPSHOTS"] + "/calls.jsonl", "a") as f:
        f.write(json.dumps([repo, revision, kwargs]) + "\\n")
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
    fakes: Path, tmp_path: Path, c: EngineContainer, *extra: str, **fake_env: str
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
            **fake_env,
        },
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def downloads(tmp_path: Path) -> list[list[Any]]:
    lines = (tmp_path / "snapshots" / "calls.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


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
    c = container({"model": {"huggingface": {"repo": REPO, "revision": "v2"}}}, name="qwen")
    files = json.dumps(["config.json", "model.safetensors", "pytorch_model.bin"])
    for _ in range(2):  # a restart finds the link of the last start and replaces it
        ran = launch(fakes, tmp_path, c, FAKE_REPO_FILES=files)
        assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["argv"][:2] == ["serve", "qwen"]
    [repo, revision, kwargs] = downloads(tmp_path)[-1]
    assert (repo, revision) == (REPO, "v2")
    assert kwargs == {"ignore_patterns": [*transformers.SKIPPED, "*.bin"]}  # no pickles
    link = tmp_path / "served" / "qwen"
    assert os.readlink(link) == str(tmp_path / "snapshots" / "Qwen--Qwen2.5-0.5B-Instruct")
    assert sorted(p.name for p in link.parent.iterdir()) == ["qwen"]


def test_launcher_keeps_bin_weights_of_a_repo_without_safetensors(
    fakes: Path, tmp_path: Path
) -> None:
    ran = launch(fakes, tmp_path, container(), FAKE_REPO_FILES='["pytorch_model.bin"]')
    assert ran.returncode == 0, ran.stderr
    assert downloads(tmp_path)[-1][2] == {"ignore_patterns": transformers.SKIPPED}


def test_launcher_with_the_hub_out_of_reach_lets_the_cache_decide(
    fakes: Path, tmp_path: Path
) -> None:
    """snapshot_download answers from HF_HOME when the Hub is unreachable (a preloaded or
    earlier download); the launcher must not fail before asking it."""
    ran = launch(fakes, tmp_path, container())
    assert ran.returncode == 0, ran.stderr
    assert downloads(tmp_path)[-1] == [REPO, None, {"local_files_only": True}]


@pytest.mark.parametrize(
    "listing",
    [
        pytest.param(["config.json", "model.safetensors", "pytorch_model.bin"], id="both"),
        pytest.param(["config.json", "pytorch_model.bin", "original/consolidated.pth"], id="bin"),
        pytest.param(
            [
                "model-00001-of-00002.safetensors",
                "model.safetensors.index.json",
                "consolidated.safetensors",
            ],
            id="mistral",
        ),
        pytest.param(None, id="hub-out-of-reach"),
    ],
)
def test_launcher_fetches_what_the_preload_fetched(
    fakes: Path, tmp_path: Path, listing: list[str] | None
) -> None:
    """Both fetch into the same HF_HOME: a file the preload skipped and the engine wants
    would be downloaded at the engine's start after all (Mistral's second copy: GBs)."""
    files = {} if listing is None else {"FAKE_REPO_FILES": json.dumps(listing)}
    c = container({"model": {"huggingface": {"repo": REPO, "revision": "r1"}}})
    assert launch(fakes, tmp_path, c, **files).returncode == 0
    preload = subprocess.run(
        [sys.executable, "-c", cache.PRELOAD_SCRIPT, REPO, "r1"],
        env={
            "PATH": os.environ["PATH"],
            "PYTHONPATH": str(fakes),
            "FAKE_SNAPSHOTS": str(tmp_path / "snapshots"),
            **files,
        },
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert preload.returncode == 0, preload.stderr
    launched, preloaded = downloads(tmp_path)
    assert launched == preloaded


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("tiny", True),
        ("team/qwen-small", True),
        ("Qwen/Qwen2.5-0.5B-Instruct@main", True),  # a path by that name: no revision
        ("m.gguf", True),  # no colon: a folder name like any other
        ("/abs", False),
        ("a/../b", False),
        ("./m", False),
        ("a//b", False),
        ("m/", False),
        ("repo:w.gguf", False),
        ("..", False),
    ],
)
def test_launcher_and_validation_agree_on_served_names(
    fakes: Path, tmp_path: Path, name: str, ok: bool
) -> None:
    ran = launch(fakes, tmp_path, container({"servedModelName": name, **PVC}))
    assert (transformers.served_name_error(name) is None) is ok
    if ok:
        assert ran.returncode == 0, ran.stderr
        assert (tmp_path / "served" / name).is_symlink()
    else:
        assert ran.returncode == 1
        assert "transformers serve needs a relative path" in ran.stderr
        assert not (tmp_path / "served").exists()


# --- what validation refuses ----------------------------------------------------------------


def problems(fields: dict[str, Any]) -> list[str]:
    spec = {"engine": ENGINE, "image": IMAGE, **HF, **fields}
    found = validate({"metadata": {"name": "m", "namespace": "ns"}, "spec": spec})[1]
    return [p.field for p in found]


def test_a_valid_spec_passes() -> None:
    assert problems({}) == []


def test_validation_requires_an_image() -> None:
    assert problems({"image": None}) == ["spec.image"]


def test_validation_refuses_an_api_key_nothing_would_check() -> None:
    assert problems({"apiKeySecretRef": {"name": "k", "key": "k"}}) == ["spec.apiKeySecretRef"]


def test_validation_refuses_a_served_name_the_launcher_would() -> None:
    assert problems({"servedModelName": "a/../b"}) == ["spec.servedModelName"]
