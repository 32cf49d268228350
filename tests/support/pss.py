"""The Pod Security Standards, checked as the Pod Security admission controller checks them.

`violations(pod_spec, level)` returns what the `baseline` or `restricted` level (restricted
includes every baseline control) finds wrong in a pod spec: a Deployment's
spec.template.spec, camelCase, as the operator renders it. Each control is the one of
kubernetes/pod-security-admission `policy/check_*.go` (at 8f84a87, v0.37.0-alpha.2; the
levels and controls are listed in https://kubernetes.io/docs/concepts/security/pod-security-standards/),
at the latest policy version, with its ID, its fields and its allowed values:

- every container check covers spec.containers, spec.initContainers and
  spec.ephemeralContainers (`policy/visitor.go` visitContainers);
- pod-level settings are inherited where the controller inherits them: runAsNonRoot (true at
  the pod level, or on every container; an explicit false anywhere is forbidden),
  seccompProfile (set at the pod level, or on every container); runAsUser 0 is forbidden at
  any level;
- restricted replaces hostPathVolumes by restrictedVolumes, capabilities_baseline by
  capabilities_restricted, seccompProfile_baseline by seccompProfile_restricted and procMount
  by procMount_restricted (OverrideCheckIDs), so one fault is reported once;
- `spec.hostUsers: false` exempts runAsNonRoot, runAsUser and baseline procMount (v1.35);
  `spec.os.name: windows` exempts allowPrivilegeEscalation, seccompProfile_restricted and
  capabilities_restricted (v1.25).

Each violation reads "<check ID>: <field path> <what is wrong>", e.g.
"runAsNonRoot: spec.containers[0].securityContext.runAsNonRoot must be true (pod or container)".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

Spec = Mapping[str, Any]

BASELINE = "baseline"
RESTRICTED = "restricted"
LEVELS = (BASELINE, RESTRICTED)

CONTAINER_LISTS = ("containers", "initContainers", "ephemeralContainers")

BASELINE_CAPABILITIES = frozenset(
    {
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    }
)
RESTRICTED_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t"})
SECCOMP_TYPES = frozenset({"RuntimeDefault", "Localhost"})
APPARMOR_TYPES = frozenset({"RuntimeDefault", "Localhost"})
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"
SAFE_SYSCTLS = frozenset(
    {
        # v1.0
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_unprivileged_port_start",
        # v1.27
        "net.ipv4.ip_local_reserved_ports",
        # v1.29
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
        # v1.32
        "net.ipv4.tcp_rmem",
        "net.ipv4.tcp_wmem",
        # v1.37
        "net.ipv4.tcp_slow_start_after_idle",
        "net.ipv4.tcp_notsent_lowat",
    }
)
RESTRICTED_VOLUME_TYPES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "image",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
PROBES = ("livenessProbe", "readinessProbe", "startupProbe")
HOOKS = ("postStart", "preStop")
HANDLERS = ("httpGet", "tcpSocket")


def _map(value: Any) -> Spec:
    return value if isinstance(value, Mapping) else {}


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def _containers(pod: Spec) -> Iterator[tuple[str, Spec]]:
    """(path, container) for every container, init container and ephemeral container."""
    for kind in CONTAINER_LISTS:
        for i, container in enumerate(_list(pod.get(kind))):
            yield f"spec.{kind}[{i}]", _map(container)


def _security(container: Spec) -> Spec:
    return _map(container.get("securityContext"))


def _contexts(pod: Spec) -> Iterator[tuple[str, Spec]]:
    """(path, securityContext) of the pod, then of every container."""
    yield "spec.securityContext", _map(pod.get("securityContext"))
    for path, container in _containers(pod):
        yield f"{path}.securityContext", _security(container)


def _windows(pod: Spec) -> bool:
    return _map(pod.get("os")).get("name") == "windows"


def _user_namespace(pod: Spec) -> bool:
    return pod.get("hostUsers") is False


# --- baseline --------------------------------------------------------------------------


def _windows_host_process(pod: Spec, _: Spec) -> Iterator[str]:
    for path, context in _contexts(pod):
        if _map(context.get("windowsOptions")).get("hostProcess") is True:
            yield f"{path}.windowsOptions.hostProcess must be unset or false"


def _host_namespaces(pod: Spec, _: Spec) -> Iterator[str]:
    for name in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(name) is True:
            yield f"spec.{name} must be unset or false"


def _privileged(pod: Spec, _: Spec) -> Iterator[str]:
    for path, container in _containers(pod):
        if _security(container).get("privileged") is True:
            yield f"{path}.securityContext.privileged must be unset or false"


def _added(container: Spec) -> list[Any]:
    return _list(_map(_security(container).get("capabilities")).get("add"))


def _capabilities_baseline(pod: Spec, _: Spec) -> Iterator[str]:
    for path, container in _containers(pod):
        extra = [c for c in _added(container) if c not in BASELINE_CAPABILITIES]
        if extra:
            yield (
                f"{path}.securityContext.capabilities.add must be a subset of the baseline "
                f"set, not {extra}"
            )


def _host_path_volumes(pod: Spec, _: Spec) -> Iterator[str]:
    for i, volume in enumerate(_list(pod.get("volumes"))):
        if _map(volume).get("hostPath") is not None:
            yield f"spec.volumes[{i}].hostPath must be unset"


def _host_ports(pod: Spec, _: Spec) -> Iterator[str]:
    for path, container in _containers(pod):
        for i, port in enumerate(_list(container.get("ports"))):
            if _map(port).get("hostPort"):
                yield f"{path}.ports[{i}].hostPort must be unset or 0"


def _host_probes(pod: Spec, _: Spec) -> Iterator[str]:
    for path, container in _containers(pod):
        actions = [(f"{path}.{probe}", _map(container.get(probe))) for probe in PROBES]
        lifecycle = _map(container.get("lifecycle"))
        actions += [(f"{path}.lifecycle.{hook}", _map(lifecycle.get(hook))) for hook in HOOKS]
        for where, action in actions:
            for handler in HANDLERS:
                if _map(action.get(handler)).get("host"):
                    yield f"{where}.{handler}.host must be unset or empty"


def _app_armor(pod: Spec, annotations: Spec) -> Iterator[str]:
    for key, value in annotations.items():
        if str(key).startswith(APPARMOR_ANNOTATION) and not (
            value in ("", "runtime/default") or str(value).startswith("localhost/")
        ):
            yield (
                f"metadata.annotations[{key}] must be runtime/default or localhost/*, not {value!r}"
            )
    for path, context in _contexts(pod):
        profile = context.get("appArmorProfile")
        if profile is not None and _map(profile).get("type") not in APPARMOR_TYPES:
            yield (
                f"{path}.appArmorProfile.type must be RuntimeDefault or Localhost, "
                f"not {_map(profile).get('type')!r}"
            )


def _selinux(pod: Spec, _: Spec) -> Iterator[str]:
    for path, context in _contexts(pod):
        options = _map(context.get("seLinuxOptions"))
        if options.get("type", "") not in SELINUX_TYPES:
            yield (
                f"{path}.seLinuxOptions.type must be container_t, container_init_t or "
                f"container_kvm_t, not {options.get('type')!r}"
            )
        for field in ("user", "role"):
            if options.get(field):
                yield f"{path}.seLinuxOptions.{field} must be unset or empty"


def _proc_mount_violations(pod: Spec) -> Iterator[str]:
    for path, container in _containers(pod):
        value = _security(container).get("procMount")
        if value not in (None, "Default"):
            yield f"{path}.securityContext.procMount must be unset or Default, not {value!r}"


def _proc_mount(pod: Spec, _: Spec) -> Iterator[str]:
    if not _user_namespace(pod):
        yield from _proc_mount_violations(pod)


def _seccomp_baseline(pod: Spec, _: Spec) -> Iterator[str]:
    for path, context in _contexts(pod):
        if _map(context.get("seccompProfile")).get("type") == "Unconfined":
            yield f"{path}.seccompProfile.type must not be Unconfined"


def _sysctls(pod: Spec, _: Spec) -> Iterator[str]:
    sysctls = _list(_map(pod.get("securityContext")).get("sysctls"))
    for i, sysctl in enumerate(sysctls):
        name = _map(sysctl).get("name")
        if name not in SAFE_SYSCTLS:
            yield f"spec.securityContext.sysctls[{i}].name {name!r} is not a safe sysctl"


# --- restricted ------------------------------------------------------------------------


def _restricted_volumes(pod: Spec, _: Spec) -> Iterator[str]:
    for i, volume in enumerate(_list(pod.get("volumes"))):
        for kind, source in _map(volume).items():
            if kind != "name" and source is not None and kind not in RESTRICTED_VOLUME_TYPES:
                yield f"spec.volumes[{i}].{kind} is not an allowed volume type"


def _allow_privilege_escalation(pod: Spec, _: Spec) -> Iterator[str]:
    if _windows(pod):
        return
    for path, container in _containers(pod):
        if _security(container).get("allowPrivilegeEscalation") is not False:
            yield f"{path}.securityContext.allowPrivilegeEscalation must be false"


def _run_as_non_root(pod: Spec, _: Spec) -> Iterator[str]:
    if _user_namespace(pod):
        return
    pod_value = _map(pod.get("securityContext")).get("runAsNonRoot")
    if pod_value is False:
        yield "spec.securityContext.runAsNonRoot must not be false"
    for path, container in _containers(pod):
        value = _security(container).get("runAsNonRoot")
        if value is False:
            yield f"{path}.securityContext.runAsNonRoot must not be false"
        elif value is None and pod_value is not True:
            yield f"{path}.securityContext.runAsNonRoot must be true (pod or container)"


def _run_as_user(pod: Spec, _: Spec) -> Iterator[str]:
    if _user_namespace(pod):
        return
    for path, context in _contexts(pod):
        if context.get("runAsUser") == 0:
            yield f"{path}.runAsUser must not be 0"


def _seccomp_restricted(pod: Spec, _: Spec) -> Iterator[str]:
    if _windows(pod):
        return
    pod_type = _map(_map(pod.get("securityContext")).get("seccompProfile")).get("type")
    if pod_type is not None and pod_type not in SECCOMP_TYPES:
        yield (
            "spec.securityContext.seccompProfile.type must be RuntimeDefault or Localhost, "
            f"not {pod_type!r}"
        )
    for path, container in _containers(pod):
        value = _map(_security(container).get("seccompProfile")).get("type")
        if value is None:
            if pod_type is None:
                yield (
                    f"{path}.securityContext.seccompProfile.type must be RuntimeDefault or "
                    "Localhost (pod or container)"
                )
        elif value not in SECCOMP_TYPES:
            yield (
                f"{path}.securityContext.seccompProfile.type must be RuntimeDefault or "
                f"Localhost, not {value!r}"
            )


def _capabilities_restricted(pod: Spec, _: Spec) -> Iterator[str]:
    if _windows(pod):
        return
    for path, container in _containers(pod):
        capabilities = _map(_security(container).get("capabilities"))
        if "ALL" not in _list(capabilities.get("drop")):
            yield f"{path}.securityContext.capabilities.drop must include ALL"
        extra = [c for c in _added(container) if c not in RESTRICTED_CAPABILITIES]
        if extra:
            yield (
                f"{path}.securityContext.capabilities.add may only be NET_BIND_SERVICE, not {extra}"
            )


def _proc_mount_restricted(pod: Spec, _: Spec) -> Iterator[str]:
    yield from _proc_mount_violations(pod)


Check = Callable[[Spec, Spec], Iterator[str]]

# Check ID -> (level, check), in the order of the Pod Security Standards page.
CONTROLS: dict[str, tuple[str, Check]] = {
    "windowsHostProcess": (BASELINE, _windows_host_process),
    "hostNamespaces": (BASELINE, _host_namespaces),
    "privileged": (BASELINE, _privileged),
    "capabilities_baseline": (BASELINE, _capabilities_baseline),
    "hostPathVolumes": (BASELINE, _host_path_volumes),
    "hostPorts": (BASELINE, _host_ports),
    "hostProbesAndHostLifecycle": (BASELINE, _host_probes),
    "appArmorProfile": (BASELINE, _app_armor),
    "seLinuxOptions": (BASELINE, _selinux),
    "procMount": (BASELINE, _proc_mount),
    "seccompProfile_baseline": (BASELINE, _seccomp_baseline),
    "sysctls": (BASELINE, _sysctls),
    "restrictedVolumes": (RESTRICTED, _restricted_volumes),
    "allowPrivilegeEscalation": (RESTRICTED, _allow_privilege_escalation),
    "runAsNonRoot": (RESTRICTED, _run_as_non_root),
    "runAsUser": (RESTRICTED, _run_as_user),
    "seccompProfile_restricted": (RESTRICTED, _seccomp_restricted),
    "capabilities_restricted": (RESTRICTED, _capabilities_restricted),
    "procMount_restricted": (RESTRICTED, _proc_mount_restricted),
}
# Restricted checks that replace a baseline check (OverrideCheckIDs in the controller).
OVERRIDES = {
    "restrictedVolumes": "hostPathVolumes",
    "capabilities_restricted": "capabilities_baseline",
    "seccompProfile_restricted": "seccompProfile_baseline",
    "procMount_restricted": "procMount",
}


def controls(level: str = RESTRICTED) -> list[str]:
    """The check IDs that apply at a level, overridden baseline checks left out."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, not {level!r}")
    wanted = [c for c, (lvl, _) in CONTROLS.items() if level == RESTRICTED or lvl == BASELINE]
    replaced = {OVERRIDES[c] for c in wanted if c in OVERRIDES}
    return [c for c in wanted if c not in replaced]


def violations(
    pod_spec: Spec, level: str = RESTRICTED, annotations: Spec | None = None
) -> list[str]:
    """What the Pod Security Standards level finds wrong in the pod spec (empty: it
    passes). `annotations` are the pod's metadata.annotations (AppArmor's old form)."""
    found: list[str] = []
    for control in controls(level):
        check = CONTROLS[control][1]
        found += [f"{control}: {v}" for v in check(pod_spec, annotations or {})]
    return found
