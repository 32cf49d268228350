"""The engine image's `/app/llama-server` (hack/images/engine/llama_server.py): what the
operator renders for llama.cpp translates onto llama_cpp.server, and nothing else does."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from fabric_operator.api.backend import LLMBackend
from fabric_operator.render import render
from fabric_operator.validation import validate

REPO = Path(__file__).resolve().parents[2]
URL = "https://h.invalid/m.gguf"
API_KEY = {"name": "keys", "key": "api"}
HF_TOKEN = {"name": "hf", "key": "token"}
SECRETS = {("keys", "api"): "sk-secret", ("hf", "token"): "hf_secret"}
# A few of llama_cpp.server's setting names (the image lists them all at build time).
SETTINGS = frozenset({"model", "model_alias", "host", "port", "api_key", "n_ctx", "verbose"})


def _load() -> ModuleType:
    path = REPO / "hack" / "images" / "engine" / "llama_server.py"
    spec = importlib.util.spec_from_file_location("fabric_engine_llama_server", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


shim = _load()
TINY = shim.TINY_MODEL


def rendered(spec: dict[str, Any], name: str = "m") -> tuple[list[str], dict[str, str]]:
    """The engine container's args and env as the kubelet hands them over (secrets read)."""
    manifest = {"metadata": {"name": name, "namespace": "ns", "uid": "u1"}, "spec": spec}
    parsed, problems = validate(manifest)
    assert problems == [] and parsed is not None, problems
    pod = render(LLMBackend.from_manifest(manifest)).deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {}
    for item in container.get("env") or []:
        ref = (item.get("valueFrom") or {}).get("secretKeyRef")
        env[item["name"]] = SECRETS[(ref["name"], ref["key"])] if ref else item["value"]
    return list(container["args"]), env


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def translate(
    args: list[str], env: dict[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    argv, out = shim.translate(args, env or {}, settings=SETTINGS, python="/usr/bin/python3")
    return list(argv), dict(out)


# --- what the operator renders ------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "model"),
    [
        pytest.param({"model": {"url": URL}}, f"/cache/{URL.rsplit('/', 1)[-1]}", id="url"),
        pytest.param(
            {"model": {"huggingface": {"repo": "o/r"}}}, "/cache/o_r_model.gguf", id="hf-repo"
        ),
        pytest.param(
            {"model": {"huggingface": {"repo": "o/r", "file": "q4.gguf"}}},
            "/cache/o_r_q4.gguf",
            id="hf-file",
        ),
        pytest.param(
            {"model": {"pvc": {"claimName": "weights", "path": "gguf/m.gguf"}}},
            "/models/gguf/m.gguf",
            id="pvc",
        ),
        pytest.param(
            {"model": {"url": URL}, "resources": {"gpu": {"count": 1}}},
            f"/cache/{URL.rsplit('/', 1)[-1]}",
            id="gpu-layers",
        ),
    ],
)
def test_rendered_llamacpp_backends_translate(spec: dict[str, Any], model: str) -> None:
    args, env = rendered({"engine": "llamacpp", **spec}, name="tiny")
    argv, out = translate(args, env)
    assert argv[:3] == ["/usr/bin/python3", "-m", "llama_cpp.server"]
    assert option(argv, "--model") == model
    assert option(argv, "--host") == "0.0.0.0"
    assert option(argv, "--port") == "8080"
    assert option(argv, "--model_alias") == "tiny"
    assert argv[-4:] == ["--verbose", "false", "--interrupt_requests", "false"]
    assert option(argv, "--n_gpu_layers") == ("999" if "resources" in spec else None)
    assert out["FABRIC_ENGINE_METRICS"] == "1"  # --metrics
    assert out["FABRIC_ENGINE_SHIM"] == "1" and out["PYTHONPATH"] == shim.SHIM_DIR
    assert out["LLAMA_CACHE"] == "/cache"
    assert "API_KEY" not in out


def test_keys_context_and_extra_args_translate() -> None:
    args, env = rendered(
        {
            "engine": "llamacpp",
            "model": {"huggingface": {"repo": "o/r"}},
            "apiKeySecretRef": API_KEY,
            "hfTokenSecretRef": HF_TOKEN,
            "engineOptions": {"contextLength": 4096},
            "extraArgs": ["--threads", "2", "--seed=7", "--no-mmap", "-np", "1"],
        }
    )
    assert "--jinja" in args  # tool calling, on by default
    argv, out = translate(args, env)
    assert option(argv, "--chat_format") == "chatml-function-calling"
    assert option(argv, "--n_ctx") == "4096"
    assert option(argv, "--n_threads") == "2" and option(argv, "--seed") == "7"
    assert option(argv, "--use_mmap") == "false"
    # The key goes to llama_cpp.server's own variable, never onto the command line.
    assert out["API_KEY"] == "sk-secret" and "sk-secret" not in argv
    assert "LLAMA_API_KEY" not in out
    assert out["HF_TOKEN"] == "hf_secret"  # passed through (nothing to download)


def test_every_flag_the_renderer_emits_is_known() -> None:
    for spec in (
        {"model": {"url": URL}, "engineOptions": {"contextLength": 512}},
        {"model": {"huggingface": {"repo": "o/r", "file": "f.gguf"}}},
        {
            "model": {"pvc": {"claimName": "c", "path": "m.gguf"}},
            "resources": {"gpu": {"count": 2}},
        },
    ):
        args, _ = rendered({"engine": "llamacpp", **spec})
        assert all(a in shim.FLAGS for a in args if a.startswith("-")), args


# --- refused, loudly: exit 2 and a message ---------------------------------------------------


@pytest.fixture
def main(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """Run the entrypoint's main() with this environment; exec is captured, never done."""
    settings = tmp_path / "settings.txt"
    settings.write_text("\n".join(sorted(SETTINGS)) + "\n")
    monkeypatch.setattr(shim, "SETTINGS_FILE", str(settings))
    execs: list[tuple[str, list[str], dict[str, str]]] = []
    monkeypatch.setattr(shim.os, "execve", lambda p, a, e: execs.append((p, a, dict(e))))

    def run(args: list[str], env: dict[str, str] | None = None) -> Any:
        monkeypatch.setattr(shim.os, "environ", {"PATH": "/usr/bin", **(env or {})})
        shim.main(["/app/llama-server", *args])
        return execs[-1]

    return run


OK = ["--host", "0.0.0.0", "--alias", "m", "--model-url", URL]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        pytest.param([*OK, "--frobnicate"], {}, "'--frobnicate' has no", id="unknown-flag"),
        pytest.param([*OK, "--flash-attn", "on"], {}, "'--flash-attn' has no", id="real-flag"),
        pytest.param([*OK, "model.gguf"], {}, "positional argument", id="positional"),
        pytest.param([*OK, "--parallel", "2"], {}, "--parallel 2", id="parallel-2"),
        pytest.param([*OK, "-np", "4"], {}, "--parallel 4", id="np-4"),
        pytest.param(OK, {"LLAMA_ARG_N_PARALLEL": "2"}, "--parallel 2", id="parallel-env"),
        pytest.param(
            ["--host", "/run/llama.sock", "--model-url", URL], {}, "UNIX socket", id="unix-socket"
        ),
        pytest.param(["--host", "", "--model-url", URL], {}, "--host: empty", id="empty-host"),
        pytest.param(OK, {"LLAMA_ARG_FLASH_ATTN": "on"}, "LLAMA_ARG_FLASH_ATTN", id="llama-arg"),
        pytest.param(OK, {"MODEL": "/x.gguf"}, "env MODEL", id="setting-env"),
        pytest.param(OK, {"port": "1"}, "env port", id="setting-env-lowercase"),
        pytest.param(OK, {"CONFIG_FILE": "/c.json"}, "env CONFIG_FILE", id="config-file"),
        pytest.param(OK, {"PYTHONPATH": "/x"}, "env PYTHONPATH", id="python-env"),
        pytest.param([*OK, "--ctx-size"], {}, "--ctx-size needs a value", id="no-value"),
        pytest.param([*OK, "--ctx-size", "big"], {}, "'big': not a valid int", id="bad-int"),
        pytest.param([*OK, "--metrics=1"], {}, "--metrics takes no value", id="switch-value"),
        pytest.param(["--host", "0.0.0.0"], {}, "no model", id="no-model"),
        pytest.param(["--hf-file", "f.gguf"], {}, "--hf-file without --hf-repo", id="hf-file"),
        pytest.param(
            OK, {"LLAMA_ARG_ENDPOINT_METRICS": "maybe"}, "not a boolean", id="metrics-env"
        ),
        pytest.param(OK, {"LLAMA_ARG_JINJA": "maybe"}, "not a boolean", id="jinja-env"),
        pytest.param([*OK, "--jinja", "--no-jinja"], {}, "choose one", id="jinja-both"),
    ],
)
def test_untranslatable_exits_2_with_a_message(
    main: Any,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    env: dict[str, str],
    message: str,
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(args, env)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err, err


def test_a_missing_settings_list_is_a_broken_image(
    main: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(shim, "SETTINGS_FILE", "/nonexistent/settings.txt")
    with pytest.raises(SystemExit) as exited:
        main(OK)
    assert exited.value.code == 2 and "broken image" in capsys.readouterr().err


def test_main_execs_llama_cpp_server_with_the_translated_env(main: Any) -> None:
    path, argv, env = main([*OK, "--metrics"], {"LLAMA_API_KEY": "k", "HOME": "/"})
    assert path == argv[0] == sys.executable
    assert argv[1:3] == ["-m", "llama_cpp.server"]
    assert env["API_KEY"] == "k" and env["HOME"] == "/" and env["FABRIC_ENGINE_METRICS"] == "1"
    assert "LLAMA_API_KEY" not in env


# --- arguments win over LLAMA_ARG_* variables (as in llama-server) ---------------------------


def test_arguments_win_over_environment() -> None:
    env = {
        "LLAMA_ARG_HOST": "0.0.0.0",  # the image's own default, as upstream's
        "LLAMA_ARG_PORT": "9000",
        "LLAMA_ARG_CTX_SIZE": "1024",
        "LLAMA_ARG_ALIAS": "from-env",
        "LLAMA_API_KEY": "env-key",
    }
    argv, out = translate(
        ["--host", "127.0.0.1", "--port=8081", "--alias", "from-args", "--api-key", "arg-key",
         "--model-url", URL],
        env,
    )  # fmt: skip
    assert option(argv, "--host") == "127.0.0.1"
    assert option(argv, "--port") == "8081"
    assert option(argv, "--model_alias") == "from-args"
    assert out["API_KEY"] == "arg-key"
    assert option(argv, "--n_ctx") == "1024"  # only in the environment: used
    assert not any(k.startswith("LLAMA_ARG_") for k in out)


def test_environment_alone_configures_the_server() -> None:
    argv, out = translate(
        [],
        {
            "LLAMA_ARG_HF_REPO": "o/r",
            "LLAMA_ARG_PORT": "9000",
            "LLAMA_ARG_ENDPOINT_METRICS": "1",
            "LLAMA_ARG_N_GPU_LAYERS": "0",
        },
    )
    assert option(argv, "--model") == TINY and option(argv, "--port") == "9000"
    assert option(argv, "--host") == shim.DEFAULT_HOST  # llama-server's own default
    assert option(argv, "--n_gpu_layers") == "0"
    assert out["FABRIC_ENGINE_METRICS"] == "1"


@pytest.mark.parametrize(("value", "on"), [("true", True), ("0", False), ("off", False)])
def test_metrics_variable_is_a_boolean(value: str, on: bool) -> None:
    _, out = translate(["--model-url", URL], {"LLAMA_ARG_ENDPOINT_METRICS": value})
    assert ("FABRIC_ENGINE_METRICS" in out) is on
    _, out = translate(["--model-url", URL, "--metrics"], {"LLAMA_ARG_ENDPOINT_METRICS": value})
    assert out["FABRIC_ENGINE_METRICS"] == "1"


def test_host_and_model_pass_through() -> None:
    argv, _ = translate(["--host", "[::]", "-m", "/data/m.gguf"])
    assert option(argv, "--host") == "::"
    assert option(argv, "--model") == "/data/m.gguf"
    argv, _ = translate(["--host", "127.0.0.1", "-mu", URL, "-m", "/data/m.gguf"])
    assert option(argv, "--model") == TINY  # a URL is "downloaded": the baked-in model


# --- tool calling: --jinja (llama-server's default) -> chatml-function-calling ---------------


@pytest.mark.parametrize(
    ("args", "env", "chat_format"),
    [
        pytest.param([], {}, "chatml-function-calling", id="default"),
        pytest.param(["--jinja"], {}, "chatml-function-calling", id="jinja"),
        pytest.param(["--no-jinja"], {}, None, id="no-jinja"),
        pytest.param([], {"LLAMA_ARG_JINJA": "false"}, None, id="env-off"),
        pytest.param(
            ["--jinja"], {"LLAMA_ARG_JINJA": "0"}, "chatml-function-calling", id="arg-wins"
        ),
        pytest.param(["--no-jinja"], {"LLAMA_ARG_JINJA": "1"}, None, id="no-arg-wins"),
    ],
)
def test_jinja_maps_to_the_function_calling_chat_format(
    args: list[str], env: dict[str, str], chat_format: str | None
) -> None:
    argv, _ = translate(["--model-url", URL, *args], env)
    assert option(argv, "--chat_format") == chat_format


def test_tool_calling_off_renders_no_jinja_and_the_shim_keeps_the_template() -> None:
    args, env = rendered(
        {"engine": "llamacpp", "model": {"url": URL}, "toolCalling": {"enabled": False}}
    )
    assert "--no-jinja" in args and "--jinja" not in args
    argv, _ = translate(args, env)
    assert "--chat_format" not in argv


# --- the stand-in's download into LLAMA_CACHE ---------------------------------------------


def test_a_download_lands_in_the_cache_once_and_is_found_there_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    baked = tmp_path / "tiny.gguf"
    baked.write_bytes(b"GGUF weights")
    monkeypatch.setattr(shim, "TINY_MODEL", str(baked))
    cache = tmp_path / "cache"
    cache.mkdir()
    argv, _ = translate(["--model-url", URL], {"LLAMA_CACHE": str(cache)})
    model = option(argv, "--model")
    assert model == f"{cache}/{URL.rsplit('/', 1)[-1]}"
    shim.fetch(model, str(cache))
    assert Path(model).read_bytes() == b"GGUF weights"
    assert "downloaded to cache" in capsys.readouterr().err
    first = Path(model).stat().st_mtime_ns
    shim.fetch(model, str(cache))
    assert "found in cache" in capsys.readouterr().err
    assert Path(model).stat().st_mtime_ns == first  # not written again
    assert sorted(p.name for p in cache.iterdir()) == [Path(model).name]  # no partial left
    shim.fetch("/data/m.gguf", str(cache))  # a model outside the cache: nothing written
    assert not Path("/data/m.gguf").exists() and capsys.readouterr().err == ""
