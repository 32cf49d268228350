"""GPU types → node pools, merged with the user's placement; rollout strategy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fabric_operator.config import OperatorConfig, presets
from fabric_operator.render import render
from fabric_operator.validation import validate

NVIDIA_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
AMD_TAINT = {"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def vllm(**gpu: Any) -> dict[str, Any]:
    return {
        "engine": "vllm",
        "model": {"huggingface": {"repo": "a/b"}},
        "resources": {"gpu": {"count": 2, **gpu}},
    }


def pod(spec: dict[str, Any], config: OperatorConfig | None = None) -> dict[str, Any]:
    config = config or OperatorConfig()
    backend, problems = validate(
        {"metadata": {"name": "m", "namespace": "n"}, "spec": spec}, config
    )
    assert backend is not None and problems == [], problems
    out: dict[str, Any] = render(backend, config).deployment["spec"]["template"]["spec"]
    return out


def problems(spec: dict[str, Any], config: OperatorConfig | None = None) -> list[str]:
    _, found = validate({"metadata": {"name": "m"}, "spec": spec}, config or OperatorConfig())
    return [str(p) for p in found]


@pytest.mark.parametrize(
    ("scheme", "label", "value"),
    [
        ("gfd", "nvidia.com/gpu.product", "NVIDIA-L4"),
        ("gke", "cloud.google.com/gke-accelerator", "nvidia-l4"),
        ("karpenter", "karpenter.k8s.aws/instance-gpu-name", "l4"),
    ],
)
def test_gpu_type_selects_its_pool_in_each_label_scheme(
    scheme: str, label: str, value: str
) -> None:
    config = OperatorConfig.model_validate({"labelScheme": scheme})
    template = pod(vllm(type="L4"), config)
    assert template["nodeSelector"] == {label: value}
    assert "affinity" not in template  # one value: a nodeSelector is enough
    assert template["tolerations"] == [NVIDIA_TAINT]
    limits = template["containers"][0]["resources"]["limits"]
    assert limits == {"nvidia.com/gpu": "2"}


def test_user_placement_is_merged_not_replaced() -> None:
    template = pod(
        {
            **vllm(type="L4"),
            "nodeSelector": {"zone": "a"},
            "tolerations": [
                {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}
            ],
        }
    )
    assert template["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-L4", "zone": "a"}
    assert template["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"},
        NVIDIA_TAINT,
    ]


def test_user_toleration_equal_to_the_default_is_not_repeated() -> None:
    assert pod({**vllm(), "tolerations": [NVIDIA_TAINT]})["tolerations"] == [NVIDIA_TAINT]


def _terms(template: dict[str, Any]) -> list[Any]:
    node = template["affinity"]["nodeAffinity"]
    return list(node["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"])


def _in(key: str, *values: str) -> dict[str, Any]:
    return {"key": key, "operator": "In", "values": list(values)}


PRODUCT = "nvidia.com/gpu.product"


@pytest.mark.parametrize(
    ("gpu", "values"),
    [
        ("H100-80GB", ("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe")),
        ("H200", ("NVIDIA-H200", "NVIDIA-H200-NVL")),
        ("A100-80GB", ("NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe")),
        ("A100-40GB", ("NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-PCIE-40GB")),
        ("H100-NVL", ("NVIDIA-H100-NVL",)),  # the 94 GB card: a type of its own
    ],
)
def test_one_gpu_type_several_product_strings(gpu: str, values: tuple[str, ...]) -> None:
    template = pod(vllm(type=gpu))
    if len(values) == 1:
        assert template["nodeSelector"] == {PRODUCT: values[0]}
        assert "affinity" not in template
        return
    assert "nodeSelector" not in template
    assert _terms(template) == [{"matchExpressions": [_in(PRODUCT, *values)]}]


def test_amd_type_and_taint() -> None:
    template = pod(vllm(type="MI300X", vendor="amd"))
    assert "nodeSelector" not in template
    # Product name (OAM, or plain from libdrm) or, sturdier, the PCI device id: either.
    assert _terms(template) == [
        {
            "matchExpressions": [
                _in("amd.com/gpu.product-name", "AMD_Instinct_MI300X_OAM", "AMD_Instinct_MI300X")
            ]
        },
        {"matchExpressions": [_in("amd.com/gpu.device-id", "74a1", "74b5")]},
    ]
    assert template["tolerations"] == [AMD_TAINT]
    assert template["containers"][0]["resources"]["limits"] == {"amd.com/gpu": "2"}


def test_configured_accelerators_extend_and_override_presets(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("""
labelScheme: gke
gpuTolerations: false
accelerators:
  L4:
    nodeSelector: {pool: l4-spot}
    tolerations: [{key: spot, operator: Exists, effect: NoSchedule}]
  RTX-6000:
    nodeSelector: {gpu: rtx6000}
""")
    config = OperatorConfig.load(path)
    assert pod(vllm(type="L4"), config)["nodeSelector"] == {"pool": "l4-spot"}
    assert pod(vllm(type="L4"), config)["tolerations"] == [
        {"key": "spot", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod(vllm(type="RTX-6000"), config)["nodeSelector"] == {"gpu": "rtx6000"}
    assert "tolerations" not in pod(vllm(type="RTX-6000"), config)
    assert "H100-80GB" in config.catalogue()


def test_unknown_gpu_type_names_the_known_ones() -> None:
    [problem] = problems(vllm(type="B300"))
    assert problem.startswith(
        "spec.resources.gpu.type: unknown GPU type 'B300'; this "
        "operator knows: A100-40GB, A100-80GB, A10G, B200, H100-80GB, H100-NVL, H200, "
    )
    assert "MI300X" in problem and "T4" in problem


def test_no_catalogue_says_so() -> None:
    config = OperatorConfig.model_validate({"labelScheme": "none"})
    assert problems(vllm(type="L4"), config) == [
        "spec.resources.gpu.type: unknown GPU type 'L4'; this operator knows: none configured"
    ]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (vllm(type="MI300X"), "spec.resources.gpu.vendor: MI300X is an amd GPU; set vendor: amd"),
        (
            {**vllm(type="L4"), "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-T4"}},
            "spec.nodeSelector['nvidia.com/gpu.product']: contradicts the node pool of GPU type L4",
        ),
        (
            {
                "engine": "llamacpp",
                "model": {"url": "https://h.invalid/m.gguf"},
                "resources": {"gpu": {"type": "L4"}},
            },
            "spec.resources.gpu.count: gpu.type L4 needs a count of at least 1",
        ),
        (
            {**vllm(), "strategy": {"type": "Recreate", "maxSurge": 1}},
            "spec.strategy: maxSurge and maxUnavailable apply to RollingUpdate",
        ),
    ],
)
def test_placement_mistakes(spec: dict[str, Any], expected: str) -> None:
    assert any(p.startswith(expected) for p in problems(spec)), problems(spec)


def test_every_preset_places_the_pod() -> None:
    for scheme in ("gfd", "gke", "karpenter"):
        config = OperatorConfig.model_validate({"labelScheme": scheme})
        for name, acc in presets(scheme).items():  # type: ignore[arg-type]
            assert acc.node_selector or acc.node_affinity, name
            template = pod(vllm(type=name, vendor=str(acc.vendor)), config)
            assert template.get("nodeSelector", {}) == acc.node_selector
            if acc.node_affinity:
                assert len(_terms(template)) == len(acc.node_affinity)


def test_the_users_affinity_and_the_pools_are_both_required() -> None:
    zone = _in("topology.kubernetes.io/zone", "a", "b")
    spot = {"key": "spot", "operator": "DoesNotExist"}
    preferred = [{"weight": 1, "preference": {"matchExpressions": [zone]}}]
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [zone]}, {"matchExpressions": [spot]}]
            },
            "preferredDuringSchedulingIgnoredDuringExecution": preferred,
        },
        "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []},
    }
    template = pod({**vllm(type="MI300X", vendor="amd"), "affinity": affinity})
    product = _in("amd.com/gpu.product-name", "AMD_Instinct_MI300X_OAM", "AMD_Instinct_MI300X")
    device = _in("amd.com/gpu.device-id", "74a1", "74b5")
    # (zone OR no spot) AND (product OR device): every user term with every pool term.
    assert _terms(template) == [
        {"matchExpressions": [zone, product]},
        {"matchExpressions": [zone, device]},
        {"matchExpressions": [spot, product]},
        {"matchExpressions": [spot, device]},
    ]
    node = template["affinity"]["nodeAffinity"]
    assert node["preferredDuringSchedulingIgnoredDuringExecution"] == preferred
    assert template["affinity"]["podAntiAffinity"] == affinity["podAntiAffinity"]
    # Without a GPU type, the user's affinity is left exactly as written.
    assert pod({**vllm(), "affinity": affinity})["affinity"] == affinity


def test_empty_user_terms_stay_empty_and_match_fields_are_kept() -> None:
    zone = _in("topology.kubernetes.io/zone", "a")
    host = {"key": "metadata.name", "operator": "In", "values": ["gpu-7"]}
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [zone]}, {}, {"matchFields": [host]}]
            }
        }
    }
    product = _in(PRODUCT, "NVIDIA-H200", "NVIDIA-H200-NVL")
    assert _terms(pod({**vllm(type="H200"), "affinity": affinity})) == [
        {"matchExpressions": [zone, product]},
        {},  # matches no node, as the user wrote it: not widened to the whole pool
        {"matchFields": [host], "matchExpressions": [product]},
    ]


def test_an_affinity_that_is_not_one_is_passed_on_for_the_api_server_to_refuse() -> None:
    odd = {"nodeAffinity": "nodes with GPUs"}
    assert pod({**vllm(type="H200"), "affinity": odd})["affinity"] == odd


@pytest.mark.parametrize(
    ("selector", "ok"),
    [
        ({PRODUCT: "NVIDIA-H100-PCIe"}, True),  # narrows the pool to PCIe boards: fine
        ({PRODUCT: "NVIDIA-H100-80GB-HBM3"}, True),
        ({PRODUCT: "NVIDIA-L4"}, False),  # in none of the type's values
        ({"zone": "a"}, True),
    ],
)
def test_a_node_selector_may_narrow_a_pool_not_leave_it(selector: dict[str, str], ok: bool) -> None:
    found = problems({**vllm(type="H100-80GB"), "nodeSelector": selector})
    assert (found == []) is ok, found
    if not ok:
        assert found[0].startswith(
            "spec.nodeSelector['nvidia.com/gpu.product']: contradicts the node pool of GPU "
            "type H100-80GB"
        )


def test_amd_device_id_alone_is_not_a_contradiction() -> None:
    # A node selector on the product name leaves the device-id term: still a pool.
    assert (
        problems(
            {
                **vllm(type="MI300X", vendor="amd"),
                "nodeSelector": {"amd.com/gpu.product-name": "Other"},
            }
        )
        == []
    )
    both = {"amd.com/gpu.product-name": "Other", "amd.com/gpu.device-id": "0000"}
    assert len(problems({**vllm(type="MI300X", vendor="amd"), "nodeSelector": both})) == 2


def test_configured_accelerators_take_node_affinity(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("""
accelerators:
  RTX-PRO-6000:
    nodeAffinity:
      - nvidia.com/gpu.product:
          [NVIDIA-RTX-PRO-6000-Blackwell-Server-Edition, NVIDIA-RTX-PRO-6000]
""")
    template = pod(vllm(type="RTX-PRO-6000"), OperatorConfig.load(path))
    assert _terms(template) == [
        {
            "matchExpressions": [
                _in(
                    PRODUCT,
                    "NVIDIA-RTX-PRO-6000-Blackwell-Server-Edition",
                    "NVIDIA-RTX-PRO-6000",
                )
            ]
        }
    ]
    path.write_text("accelerators: {X: {nodeAffinity: [{a: []}]}}\n")
    with pytest.raises(ValueError, match="a nodeAffinity term needs labels, each with values"):
        OperatorConfig.load(path)


@pytest.mark.parametrize(
    ("spec", "strategy"),
    [
        (vllm(), {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}),
        ({**vllm(), "strategy": {"type": "Recreate"}}, {"type": "Recreate"}),
        (
            {**vllm(), "strategy": {"type": "RollingUpdate", "maxSurge": "25%"}},
            {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%"}},
        ),
    ],
)
def test_strategy_default_and_override(spec: dict[str, Any], strategy: dict[str, Any]) -> None:
    backend, found = validate({"metadata": {"name": "m"}, "spec": spec})
    assert backend is not None and found == []
    assert render(backend).deployment["spec"]["strategy"] == strategy


def test_karpenter_tells_the_a100_sizes_apart_by_gpu_memory() -> None:
    catalogue = OperatorConfig.model_validate({"labelScheme": "karpenter"}).catalogue()
    big, small = catalogue["A100-80GB"].node_selector, catalogue["A100-40GB"].node_selector
    assert (
        big["karpenter.k8s.aws/instance-gpu-name"] == small["karpenter.k8s.aws/instance-gpu-name"]
    )
    assert big["karpenter.k8s.aws/instance-gpu-memory"] == "81920"
    assert small["karpenter.k8s.aws/instance-gpu-memory"] == "40960"
