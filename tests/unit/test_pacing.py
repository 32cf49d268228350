"""Paced upgrades: which rollouts are the operator's, and how many may run at once."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from fabric_operator.api.backend import LLMBackend
from fabric_operator.config import OperatorConfig
from fabric_operator.controller import pacing
from fabric_operator.controller.kube import child_versions, server_version
from fabric_operator.render import render

SPEC = {"engine": "llamacpp", "model": {"url": "https://h.invalid/m.gguf"}, "replicas": 2}


def backend(generation: int = 3, **fields: Any) -> LLMBackend:
    meta = {"name": "m", "namespace": "n", "uid": "u", "generation": generation}
    return LLMBackend.from_manifest({"metadata": meta, "spec": {**SPEC, **fields}})


def rendered(b: LLMBackend, config: OperatorConfig | None = None) -> dict[str, Any]:
    deployment = render(b, config or OperatorConfig()).deployment
    pacing.annotate(deployment, b)
    return deployment


MIRROR = OperatorConfig(
    images={"ghcr.io/ggml-org/llama.cpp:server-b10290": "mirror.invalid/llama.cpp:server-b10290"}
)


def test_a_new_rendering_of_an_unchanged_spec_is_an_upgrade() -> None:
    b = backend()
    live = rendered(b)
    assert pacing.is_upgrade(b, rendered(b, MIRROR), live, observed_generation=3)
    assert not pacing.is_upgrade(b, rendered(b), live, observed_generation=3)  # nothing new


def test_a_spec_change_is_never_held() -> None:
    live = rendered(backend())
    changed = backend(generation=4, engineOptions={"contextLength": 4096})
    assert not pacing.is_upgrade(changed, rendered(changed, MIRROR), live, observed_generation=3)


def test_replicas_alone_is_neither_an_upgrade_nor_a_spec_change_of_the_template() -> None:
    b = backend()
    live = rendered(b)
    scaled = backend(generation=4, replicas=5)
    assert pacing.spec_hash(scaled) == pacing.spec_hash(b)  # the autoscaler's field
    assert not pacing.is_upgrade(scaled, rendered(scaled), live, observed_generation=3)
    # Scaled while an upgrade waits: still the operator's rollout (held), replicas aside.
    assert pacing.is_upgrade(scaled, rendered(scaled, MIRROR), live, observed_generation=3)


def test_a_deployment_of_an_earlier_version_falls_back_on_observed_generation() -> None:
    b = backend()
    old = copy.deepcopy(rendered(b))
    del old["metadata"]["annotations"]
    old["spec"]["template"]["spec"]["containers"][0]["image"] = "old/llama.cpp:server"
    assert pacing.is_upgrade(b, rendered(b), old, observed_generation=3)
    assert not pacing.is_upgrade(b, rendered(b), old, observed_generation=2)  # spec changed
    assert not pacing.is_upgrade(b, rendered(b), None, observed_generation=3)  # new backend
    stopped = backend(replicas=0)
    assert not pacing.is_upgrade(stopped, rendered(stopped), old, observed_generation=3)


def deployment(desired: int, **status: Any) -> dict[str, Any]:
    return {"metadata": {"generation": 2}, "spec": {"replicas": desired}, "status": status}


DONE = {"observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (deployment(2, **DONE), False),
        (deployment(2, **{**DONE, "updatedReplicas": 1}), True),
        # Merely not all available (a crash loop, a lost node): no rollout ends that.
        (deployment(2, **{**DONE, "availableReplicas": 1}), False),
        (deployment(2, **{**DONE, "replicas": 3}), True),  # the surge pod still there
        (deployment(2, **{**DONE, "observedGeneration": 1}), True),  # not seen yet
        (deployment(0), False),
        (
            deployment(
                2,
                **{**DONE, "updatedReplicas": 1},
                conditions=[{"type": "Progressing", "reason": "ProgressDeadlineExceeded"}],
            ),
            False,  # given up: a stuck backend does not hold the others
        ),
    ],
)
def test_rolling(obj: dict[str, Any], expected: bool) -> None:
    assert pacing.rolling(obj) is expected


def test_the_pacer_admits_up_to_its_limit_and_counts_the_admitted_until_done() -> None:
    now = [0.0]
    finished: set[tuple[str, str]] = set()
    pacer = pacing.Pacer(2, clock=lambda: now[0])

    def admit(key: tuple[str, str], rolling_now: list[tuple[str, str]]) -> tuple[bool, int]:
        return pacer.admit(key, "t1", rolling_now, lambda k, t: k in finished and t == "t1")

    a, b, c = ("n", "a"), ("n", "b"), ("n", "c")
    assert admit(a, []) == (True, 0)
    assert admit(b, []) == (True, 1)  # a counts though its Deployment says nothing yet
    assert admit(c, []) == (False, 2)
    assert admit(c, [a, b]) == (False, 2)  # the same two, not four
    assert admit(a, [a]) == (True, 1)  # asking again for itself: b is the other
    finished.add(a)  # a's Deployment runs the new template everywhere
    assert admit(c, [b]) == (True, 1)
    assert admit(("n", "d"), [b, c]) == (False, 2)
    now[0] += pacing.ADMIT_GRACE_SECONDS + 1  # no news of b and c for that long
    assert admit(("n", "d"), []) == (True, 0)


def test_rolled_means_the_new_template_everywhere_and_ready_again() -> None:
    dep = deployment(2, **DONE)
    dep["metadata"]["annotations"] = {pacing.TEMPLATE_HASH: "t1"}
    assert pacing.rolled(dep, "t1") and not pacing.rolled(dep, "t0")
    dep["status"]["updatedReplicas"] = 1
    assert not pacing.rolled(dep, "t1")
    dep["status"] |= {"updatedReplicas": 2, "availableReplicas": 1}  # the new image crashes
    assert not pacing.rolled(dep, "t1")  # its slot is kept: the upgrade halts there
    assert pacing.rolled(None, "t1")


def test_no_limit_admits_all() -> None:
    pacer = pacing.Pacer(0)
    assert all(
        pacer.admit(("n", str(i)), "t", [("n", "x")], lambda k, t: False)[0] for i in range(20)
    )


def test_image_mirrors_are_per_pinned_image() -> None:
    pinned = {"vllm/vllm-openai:v0.11.0": "registry.internal/vllm/vllm-openai:v0.11.0"}
    config = OperatorConfig(images=pinned)
    gpu = {"resources": {"gpu": {"count": 1}}, "model": {"huggingface": {"repo": "o/r"}}}
    nvidia = LLMBackend.from_manifest(
        {"metadata": {"name": "m"}, "spec": {"engine": "vllm", **gpu}}
    )
    amd = LLMBackend.from_manifest(
        {
            "metadata": {"name": "m"},
            "spec": {
                "engine": "vllm",
                "model": gpu["model"],
                "resources": {"gpu": {"count": 1, "vendor": "amd"}},
            },
        }
    )

    def image_of(b: LLMBackend) -> str:
        return str(
            render(b, config).deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        )

    assert image_of(nvidia) == "registry.internal/vllm/vllm-openai:v0.11.0"
    assert image_of(amd).startswith("rocm/vllm:")  # the ROCm build keeps its own
    with pytest.raises(ValueError, match="not image references"):
        OperatorConfig(images={"vllm/vllm-openai:v0.11.0": "has space"})


def test_fields_that_do_not_shape_pods_are_not_the_users_rollout() -> None:
    b = backend()
    live = rendered(b)
    for change in (
        {"service": {"port": 9000}},
        {"fallback": ["other"]},
        {"routing": {"strategy": "PrefixAffinity"}},
        {"autoscaling": {"minReplicas": 1, "maxReplicas": 4}},
        {"networkPolicy": {"enabled": True}},
    ):
        edited = backend(generation=4, **change)
        assert pacing.spec_hash(edited) == pacing.spec_hash(b), change
        # The operator's pending change stays paced though the user edited those.
        assert pacing.is_upgrade(edited, rendered(edited, MIRROR), live, observed_generation=4)


def test_a_field_a_later_version_adds_with_a_default_changes_no_spec_hash() -> None:
    b = backend()
    dumped = b.spec.model_dump(by_alias=True, exclude_unset=True)
    assert set(dumped) == {"engine", "model", "replicas"}  # only what the user wrote
    # Defaults are not hashed: the same spec parsed again, or with a default spelled out
    # by the server, hashes alike only when written alike; unset fields never count.
    assert pacing.spec_hash(backend()) == pacing.spec_hash(b)


def test_an_unchanged_template_of_an_earlier_version_is_not_an_upgrade() -> None:
    b = backend()
    old = copy.deepcopy(rendered(b))
    del old["metadata"]["annotations"]
    # As the server returns it: defaults added to the template.
    old["spec"]["template"]["spec"]["containers"][0]["terminationMessagePath"] = "/dev/x"
    assert not pacing.is_upgrade(b, rendered(b), old, observed_generation=3)


@pytest.mark.parametrize(
    ("answer", "version", "pdb"),
    [
        ({"major": "1", "minor": "20"}, (1, 20), "v1beta1"),
        ({"major": "1", "minor": "20+"}, (1, 20), "v1beta1"),  # managed clusters' spelling
        ({"major": "1", "minor": "21"}, (1, 21), None),
        ({"major": "1", "minor": "33"}, (1, 33), None),
        ({"gitVersion": "v1.30.0"}, None, None),  # says nothing usable: a current server
        ("not a dict", None, None),
    ],
)
def test_the_servers_version_picks_the_budgets_api(
    answer: object, version: tuple[int, int] | None, pdb: str | None
) -> None:

    assert server_version(answer) == version
    assert child_versions(version).get("PodDisruptionBudget") == pdb
