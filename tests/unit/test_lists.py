"""controller/lists.py: the JSON-patch ops that put rendered keyed lists back in shape.

Ops are checked by applying them with an independent RFC 6902 implementation (jsonpatch,
which kopf depends on) and asking again: a second look must find nothing to do, or the
reconciler would patch forever.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric_operator.api.backend import LLMBackend
from fabric_operator.controller.diff import needs_apply, needs_write
from fabric_operator.controller.lists import list_ops, port_ops, snapshot
from fabric_operator.render import render

POD = "/spec/template/spec"
ENGINE = f"{POD}/containers/0"
SPECS: dict[str, dict[str, Any]] = {
    "llamacpp": {"engine": "llamacpp", "model": {"url": "https://h.invalid/m.gguf"}},
    "ollama": {"engine": "ollama", "model": {"ollama": "llama3.2:1b"}},
    "vllm": {"engine": "vllm", "model": {"huggingface": {"repo": "a/b"}}},
    "tgi": {"engine": "tgi", "model": {"huggingface": {"repo": "a/b"}}},
    "pvc": {
        "engine": "llamacpp",
        "model": {"pvc": {"claimName": "models", "path": "m.gguf"}},
        "env": [{"name": "USER_SETTING", "value": "1"}],
    },
}


def rendered(spec: str = "llamacpp") -> tuple[dict[str, Any], dict[str, Any]]:
    """(Deployment, Service) as rendered, with a resourceVersion as if read back."""
    meta = {"name": "m", "namespace": "n", "uid": "u", "generation": 1}
    out = render(LLMBackend.from_manifest({"metadata": meta, "spec": SPECS[spec]}))
    return out.deployment, out.service


def served(desired: dict[str, Any]) -> dict[str, Any]:
    """The object as the API server returns it: a resourceVersion, defaults in entries."""
    live = copy.deepcopy(desired)
    live["metadata"]["resourceVersion"] = "7"
    pod = (live["spec"].get("template") or {}).get("spec")
    for c in (pod or {}).get("containers", []):
        c.setdefault("terminationMessagePath", "/dev/termination-log")
    for p in live["spec"].get("ports", []) if not pod else []:
        p.setdefault("targetPort", p.get("port"))
    return live


def at(obj: dict[str, Any], pointer: str) -> Any:
    return jsonpatch.JsonPointer(pointer).resolve(obj)


def fixed(desired: dict[str, Any], live: dict[str, Any]) -> dict[str, Any]:
    """`live` after its ops; asserts that nothing more is to be done then."""
    ops = list_ops(desired, live)
    out: dict[str, Any] = jsonpatch.apply_patch(live, ops)
    assert list_ops(desired, out) == [], "a second look still patches: a loop"
    return out


def names(items: list[dict[str, Any]], key: str = "name") -> list[Any]:
    return [i.get(key) for i in items]


# --- nothing to do ---------------------------------------------------------------------


@pytest.mark.parametrize("spec", list(SPECS))
def test_a_child_as_rendered_needs_no_ops(spec: str) -> None:
    for desired in rendered(spec):
        for live in (desired, served(desired)):
            assert list_ops(desired, live) == [] and port_ops(desired, live) == []


def test_kinds_without_rendered_keyed_lists_need_no_ops() -> None:
    policy = {"kind": "NetworkPolicy", "spec": {"ingress": [{"from": []}]}}
    assert list_ops(policy, {"kind": "NetworkPolicy", "spec": {"ingress": [1, 2]}}) == []
    assert list_ops({"kind": "Deployment"}, {"kind": "Deployment", "spec": {}}) == []
    dep, _ = rendered()
    assert list_ops(dep, {"kind": "Deployment", "metadata": {}}) == []  # no template: no ops


# --- foreign entries, one list at a time -----------------------------------------------

FOREIGN: dict[str, tuple[str, dict[str, Any]]] = {
    # case -> (list pointer, an entry another manager added)
    "sidecar": (f"{POD}/containers", {"name": "sidecar", "image": "busybox"}),
    "env": (f"{ENGINE}/env", {"name": "INJECTED", "value": "x"}),
    "container-port": (f"{ENGINE}/ports", {"containerPort": 9090}),
    "container-port-udp": (
        f"{ENGINE}/ports",
        {"name": "http-udp", "containerPort": 8080, "protocol": "UDP"},  # same port, UDP
    ),
    "volume-mount": (f"{ENGINE}/volumeMounts", {"name": "cache", "mountPath": "/x"}),
    "volume": (f"{POD}/volumes", {"name": "extra", "emptyDir": {}}),
    "service-port": ("/spec/ports", {"name": "metrics", "port": 9100}),
}


@pytest.mark.parametrize("case", list(FOREIGN))
@pytest.mark.parametrize("where", ["end", "start"])
def test_an_entry_another_manager_added_is_removed(case: str, where: str) -> None:
    pointer, extra = FOREIGN[case]
    dep, svc = rendered()
    desired = svc if pointer.startswith("/spec/ports") else dep
    live = served(desired)
    items = at(live, pointer)
    before = copy.deepcopy(items)
    items.insert(len(items) if where == "end" else 0, extra)
    [op] = list_ops(desired, live)
    assert (op["op"], op["path"]) == ("replace", pointer)
    assert op["value"] == before  # the live entries, server defaults included
    assert at(fixed(desired, live), pointer) == before


def test_a_sidecar_goes_with_its_volume_and_the_engine_keeps_its_defaults() -> None:
    dep, _ = rendered("ollama")
    live = served(dep)
    pod = live["spec"]["template"]["spec"]
    pod["containers"].append(
        {"name": "sidecar", "image": "b", "volumeMounts": [{"name": "side", "mountPath": "/s"}]}
    )
    pod["volumes"].append({"name": "side", "emptyDir": {}})
    out = fixed(dep, live)["spec"]["template"]["spec"]
    assert names(out["containers"]) == ["engine"]
    assert out["containers"][0]["terminationMessagePath"] == "/dev/termination-log"
    assert names(out["volumes"]) == names(dep["spec"]["template"]["spec"]["volumes"])


def test_a_hand_edited_service_port_is_replaced_before_the_apply() -> None:
    """The drift the apply cannot restore: the server keys ports by (port, protocol), so
    8080 -> 9999 is a foreign port 9999 named "http"; the apply would add 8080, a second
    "http", and be refused. port_ops puts the rendered port in its place; list_ops leaves
    a list without any rendered entry alone (emptied, a Service is refused)."""
    _, svc = rendered()
    live = served(svc)
    live["spec"]["ports"][0]["port"] = 9999
    assert needs_apply(svc, live) and list_ops(svc, live) == []
    [op] = port_ops(svc, live)
    assert op == {"op": "replace", "path": "/spec/ports", "value": svc["spec"]["ports"]}
    out = jsonpatch.apply_patch(live, [op])
    assert not needs_apply(svc, out) and list_ops(svc, out) == []  # the only write needed


def test_a_hand_edited_container_port_is_replaced_before_the_apply_in_our_container() -> None:
    dep, _ = rendered()
    live = served(dep)
    pod = live["spec"]["template"]["spec"]
    pod["containers"].insert(0, {"name": "sidecar", "ports": [{"name": "x", "containerPort": 1}]})
    pod["containers"][1]["ports"][0]["containerPort"] = 9999
    [op] = port_ops(dep, live)
    assert op["path"] == f"{POD}/containers/1/ports"
    assert op["value"] == dep["spec"]["template"]["spec"]["containers"][0]["ports"]


def test_port_ops_keep_the_live_copy_and_leave_lists_that_only_lack_a_port() -> None:
    _, svc = rendered()
    svc = copy.deepcopy(svc)
    svc["spec"]["ports"].append({"name": "metrics", "port": 9100, "protocol": "TCP"})
    live = served(svc)
    del live["spec"]["ports"][1]  # missing: the apply adds it
    assert port_ops(svc, live) == []
    live["spec"]["ports"].append({"name": "metrics", "port": 9101})
    [op] = port_ops(svc, live)
    assert op["value"][0] is live["spec"]["ports"][0] or op["value"][0] == live["spec"]["ports"][0]
    assert op["value"][0]["targetPort"] == 8080 or "targetPort" in op["value"][0]
    assert [p["port"] for p in op["value"]] == [8080, 9100]
    assert port_ops({"kind": "NetworkPolicy"}, live) == []


def test_ports_are_keyed_by_port_and_protocol_tcp_by_default() -> None:
    _, svc = rendered()
    live = served(svc)
    live["spec"]["ports"][0].pop("protocol")
    assert list_ops(svc, live) == [] and port_ops(svc, live) == []
    live["spec"]["ports"][0]["protocol"] = "UDP"
    assert port_ops(svc, live) != []


def test_duplicate_keys_count_as_foreign_and_the_first_stays() -> None:
    dep, _ = rendered()
    live = served(dep)
    env = live["spec"]["template"]["spec"]["containers"][0]["env"]
    env.append({"name": env[0]["name"], "value": "second"})
    out = fixed(dep, live)
    assert out["spec"]["template"]["spec"]["containers"][0]["env"] == env[:-1]


def test_entries_that_are_not_objects_count_as_foreign() -> None:
    dep, _ = rendered()
    live = served(dep)
    live["spec"]["template"]["spec"]["volumes"].append("junk")
    rendered_volumes = names(dep["spec"]["template"]["spec"]["volumes"])
    assert names(fixed(dep, live)["spec"]["template"]["spec"]["volumes"]) == rendered_volumes


# --- order ------------------------------------------------------------------------------


def test_env_in_another_order_is_put_back_in_rendered_order_without_being_foreign() -> None:
    dep, _ = rendered("ollama")
    live = served(dep)
    container = live["spec"]["template"]["spec"]["containers"][0]
    container["env"].append({"name": "USER_SETTING", "value": "1"})  # as SSA appends it
    dep["spec"]["template"]["spec"]["containers"][0]["env"].insert(
        0, {"name": "USER_SETTING", "value": "1"}
    )
    [op] = list_ops(dep, live)
    assert op["path"] == f"{ENGINE}/env"
    assert names(op["value"]) == names(dep["spec"]["template"]["spec"]["containers"][0]["env"])


def test_the_live_values_are_kept_the_apply_fixes_those() -> None:
    dep, _ = rendered("pvc")
    live = served(dep)
    env = live["spec"]["template"]["spec"]["containers"][0]["env"]
    env[0]["value"] = "hand-edited"
    env.reverse()
    [op] = list_ops(dep, live)
    assert {e["name"]: e["value"] for e in op["value"]}[env[-1]["name"]] == "hand-edited"


def test_a_missing_rendered_entry_is_left_for_the_apply_never_added() -> None:
    """What a JSON patch adds is owned by its Update field manager and outlives the
    applies that drop it: adding is the apply's job."""
    dep, _ = rendered("pvc")
    live = served(dep)
    container = live["spec"]["template"]["spec"]["containers"][0]
    container["env"].pop(0)
    container["env"].append({"name": "INJECTED", "value": "x"})
    [op] = list_ops(dep, live)
    assert op["value"] == container["env"][:-1]


def test_a_list_without_any_rendered_entry_is_left_alone_an_empty_one_too() -> None:
    dep, _ = rendered()
    live = served(dep)
    pod = live["spec"]["template"]["spec"]
    del pod["containers"][0]["env"]
    assert list_ops(dep, live) == []
    pod["containers"][0]["name"] = "renamed"  # emptied, the template would be refused
    assert list_ops(dep, live) == []
    live = served(dep)
    desired = copy.deepcopy(dep)
    desired["spec"]["template"]["spec"]["containers"][0]["env"] = []
    assert list_ops(desired, served(desired)) == []  # absent (omitempty) and [] are the same
    assert list_ops(desired, live) == [{"op": "replace", "path": f"{ENGINE}/env", "value": []}]


# --- which lists, and the indices of ops within them -------------------------------------


def test_lists_the_rendering_does_not_set_are_not_touched() -> None:
    dep, _ = rendered()
    desired = copy.deepcopy(dep)
    del desired["spec"]["template"]["spec"]["containers"][0]["env"]
    live = served(dep)
    live["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "INJ"})
    live["spec"]["template"]["spec"]["initContainers"] = [{"name": "hand", "image": "x"}]
    live["spec"]["template"]["spec"]["imagePullSecrets"] = [{"name": "not-keyed-here"}]
    assert list_ops(desired, live) == []


def test_inner_lists_are_patched_at_the_live_index_when_the_containers_stay() -> None:
    dep, _ = rendered()
    desired = copy.deepcopy(dep)
    pod = desired["spec"]["template"]["spec"]
    pod["containers"].insert(0, {**copy.deepcopy(pod["containers"][0]), "name": "first"})
    live = served(desired)
    live["spec"]["template"]["spec"]["containers"][1]["env"].append({"name": "INJ"})
    assert list_ops(desired, live) == [
        {
            "op": "replace",
            "path": f"{POD}/containers/1/env",
            "value": pod["containers"][1]["env"],
        }
    ]
    fixed(desired, live)


def test_when_the_containers_are_replaced_their_inner_lists_are_fixed_within() -> None:
    dep, _ = rendered()
    live = served(dep)
    pod = live["spec"]["template"]["spec"]
    pod["containers"][0]["env"].append({"name": "INJ"})
    pod["containers"].insert(0, {"name": "sidecar", "image": "b"})
    [op] = list_ops(dep, live)
    assert op["path"] == f"{POD}/containers"
    assert names(op["value"][0]["env"]) == names(
        dep["spec"]["template"]["spec"]["containers"][0]["env"]
    )
    fixed(dep, live)


def test_init_containers_are_realigned_only_when_rendered() -> None:
    dep, _ = rendered("ollama")
    live = served(dep)
    pod = live["spec"]["template"]["spec"]
    pod["initContainers"].append({"name": "hand", "image": "x"})
    pod["initContainers"][0]["env"].append({"name": "INJ"})
    out = fixed(dep, live)["spec"]["template"]["spec"]["initContainers"]
    rendered_env = names(dep["spec"]["template"]["spec"]["initContainers"][0]["env"])
    assert names(out) == ["pull-model"] and names(out[0]["env"]) == rendered_env


@pytest.mark.parametrize("owner", ["initContainers", "ephemeralContainers"])
def test_a_volume_a_container_left_in_place_still_mounts_is_kept(owner: str) -> None:
    """llama.cpp renders no init containers: one added by hand stays, and so does its
    volume, or the API server would refuse the template."""
    dep, _ = rendered()
    live = served(dep)
    pod = live["spec"]["template"]["spec"]
    pod[owner] = [{"name": "hand", "volumeMounts": [{"name": "kept", "mountPath": "/k"}]}]
    pod["volumes"][:0] = [{"name": "kept", "emptyDir": {}}, {"name": "gone", "emptyDir": {}}]
    out = fixed(dep, live)["spec"]["template"]["spec"]
    # rendered first, then the kept
    assert names(out["volumes"]) == [*names(dep["spec"]["template"]["spec"]["volumes"]), "kept"]
    assert out[owner] == pod[owner]


def test_a_volume_only_a_removed_mount_used_goes() -> None:
    dep, _ = rendered()
    live = served(dep)
    pod = live["spec"]["template"]["spec"]
    pod["containers"][0]["volumeMounts"].append({"name": "side", "mountPath": "/s"})
    pod["volumes"].append({"name": "side", "emptyDir": {}})
    out = fixed(dep, live)["spec"]["template"]["spec"]
    assert names(out["volumes"]) == names(dep["spec"]["template"]["spec"]["volumes"])


# --- diff.needs_write: what the reconciler acts on ----------------------------------------


def test_needs_write_reports_foreign_entries_and_order_but_not_a_child_as_rendered() -> None:
    dep, _ = rendered("pvc")
    live = served(dep)
    assert needs_write(dep, None) and not needs_write(dep, live)
    live["spec"]["template"]["spec"]["containers"][0]["env"].reverse()
    assert not needs_apply(dep, live) and needs_write(dep, live)
    live = served(dep)
    live["spec"]["template"]["spec"]["containers"].append({"name": "sidecar"})
    assert not needs_apply(dep, live) and needs_write(dep, live)


def test_ops_the_server_undid_are_no_reason_to_write_until_the_lists_change() -> None:
    """A webhook that re-adds a sidecar as the patch removes it: the reconciler keeps a
    snapshot of what is left, and writes again only once that is not what it sees."""
    dep, _ = rendered()
    live = served(dep)
    pod = live["spec"]["template"]["spec"]
    pod["containers"].append({"name": "mesh"})
    undone = snapshot(list_ops(dep, live), live)
    assert undone == [
        (f"{POD}/containers", pod["containers"][:1], pod["containers"]),
    ]
    assert needs_write(dep, live) and not needs_write(dep, live, undone=undone)
    status_only = {**copy.deepcopy(live), "status": {"replicas": 1}}
    assert not needs_write(dep, status_only, undone=undone)
    pod["containers"][0]["env"].append({"name": "INJ"})  # another drift in the same list
    assert needs_write(dep, live, undone=undone)
    other = copy.deepcopy(dep)  # the rendering of the list changed
    other["spec"]["template"]["spec"]["containers"][0]["env"] = []
    live = served(dep)
    live["spec"]["template"]["spec"]["containers"].append({"name": "mesh"})
    assert needs_write(other, live, undone=undone)


def test_snapshot_resolves_pointers_into_lists_and_missing_paths() -> None:
    live = {"spec": {"a/b": [{"x": 1}], "l": [0]}}
    ops = [
        {"op": "replace", "path": "/spec/a~1b/0/x", "value": 2},
        {"op": "add", "path": "/spec/missing", "value": []},
        {"op": "replace", "path": "/spec/l/5", "value": 1},
        {"op": "replace", "path": "/spec/l/x", "value": 1},
    ]
    assert [s[2] for s in snapshot(ops, live)] == [1, None, None, None]


# --- any mix of drifts ----------------------------------------------------------------------

_EXTRA_ENV = st.lists(
    st.sampled_from(["INJ", "LLAMA_CACHE", "USER_SETTING", "HF_HOME"]).map(lambda n: {"name": n}),
    max_size=3,
)


@settings(max_examples=200, deadline=None)
@given(
    env_order=st.permutations(range(2)),
    drop_env=st.booleans(),
    extra_env=_EXTRA_ENV,
    sidecars=st.integers(0, 2),
    extra_volumes=st.lists(st.sampled_from(["a", "b", "cache", "model"]), max_size=3),
    extra_mounts=st.lists(st.sampled_from(["/a", "/cache", "/models"]), max_size=2),
    service_ports=st.lists(st.sampled_from([8080, 9999, 9100]), max_size=2),
)
def test_any_mix_of_drifts_is_fixed_by_one_patch_and_then_left_alone(
    env_order: list[int],
    drop_env: bool,
    extra_env: list[dict[str, Any]],
    sidecars: int,
    extra_volumes: list[str],
    extra_mounts: list[str],
    service_ports: list[int],
) -> None:
    dep, svc = rendered("pvc")
    live = served(dep)
    pod = live["spec"]["template"]["spec"]
    engine = pod["containers"][0]
    engine["env"] = [engine["env"][i] for i in env_order][int(drop_env) :] + extra_env
    engine["volumeMounts"] += [{"name": "a", "mountPath": p} for p in extra_mounts]
    pod["containers"][sidecars % 2 : sidecars % 2] = [
        {"name": f"side{i}", "image": "x"} for i in range(sidecars)
    ]
    pod["volumes"] += [{"name": v, "emptyDir": {}} for v in extra_volumes]
    before = copy.deepcopy(pod)
    out = fixed(dep, live)["spec"]["template"]["spec"]
    want = dep["spec"]["template"]["spec"]

    def expect(rendered: list[Any], live: list[Any], key: str = "name") -> list[Any]:
        """The rendered keys the live list has, in rendered order; none: left as it is."""
        present = [k for k in names(rendered, key) if k in names(live, key)]
        return present if present else names(live, key)

    assert names(out["containers"]) == ["engine"]
    engine_before = next(c for c in before["containers"] if c["name"] == "engine")
    assert names(out["containers"][0]["env"]) == expect(
        want["containers"][0]["env"], engine_before["env"]
    )
    mounts = out["containers"][0]["volumeMounts"]
    assert names(mounts, "mountPath") == expect(
        want["containers"][0]["volumeMounts"], engine_before["volumeMounts"], "mountPath"
    )
    assert names(out["volumes"]) == names(want["volumes"])
    live_svc = served(svc)
    live_svc["spec"]["ports"] = [{"name": "x", "port": p} for p in service_ports]
    out_svc = jsonpatch.apply_patch(live_svc, port_ops(svc, live_svc))
    # A foreign port is replaced by ours; none at all is left for the apply to add.
    assert names(fixed(svc, out_svc)["spec"]["ports"], "port") == ([8080] if service_ports else [])


def test_an_ollama_pull_left_after_an_engine_switch_goes_with_its_volume() -> None:
    """Switched from ollama to llama.cpp while the apply did not own the ollama parts (the
    operator killed between a create and its managedFields patch): the init container the
    operator renders goes, with the volume only it mounted; one added by hand stays."""
    ollama, _ = rendered("ollama")
    desired, _ = rendered("llamacpp")
    live = served(desired)
    pod, was = live["spec"]["template"]["spec"], ollama["spec"]["template"]["spec"]
    # As an earlier version rendered it: the model store a volume only the pull mounted.
    was["volumes"].append({"name": "ollama", "emptyDir": {}})
    was["initContainers"][0]["volumeMounts"].append(
        {"name": "ollama", "mountPath": "/root/.ollama"}
    )
    hand = {
        "name": "hand",
        "image": "busybox",
        "volumeMounts": [{"name": "cache", "mountPath": "/c"}],
    }
    pod["initContainers"] = [*copy.deepcopy(was["initContainers"]), hand]
    pod["volumes"] = [*pod["volumes"], *[v for v in was["volumes"] if v not in pod["volumes"]]]
    assert {v["name"] for v in pod["volumes"]} > {
        v["name"] for v in desired["spec"]["template"]["spec"]["volumes"]
    }
    ops = list_ops(desired, live)
    fixed = jsonpatch.apply_patch(live, ops)
    assert [c["name"] for c in fixed["spec"]["template"]["spec"]["initContainers"]] == ["hand"]
    assert (
        fixed["spec"]["template"]["spec"]["volumes"]
        == desired["spec"]["template"]["spec"]["volumes"]
    )
    assert list_ops(desired, fixed) == []  # settled: nothing more to patch
