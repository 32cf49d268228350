"""Operator configuration, read once at start (Helm renders it into a ConfigMap).

Its main content is the accelerator catalogue: a GPU type a user names in
`spec.resources.gpu.type` (e.g. H100-80GB) becomes the node labels and tolerations of the
pool that has it. Presets cover the usual label schemes; `accelerators` adds or overrides.
The platform admin's tenancy settings live here too: the remote hosts `engine: remote`
backends may call, and the namespace the gateway runs in (the one namespace whose gateway
pods the default NetworkPolicy admits).
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from fabric_operator.api.v1alpha1 import GPUVendor, Toleration
from fabric_operator.remotehosts import RemoteHosts

LabelScheme = Literal["gfd", "gke", "karpenter", "none"]


class Accelerator(BaseModel):
    """Where the GPUs of one type live: labels with one value (a nodeSelector), and,
    where one type goes by several values (the same GPU as SXM or PCIe board, or known by
    product name or PCI device id), node affinity terms."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    vendor: GPUVendor = GPUVendor.NVIDIA
    node_selector: dict[str, str] = Field(default_factory=dict, alias="nodeSelector")
    node_affinity: list[dict[str, list[str]]] = Field(
        default_factory=list,
        alias="nodeAffinity",
        description="Terms of required node affinity, any one of which a node must match; "
        "in a term, each label must have one of its values (operator In).",
    )
    tolerations: list[Toleration] = Field(default_factory=list)

    @field_validator("node_affinity")
    @classmethod
    def _terms(cls, terms: list[dict[str, list[str]]]) -> list[dict[str, list[str]]]:
        for term in terms:
            if not term or any(not values for values in term.values()):
                raise ValueError("a nodeAffinity term needs labels, each with values")
        return terms

    def contradicted_by(self, selector: dict[str, str]) -> list[str]:
        """The keys of a nodeSelector that no node of this pool can match: a value other
        than the pool's own, or values that rule out every affinity term."""
        out = [k for k, v in selector.items() if self.node_selector.get(k, v) != v]
        terms = self.node_affinity
        if terms and not any(
            all(k not in t or v in t[k] for k, v in selector.items()) for t in terms
        ):
            out += [
                k
                for k, v in selector.items()
                if k not in out and any(k in t and v not in t[k] for t in terms)
            ]
        return out


# Label values per scheme, checked against each project's source (2026-11/12): gfd: NVIDIA
# GPU feature discovery's `nvidia.com/gpu.product` (the driver's name, sanitised; SXM and
# PCIe/NVL boards of one type both listed; nodes with time-slicing or MIG get
# -SHARED/-MIG-... suffixes and need a custom accelerator); gke:
# `cloud.google.com/gke-accelerator` (A3 Mega H100s are nvidia-h100-mega-80gb: configure
# them as their own type); karpenter:
# `karpenter.k8s.aws/instance-gpu-name` (plus the GPU memory where the name is shared).
# AMD: see _AMD below (the node labeller's product name, or the PCI device id).
_GPU_VALUES: dict[str, dict[str, str | tuple[str, ...]]] = {
    "gfd": {
        "B200": "NVIDIA-B200",
        # One type, several product strings (SXM and PCIe/NVL boards), checked against
        # NVIDIA's GPU feature discovery: node affinity In, not a nodeSelector.
        "H200": ("NVIDIA-H200", "NVIDIA-H200-NVL"),
        "H100-80GB": ("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe"),
        "H100-NVL": "NVIDIA-H100-NVL",  # 94 GB: a type of its own
        "A100-80GB": ("NVIDIA-A100-SXM4-80GB", "NVIDIA-A100-80GB-PCIe"),
        "A100-40GB": ("NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-PCIE-40GB"),
        "L40S": "NVIDIA-L40S",
        "L4": "NVIDIA-L4",
        "A10G": "NVIDIA-A10G",
        "T4": "Tesla-T4",
    },
    "gke": {
        "H200": "nvidia-h200-141gb",
        "H100-80GB": "nvidia-h100-80gb",
        "A100-80GB": "nvidia-a100-80gb",
        "A100-40GB": "nvidia-tesla-a100",
        "B200": "nvidia-b200",
        "L4": "nvidia-l4",
        "T4": "nvidia-tesla-t4",
    },
    "karpenter": {
        "B200": "b200",
        "H200": "h200",
        "H100-80GB": "h100",
        "A100-80GB": "a100",
        "A100-40GB": "a100",
        "L40S": "l40s",
        "L4": "l4",
        "A10G": "a10g",
        "T4": "t4",
    },
}
_SCHEME_LABEL = {
    "gfd": "nvidia.com/gpu.product",
    "gke": "cloud.google.com/gke-accelerator",
    "karpenter": "karpenter.k8s.aws/instance-gpu-name",
}
# Karpenter names both A100 sizes "a100": the GPU memory (MiB) tells p4de from p4d.
_EXTRA: dict[tuple[str, str], dict[str, str]] = {
    ("karpenter", "A100-80GB"): {"karpenter.k8s.aws/instance-gpu-memory": "81920"},
    ("karpenter", "A100-40GB"): {"karpenter.k8s.aws/instance-gpu-memory": "40960"},
}
# AMD's node labeller: the product name (OAM boards; plain when it falls back to libdrm),
# or, sturdier, the PCI device id (74b5 as a virtual function): either term will do.
_AMD: dict[str, list[dict[str, list[str]]]] = {
    "MI300X": [
        {"amd.com/gpu.product-name": ["AMD_Instinct_MI300X_OAM", "AMD_Instinct_MI300X"]},
        {"amd.com/gpu.device-id": ["74a1", "74b5"]},
    ],
}
# The taints GPU pools usually carry (GKE and EKS put nvidia.com/gpu on GPU nodes).
GPU_TOLERATIONS = {
    "nvidia": Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule"),
    "amd": Toleration(key="amd.com/gpu", operator="Exists", effect="NoSchedule"),
}


def presets(scheme: LabelScheme) -> dict[str, Accelerator]:
    """The built-in accelerator catalogue for one label scheme."""
    if scheme == "none":
        return {}
    label = _SCHEME_LABEL[scheme]
    out = {}
    for name, value in _GPU_VALUES[scheme].items():
        extra = _EXTRA.get((scheme, name), {})
        if isinstance(value, str):
            out[name] = Accelerator(node_selector={label: value, **extra})
        else:
            out[name] = Accelerator(node_selector=extra, node_affinity=[{label: list(value)}])
    out.update(
        {
            name: Accelerator(vendor=GPUVendor.AMD, node_affinity=[dict(t) for t in terms])
            for name, terms in _AMD.items()
        }
    )
    return out


# A host name, exact or with one leading "*." (remotehosts' patterns); IP addresses apart.
_HOST_PATTERN = re.compile(
    r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\.?$"
)
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def host_pattern_error(pattern: str) -> str | None:
    """Why `pattern` is no allow-list entry (None: it is one). An admin who writes
    `https://api.example.com` or `api.example.com:443` would otherwise allow nothing,
    silently: refused at start instead."""
    try:
        ipaddress.ip_address(pattern)
        return None
    except ValueError:
        pass
    if len(pattern) > 253 or not _HOST_PATTERN.fullmatch(pattern.lower()):
        return (
            f"{pattern[:80]!r} is not a host name (nor an IP address); write the host "
            "alone, optionally with one leading '*.', without scheme, port or path"
        )
    return None


# registry/path:tag or @digest, no spaces (what a container's image field takes).
_IMAGE_REF = re.compile(r"^[a-z0-9][a-z0-9._/:@-]*[a-zA-Z0-9_.-]*$")


class OperatorConfig(BaseModel):
    """What `--config FILE` holds (YAML, camelCase keys)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    label_scheme: LabelScheme = Field(default="gfd", alias="labelScheme")
    accelerators: dict[str, Accelerator] = Field(default_factory=dict)
    gpu_tolerations: bool = Field(default=True, alias="gpuTolerations")
    network_policy: bool = Field(
        default=False,
        alias="networkPolicy",
        description="Give backends without spec.networkPolicy the default NetworkPolicy.",
    )
    gateway_namespace: str | None = Field(
        default=None,
        alias="gatewayNamespace",
        description="The namespace of the fabric gateway, the only one whose gateway pods "
        "the default NetworkPolicy admits (default: the operator's own namespace).",
    )
    remote_hosts: list[str] | None = Field(
        default=None,
        alias="remoteHosts",
        description="Hosts `engine: remote` backends may call over https (absent: the "
        "documented providers' hosts; empty: none).",
    )
    remote_http_hosts: list[str] = Field(
        default_factory=list,
        alias="remoteHttpHosts",
        description="Hosts also allowed over plain http.",
    )
    pod_disruption_budgets: bool = Field(
        default=True,
        alias="podDisruptionBudgets",
        description="Give each backend with more than one replica a PodDisruptionBudget "
        "(maxUnavailable 1), so a node drain never takes a model fully down.",
    )
    images: dict[str, str] = Field(
        default_factory=dict,
        description="Pinned engine image -> the image used in its place (a mirror in a "
        "registry of the cluster's own), e.g. vllm/vllm-openai:v0.11.0 -> "
        "registry.internal/vllm/vllm-openai:v0.11.0; per image, so the CUDA, ROCm and CPU "
        "builds of one engine each keep theirs. A backend's spec.image still wins.",
    )
    max_upgrade_rollouts: int = Field(
        default=2,
        ge=0,
        alias="maxUpgradeRollouts",
        description="How many backends may roll at once because this operator renders "
        "them differently (a new pinned image, a new default), not because their spec "
        "changed; the others wait, their status says so. 0: no limit.",
    )

    @field_validator("remote_hosts", "remote_http_hosts")
    @classmethod
    def _host_patterns(cls, patterns: list[str] | None) -> list[str] | None:
        errors = [err for p in patterns or [] if (err := host_pattern_error(p))]
        if errors:
            raise ValueError("; ".join(errors))
        return patterns

    @field_validator("images")
    @classmethod
    def _image_refs(cls, images: dict[str, str]) -> dict[str, str]:
        bad = [ref for pair in images.items() for ref in pair if not _IMAGE_REF.fullmatch(ref)]
        if bad:
            raise ValueError(f"images: not image references: {', '.join(map(repr, bad))}")
        return images

    @field_validator("gateway_namespace")
    @classmethod
    def _namespace(cls, name: str | None) -> str | None:
        if name is not None and (len(name) > 63 or not _DNS_LABEL.fullmatch(name)):
            raise ValueError(f"{name[:80]!r} is not a namespace name")
        return name

    def remote(self) -> RemoteHosts:
        """The admin's allow-list of remote hosts."""
        return RemoteHosts.of(self.remote_hosts, self.remote_http_hosts)

    def with_gateway_namespace(self, namespace: str) -> OperatorConfig:
        """This configuration, with `namespace` as the gateway's unless one was given."""
        if self.gateway_namespace is not None:
            return self
        return self.model_copy(update={"gateway_namespace": namespace})

    def catalogue(self) -> dict[str, Accelerator]:
        """Presets of the chosen scheme, then the configured accelerators over them."""
        return {**presets(self.label_scheme), **self.accelerators}

    @classmethod
    def load(cls, path: str | Path | None) -> OperatorConfig:
        if path is None:
            return cls()
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls.model_validate(data)


DEFAULT = OperatorConfig()
