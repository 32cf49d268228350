"""Pod Security Standards: every rendered engine pod meets `restricted` where its image can
run as non-root (tgi and openllm, which cannot, meet `baseline`), and the checker
(tests/support/pss.py) finds each control's violation on its own."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from fabric_operator.api.backend import LLMBackend
from fabric_operator.render import render
from fabric_operator.render.engine import CACHE_VOLUME
from fabric_operator.validation import validate
from tests.support import pss

Pod = dict[str, Any]

# --- the checker ------------------------------------------------------------------------

SAFE_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def compliant() -> Pod:
    """A pod that meets restricted, with one container of each kind."""

    def container(name: str) -> Pod:
        return {"name": name, "image": "i", "securityContext": copy.deepcopy(SAFE_CONTAINER)}

    return {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container("c")],
        "initContainers": [container("init")],
        "ephemeralContainers": [container("debug")],
        "volumes": [{"name": "v", "emptyDir": {}}],
    }


def put(path: str, value: Any) -> Callable[[Pod], None]:
    """A change to the compliant pod: set the dotted path ("containers.0.ports") to value
    (None: delete it)."""

    def change(pod: Pod) -> None:
        *parents, last = path.split(".")
        node: Any = pod
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if isinstance(node, list):
            node[int(last)] = value
        elif value is None:
            node.pop(last, None)
        else:
            node[last] = value

    return change


def both(*changes: Callable[[Pod], None]) -> Callable[[Pod], None]:
    def change(pod: Pod) -> None:
        for c in changes:
            c(pod)

    return change


C0, I0, E0 = "containers.0", "initContainers.0", "ephemeralContainers.0"
SC = "securityContext"
POD_SC = "spec.securityContext"
NOT_NET_BIND = "may only be NET_BIND_SERVICE, not"
RUNTIME_OR_LOCALHOST = "seccompProfile.type must be RuntimeDefault or Localhost"

# (levels, change, expected violations at those levels). A case for a baseline control
# names the levels where the baseline check applies; where restricted overrides it, the
# restricted check's violation is a case of its own.
B, R, BR = ("baseline",), ("restricted",), ("baseline", "restricted")
CASES: dict[str, tuple[tuple[str, ...], Callable[[Pod], None], list[str]]] = {
    # windowsHostProcess
    "hostProcess-pod": (
        BR,
        put("securityContext.windowsOptions", {"hostProcess": True}),
        [f"windowsHostProcess: {POD_SC}.windowsOptions.hostProcess must be unset or false"],
    ),
    "hostProcess-ephemeral": (
        BR,
        put(f"{E0}.{SC}.windowsOptions", {"hostProcess": True}),
        [
            "windowsHostProcess: spec.ephemeralContainers[0].securityContext.windowsOptions"
            ".hostProcess must be unset or false"
        ],
    ),
    # hostNamespaces
    **{
        f"{name}": (
            BR,
            put(name, True),
            [f"hostNamespaces: spec.{name} must be unset or false"],
        )
        for name in ("hostNetwork", "hostPID", "hostIPC")
    },
    # privileged
    "privileged-init": (
        BR,
        put(f"{I0}.{SC}.privileged", True),
        ["privileged: spec.initContainers[0].securityContext.privileged must be unset or false"],
    ),
    # capabilities_baseline (restricted: capabilities_restricted)
    "capabilities-add-SYS_ADMIN-baseline": (
        B,
        put(f"{C0}.{SC}.capabilities.add", ["SYS_ADMIN"]),
        [
            "capabilities_baseline: spec.containers[0].securityContext.capabilities.add must "
            "be a subset of the baseline set, not ['SYS_ADMIN']"
        ],
    ),
    "capabilities-add-SYS_ADMIN-restricted": (
        R,
        put(f"{C0}.{SC}.capabilities.add", ["SYS_ADMIN"]),
        [
            "capabilities_restricted: spec.containers[0].securityContext.capabilities.add "
            f"{NOT_NET_BIND} ['SYS_ADMIN']"
        ],
    ),
    "capabilities-add-CHOWN-restricted": (
        R,
        put(f"{E0}.{SC}.capabilities.add", ["CHOWN"]),
        [
            "capabilities_restricted: spec.ephemeralContainers[0].securityContext.capabilities"
            f".add {NOT_NET_BIND} ['CHOWN']"
        ],
    ),
    "capabilities-drop-missing": (
        R,
        put(f"{I0}.{SC}.capabilities.drop", ["NET_RAW"]),
        [
            "capabilities_restricted: spec.initContainers[0].securityContext.capabilities.drop"
            " must include ALL"
        ],
    ),
    # hostPathVolumes (restricted: restrictedVolumes)
    "hostPath-baseline": (
        B,
        put("volumes.0", {"name": "v", "hostPath": {"path": "/"}}),
        ["hostPathVolumes: spec.volumes[0].hostPath must be unset"],
    ),
    "hostPath-restricted": (
        R,
        put("volumes.0", {"name": "v", "hostPath": {"path": "/"}}),
        ["restrictedVolumes: spec.volumes[0].hostPath is not an allowed volume type"],
    ),
    # restrictedVolumes
    "nfs": (
        R,
        put("volumes.0", {"name": "v", "nfs": {"server": "s", "path": "/"}}),
        ["restrictedVolumes: spec.volumes[0].nfs is not an allowed volume type"],
    ),
    # hostPorts
    "hostPort": (
        BR,
        put(f"{C0}.ports", [{"containerPort": 80}, {"containerPort": 8080, "hostPort": 8080}]),
        ["hostPorts: spec.containers[0].ports[1].hostPort must be unset or 0"],
    ),
    # hostProbesAndHostLifecycle
    "probe-host": (
        BR,
        put(f"{C0}.livenessProbe", {"httpGet": {"host": "10.0.0.1", "port": 80}}),
        [
            "hostProbesAndHostLifecycle: spec.containers[0].livenessProbe.httpGet.host must "
            "be unset or empty"
        ],
    ),
    "lifecycle-host": (
        BR,
        put(f"{I0}.lifecycle", {"preStop": {"tcpSocket": {"host": "h", "port": 80}}}),
        [
            "hostProbesAndHostLifecycle: spec.initContainers[0].lifecycle.preStop.tcpSocket"
            ".host must be unset or empty"
        ],
    ),
    # appArmorProfile
    "appArmor-pod": (
        BR,
        put("securityContext.appArmorProfile", {"type": "Unconfined"}),
        [
            f"appArmorProfile: {POD_SC}.appArmorProfile.type must be RuntimeDefault or "
            "Localhost, not 'Unconfined'"
        ],
    ),
    "appArmor-container": (
        BR,
        put(f"{E0}.{SC}.appArmorProfile", {"type": "Unconfined"}),
        [
            "appArmorProfile: spec.ephemeralContainers[0].securityContext.appArmorProfile.type"
            " must be RuntimeDefault or Localhost, not 'Unconfined'"
        ],
    ),
    # seLinuxOptions
    "seLinux-type": (
        BR,
        put(f"{C0}.{SC}.seLinuxOptions", {"type": "spc_t", "level": "s0:c1"}),
        [
            "seLinuxOptions: spec.containers[0].securityContext.seLinuxOptions.type must be "
            "container_t, container_init_t or container_kvm_t, not 'spc_t'"
        ],
    ),
    "seLinux-user": (
        BR,
        put("securityContext.seLinuxOptions", {"user": "system_u", "type": "container_t"}),
        [f"seLinuxOptions: {POD_SC}.seLinuxOptions.user must be unset or empty"],
    ),
    "seLinux-role": (
        BR,
        put(f"{I0}.{SC}.seLinuxOptions", {"role": "system_r"}),
        [
            "seLinuxOptions: spec.initContainers[0].securityContext.seLinuxOptions.role must "
            "be unset or empty"
        ],
    ),
    # procMount (restricted: procMount_restricted)
    "procMount-baseline": (
        B,
        put(f"{C0}.{SC}.procMount", "Unmasked"),
        [
            "procMount: spec.containers[0].securityContext.procMount must be unset or "
            "Default, not 'Unmasked'"
        ],
    ),
    "procMount-restricted": (
        R,
        put(f"{C0}.{SC}.procMount", "Unmasked"),
        [
            "procMount_restricted: spec.containers[0].securityContext.procMount must be unset"
            " or Default, not 'Unmasked'"
        ],
    ),
    "procMount-user-namespace": (
        R,  # baseline allows it in a user namespace (hostUsers: false), restricted not
        both(put("hostUsers", False), put(f"{C0}.{SC}.procMount", "Unmasked")),
        [
            "procMount_restricted: spec.containers[0].securityContext.procMount must be unset"
            " or Default, not 'Unmasked'"
        ],
    ),
    # seccompProfile_baseline (restricted: seccompProfile_restricted)
    "seccomp-unconfined-baseline": (
        B,
        put("securityContext.seccompProfile", {"type": "Unconfined"}),
        [f"seccompProfile_baseline: {POD_SC}.seccompProfile.type must not be Unconfined"],
    ),
    "seccomp-unconfined-restricted": (
        R,
        put(f"{I0}.{SC}.seccompProfile", {"type": "Unconfined"}),
        [
            "seccompProfile_restricted: spec.initContainers[0].securityContext."
            f"{RUNTIME_OR_LOCALHOST}, not 'Unconfined'"
        ],
    ),
    # seccompProfile_restricted: set at the pod level, or on every container
    "seccomp-unset": (
        R,
        both(
            put("securityContext.seccompProfile", None),
            put(f"{C0}.{SC}.seccompProfile", {"type": "RuntimeDefault"}),
            put(f"{I0}.{SC}.seccompProfile", {"type": "Localhost", "localhostProfile": "p"}),
        ),
        [
            "seccompProfile_restricted: spec.ephemeralContainers[0].securityContext."
            f"{RUNTIME_OR_LOCALHOST} (pod or container)"
        ],
    ),
    # sysctls
    "sysctl": (
        BR,
        put(
            "securityContext.sysctls",
            [{"name": "net.ipv4.tcp_rmem", "value": "1"}, {"name": "kernel.msgmax", "value": "1"}],
        ),
        ["sysctls: spec.securityContext.sysctls[1].name 'kernel.msgmax' is not a safe sysctl"],
    ),
    # allowPrivilegeEscalation: explicitly false
    "allowPrivilegeEscalation-unset": (
        R,
        put(f"{E0}.{SC}.allowPrivilegeEscalation", None),
        [
            "allowPrivilegeEscalation: spec.ephemeralContainers[0].securityContext"
            ".allowPrivilegeEscalation must be false"
        ],
    ),
    "allowPrivilegeEscalation-true": (
        R,
        put(f"{C0}.{SC}.allowPrivilegeEscalation", True),
        [
            "allowPrivilegeEscalation: spec.containers[0].securityContext"
            ".allowPrivilegeEscalation must be false"
        ],
    ),
    # runAsNonRoot: true at the pod level or on every container; never false
    "runAsNonRoot-pod-false": (
        R,
        both(
            put("securityContext.runAsNonRoot", False),
            *(put(f"{c}.{SC}.runAsNonRoot", True) for c in (C0, I0, E0)),
        ),
        [f"runAsNonRoot: {POD_SC}.runAsNonRoot must not be false"],
    ),
    "runAsNonRoot-container-false": (
        R,
        put(f"{I0}.{SC}.runAsNonRoot", False),
        ["runAsNonRoot: spec.initContainers[0].securityContext.runAsNonRoot must not be false"],
    ),
    "runAsNonRoot-unset": (
        R,
        both(
            put("securityContext.runAsNonRoot", None),
            put(f"{C0}.{SC}.runAsNonRoot", True),
            put(f"{E0}.{SC}.runAsNonRoot", True),
        ),
        [
            "runAsNonRoot: spec.initContainers[0].securityContext.runAsNonRoot must be true "
            "(pod or container)"
        ],
    ),
    # runAsUser: never 0
    "runAsUser-pod": (
        R,
        put("securityContext.runAsUser", 0),
        [f"runAsUser: {POD_SC}.runAsUser must not be 0"],
    ),
    "runAsUser-container": (
        R,
        put(f"{E0}.{SC}.runAsUser", 0),
        ["runAsUser: spec.ephemeralContainers[0].securityContext.runAsUser must not be 0"],
    ),
}

# Changes that break nothing: inheritance, allowed values and exemptions.
PASSING: dict[str, tuple[tuple[str, ...], Callable[[Pod], None]]] = {
    "compliant": (BR, both()),
    "runAsNonRoot-on-every-container": (
        BR,
        both(
            put("securityContext.runAsNonRoot", None),
            *(put(f"{c}.{SC}.runAsNonRoot", True) for c in (C0, I0, E0)),
        ),
    ),
    "seccomp-on-every-container": (
        BR,
        both(
            put("securityContext.seccompProfile", None),
            *(put(f"{c}.{SC}.seccompProfile", {"type": "RuntimeDefault"}) for c in (C0, I0, E0)),
        ),
    ),
    "runAsUser-unset": (BR, put("securityContext.runAsUser", None)),
    "add-NET_BIND_SERVICE": (BR, put(f"{C0}.{SC}.capabilities.add", ["NET_BIND_SERVICE"])),
    "add-CHOWN-baseline": (B, put(f"{C0}.{SC}.capabilities.add", ["CHOWN"])),
    "hostPort-0": (BR, put(f"{C0}.ports", [{"containerPort": 80, "hostPort": 0}])),
    "allowed-volumes": (
        BR,
        put(
            "volumes",
            [
                {"name": f"v{i}", kind: {}}
                for i, kind in enumerate(sorted(pss.RESTRICTED_VOLUME_TYPES))
            ],
        ),
    ),
    "nfs-baseline": (B, put("volumes.0", {"name": "v", "nfs": {"server": "s", "path": "/"}})),
    "seLinux-container_t": (BR, put(f"{C0}.{SC}.seLinuxOptions", {"type": "container_t"})),
    "appArmor-Localhost": (BR, put(f"{C0}.{SC}.appArmorProfile", {"type": "Localhost"})),
    "procMount-Default": (BR, put(f"{C0}.{SC}.procMount", "Default")),
    "procMount-user-namespace-baseline": (
        B,
        both(put("hostUsers", False), put(f"{C0}.{SC}.procMount", "Unmasked")),
    ),
    "user-namespace-root": (
        BR,
        both(
            put("hostUsers", False),
            put("securityContext.runAsNonRoot", False),
            put("securityContext.runAsUser", 0),
        ),
    ),
    "windows-exemptions": (
        BR,
        both(
            put("os", {"name": "windows"}),
            put("securityContext.seccompProfile", None),
            *(put(f"{c}.{SC}", {}) for c in (C0, I0, E0)),
        ),
    ),
    "safe-sysctls": (
        BR,
        put("securityContext.sysctls", [{"name": n, "value": "1"} for n in pss.SAFE_SYSCTLS]),
    ),
    "baseline-is-not-restricted": (
        B,
        put("securityContext", {}),  # every restricted pod-level setting missing
    ),
}


def _by_level(cases: dict[str, tuple[Any, ...]]) -> list[Any]:
    return [
        pytest.param(level, *rest, id=f"{name}-{level}")
        for name, (levels, *rest) in cases.items()
        for level in levels
    ]


@pytest.mark.parametrize(("level", "change", "expected"), _by_level(CASES))
def test_one_broken_control_is_one_violation(
    level: str, change: Callable[[Pod], None], expected: list[str]
) -> None:
    pod = compliant()
    assert pss.violations(pod, level) == []
    change(pod)
    assert pss.violations(pod, level) == expected


@pytest.mark.parametrize(("level", "change"), _by_level(PASSING))
def test_allowed_values_pass(level: str, change: Callable[[Pod], None]) -> None:
    pod = compliant()
    change(pod)
    assert pss.violations(pod, level) == []


def test_every_control_has_a_failing_case() -> None:
    failing = {v.split(":")[0] for _, _, expected in CASES.values() for v in expected}
    assert failing == set(pss.CONTROLS)


def test_levels() -> None:
    baseline, restricted = pss.controls("baseline"), pss.controls("restricted")
    assert set(baseline) < set(pss.CONTROLS)
    assert set(baseline) - set(restricted) == set(pss.OVERRIDES.values())
    assert pss.violations({}, "baseline") == []
    with pytest.raises(ValueError, match="level"):
        pss.violations({}, "privileged")


def test_apparmor_annotation() -> None:
    prefix = "container.apparmor.security.beta.kubernetes.io/"
    ok = {f"{prefix}a": "runtime/default", f"{prefix}b": "localhost/p", f"{prefix}c": ""}
    assert pss.violations(compliant(), annotations=ok) == []
    bad = {f"{prefix}engine": "unconfined"}
    assert pss.violations(compliant(), "baseline", annotations=bad) == [
        f"appArmorProfile: metadata.annotations[{prefix}engine] must be runtime/default or "
        "localhost/*, not 'unconfined'"
    ]


def test_every_container_list_is_checked() -> None:
    pod = compliant()
    for kind in pss.CONTAINER_LISTS:
        pod[kind][0]["securityContext"] = {}
    found = pss.violations(pod)
    for kind in pss.CONTAINER_LISTS:
        assert f"allowPrivilegeEscalation: spec.{kind}[0].securityContext." in " ".join(found)
        assert any(v.startswith(f"capabilities_restricted: spec.{kind}[0]") for v in found)


# --- rendered engine pods ---------------------------------------------------------------

REPO = "Qwen/Qwen2.5-0.5B-Instruct"
GPU1 = {"gpu": {"count": 1}}
HF = {"huggingface": {"repo": REPO}}
BASE: dict[str, dict[str, Any]] = {
    "vllm": {"engine": "vllm", "model": HF, "resources": GPU1},
    "tgi": {"engine": "tgi", "model": HF, "resources": GPU1},
    "llamacpp": {"engine": "llamacpp", "model": {"url": "https://h.invalid/m.gguf"}},
    "llamacpp-python": {
        "engine": "llamacpp-python",
        "model": {"pvc": {"claimName": "weights", "path": "qwen2.5-0.5b-q4.gguf"}},
    },
    "ollama": {"engine": "ollama", "model": {"ollama": "llama3.2:1b"}},
    "sglang": {"engine": "sglang", "model": HF, "resources": GPU1},
    "transformers": {
        "engine": "transformers",
        "model": HF,
        "image": "ghcr.io/example/transformers-serve:5.25.0",
    },
    "openllm": {
        "engine": "openllm",
        "model": {"openllm": "llama3.2:1b"},
        "image": "ghcr.io/example/openllm:0.6.30",
    },
    "openai-compatible": {
        "engine": "openai-compatible",
        "model": HF,
        "image": "ghcr.io/example/server:1",
        "server": {"port": 8000},
    },
}
# Their pinned (or usual) images cannot run as another user than their own: Baseline.
BASELINE_ENGINES = {"tgi", "openllm"}
# The variables that point an engine at its download directory.
CACHE_ENV = ("HF_HOME", "LLAMA_CACHE", "OLLAMA_MODELS")


def engine_param(engine: str, *values: Any, name: str | None = None) -> Any:
    return pytest.param(engine, *values, id=name or engine)


def pod_spec(engine: str, **fields: Any) -> Pod:
    """The rendered Deployment's pod spec of a backend that passed validation."""
    manifest = {
        "metadata": {"name": "m", "namespace": "ns", "uid": "u1"},
        "spec": {**BASE[engine], **fields},
    }
    parsed, problems = validate(manifest)
    assert problems == [], problems
    assert parsed is not None
    deployment = render(LLMBackend.from_manifest(manifest)).deployment
    result: Pod = deployment["spec"]["template"]["spec"]
    return result


def only_run_as_non_root(violations: list[str]) -> bool:
    return bool(violations) and all(v.startswith("runAsNonRoot: ") for v in violations)


def all_containers(pod: Pod) -> list[Pod]:
    return [c for kind in pss.CONTAINER_LISTS for c in pod.get(kind) or []]


@pytest.mark.parametrize("engine", [engine_param(e) for e in BASE])
def test_engine_defaults(engine: str) -> None:
    pod = pod_spec(engine)
    assert pss.violations(pod, "baseline") == []
    if engine in BASELINE_ENGINES:
        assert "runAsNonRoot" not in pod["securityContext"]
        assert only_run_as_non_root(pss.violations(pod, "restricted"))
    else:
        assert pss.violations(pod, "restricted") == []


CACHE_SIZED = {"cache": {"size": "10Gi"}}
CACHE_CLAIM = {"cache": {"size": "10Gi", "persistentVolumeClaim": {}}}
CACHE_SHARED = {"cache": {"size": "10Gi", "persistentVolumeClaim": {"shared": True}}}
PRELOAD = {"cache": {"preload": True}}
PRELOAD_CLAIM = {"cache": {"preload": True, "size": "10Gi", "persistentVolumeClaim": {}}}


def gpus(count: int, vendor: str = "nvidia") -> dict[str, Any]:
    return {"resources": {"gpu": {"count": count, "vendor": vendor}}}


def pvc(path: str) -> dict[str, Any]:
    return {"model": {"pvc": {"claimName": "weights", "path": path}}}


RESTRICTED_VARIANTS = [
    *(
        engine_param(e, fields, name=f"{e}-{name}")
        for e in BASE
        if e not in BASELINE_ENGINES
        for name, fields in (("sized", CACHE_SIZED), ("claim", CACHE_CLAIM))
    ),
    engine_param("ollama", CACHE_SHARED, name="ollama-shared-claim"),
    engine_param("vllm", PRELOAD, name="vllm-preload"),
    engine_param("vllm", PRELOAD_CLAIM, name="vllm-preload-claim"),
    engine_param("sglang", PRELOAD, name="sglang-preload"),
    engine_param("transformers", PRELOAD, name="transformers-preload"),
    engine_param("vllm", pvc("qwen2.5-0.5b"), name="vllm-pvc"),
    engine_param("llamacpp", pvc("m.gguf"), name="llamacpp-pvc"),
    engine_param("openai-compatible", pvc("qwen2.5-0.5b"), name="openai-compatible-pvc"),
    engine_param("vllm", gpus(4), name="vllm-4-gpus"),
    # AMD GPUs: restricted when asked (the node's render group given some other way).
    engine_param(
        "vllm", {**gpus(2, "amd"), "podSecurity": {"profile": "Restricted"}}, name="vllm-2-amd-gpus"
    ),
    engine_param("sglang", gpus(2), name="sglang-2-gpus"),
    engine_param("llamacpp", gpus(1), name="llamacpp-gpu"),
    engine_param(
        "llamacpp-python",
        {**gpus(1), "image": "registry.example/llama-cpp-python:cuda"},
        name="llamacpp-python-gpu",
    ),
    engine_param("ollama", gpus(1), name="ollama-gpu"),
    engine_param(
        "ollama",
        {**gpus(1, "amd"), "podSecurity": {"profile": "Restricted"}},
        name="ollama-amd-gpu",
    ),
    *(
        engine_param(e, {"podSecurity": {"runAsUser": 1000}}, name=f"{e}-runAsUser")
        for e in BASE
        if e not in BASELINE_ENGINES
    ),
    engine_param(
        "tgi",
        {"podSecurity": {"profile": "Restricted"}, "image": "registry.example/tgi:nonroot"},
        name="tgi-restricted-own-image",
    ),
    engine_param(
        "tgi",
        {
            "podSecurity": {"profile": "Restricted", "runAsUser": 1000},
            "image": "registry.example/tgi:nonroot",
            **PRELOAD,
        },
        name="tgi-restricted-preload",
    ),
    engine_param(
        "openllm", {"podSecurity": {"profile": "Restricted"}}, name="openllm-restricted-asked"
    ),
]


@pytest.mark.parametrize(("engine", "fields"), RESTRICTED_VARIANTS)
def test_restricted_variants(engine: str, fields: dict[str, Any]) -> None:
    pod = pod_spec(engine, **fields)
    assert pss.violations(pod, "restricted") == []
    asked = fields.get("podSecurity", {}).get("runAsUser")
    assert pod["securityContext"]["runAsUser"] == (asked or 65532)
    assert pod["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize(
    ("engine", "fields"),
    [
        *(
            engine_param(e, {"podSecurity": {"profile": "Baseline"}}, name=f"{e}-Baseline")
            for e in BASE
        ),
        engine_param("tgi", CACHE_CLAIM, name="tgi-claim"),
        engine_param("tgi", PRELOAD, name="tgi-preload"),
        engine_param("tgi", gpus(2), name="tgi-2-gpus"),
        engine_param("openllm", CACHE_SIZED, name="openllm-sized"),
        # AMD GPU devices belong to the node's render/video groups: Baseline by default.
        engine_param("vllm", gpus(1, "amd"), name="vllm-amd-default"),
        engine_param("ollama", gpus(1, "amd"), name="ollama-amd-default"),
        engine_param("llamacpp", gpus(1, "amd"), name="llamacpp-amd-default"),
        engine_param(
            "ollama", {"podSecurity": {"profile": "Baseline"}, **CACHE_CLAIM}, name="ollama-claim"
        ),
    ],
)
def test_baseline_variants(engine: str, fields: dict[str, Any]) -> None:
    pod = pod_spec(engine, **fields)
    assert "runAsNonRoot" not in pod["securityContext"]
    assert "runAsUser" not in pod["securityContext"]
    assert pss.violations(pod, "baseline") == []
    assert only_run_as_non_root(pss.violations(pod, "restricted"))


def _mounted_at(pod: Pod, container: Pod, path: str) -> Pod | None:
    """The volume mounted (writable) at path or at a directory above it, if any."""
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    for mount in container.get("volumeMounts") or []:
        root = mount["mountPath"].rstrip("/")
        if (path == root or path.startswith(f"{root}/")) and not mount.get("readOnly"):
            volume: Pod = volumes[mount["name"]]
            return volume
    return None


@pytest.mark.parametrize(
    ("engine", "fields"),
    [
        *(engine_param(e, {}) for e in BASE if e not in BASELINE_ENGINES),
        engine_param(
            "vllm", {"cache": {"preload": True, "size": "10Gi"}}, name="vllm-preload-sized"
        ),
        engine_param("ollama", CACHE_CLAIM, name="ollama-claim"),
        engine_param(
            "tgi",
            {"podSecurity": {"profile": "Restricted"}, "image": "registry.example/tgi:nonroot"},
            name="tgi-restricted",
        ),
    ],
)
def test_restricted_pods_have_a_writable_home_and_cache(
    engine: str, fields: dict[str, Any]
) -> None:
    pod = pod_spec(engine, **fields)
    containers = all_containers(pod)
    assert containers
    for container in containers:
        env = {e["name"]: e.get("value") for e in container.get("env") or []}
        home = env.get("HOME")
        assert home, f"{container['name']}: no HOME"
        volume = _mounted_at(pod, container, home)
        assert volume is not None and "emptyDir" in volume, (container["name"], home)
        for name in CACHE_ENV:
            if name in env:
                cache = _mounted_at(pod, container, env[name])
                assert cache is not None and cache["name"] == CACHE_VOLUME, (
                    container["name"],
                    name,
                )
    engine_env = {e["name"] for e in pod["containers"][0].get("env") or []}
    assert engine_env & set(CACHE_ENV), "the engine has no cache variable"
