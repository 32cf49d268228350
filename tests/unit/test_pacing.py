"""Paced upgrades: which rollouts are the operator's, and how many may run at once."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from fabric_operator.api.backend import LLMBackend
from fabric_operator.config import OperatorConfig
from fabric_operator.controller import pacing
from fabric_operator.render import render

SPEC = {"engine": "llamacpp", "model": {"url": "https://h.invalid/m.gguf"}, "replicas": 2}


def backend(generation: int = 3, **fields: Any) -> LLMBackend:
    meta = {"name": "m", "namespace": "n", "uid": "u", "generation": generation}
    return LLMBackend.from_manifest({"metadata": meta, "spec": {**SPEC, **fields}})


def rendered(b: LLMBackend, config: OperatorConfig | None = None) -> dict[str, Any]:
    deployment = render(b, config or OperatorConfig()).deployment
    pacing.annotate(deployment, b)
    return deployment


MIRROR = OperatorConfig(images={"llamacpp": "mirror.invalid/llama.cpp:server-b10290"})


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
        (deployment(2, **{**DONE, "availableReplicas": 1}), True),
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


def test_the_pacer_admits_up_to_its_limit_and_counts_the_admitted_until_they_show() -> None:
    now = [0.0]
    pacer = pacing.Pacer(2, clock=lambda: now[0])
    a, b, c = ("n", "a"), ("n", "b"), ("n", "c")
    assert pacer.admit(a, []) == (True, 0)
    assert pacer.admit(b, []) == (True, 1)  # a counts though its Deployment says nothing yet
    assert pacer.admit(c, []) == (False, 2)
    assert pacer.admit(c, [a, b]) == (False, 2)  # the same two, not four
    assert pacer.admit(a, [a]) == (True, 1)  # asking again for itself: b is the other
    now[0] += pacing.ADMIT_GRACE_SECONDS + 1
    assert pacer.admit(c, [b]) == (True, 1)  # a is done (not rolling, grace over)
    assert pacer.admit(("n", "d"), [b, c]) == (False, 2)


def test_no_limit_admits_all() -> None:
    pacer = pacing.Pacer(0)
    assert all(pacer.admit(("n", str(i)), [("n", "x")])[0] for i in range(20))
