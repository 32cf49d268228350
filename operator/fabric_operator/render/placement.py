"""Where an LLMBackend's pods may run: the GPU type's node pool, merged with the user's
own nodeSelector and tolerations (merged, never replaced)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fabric_operator.api.backend import LLMBackend
from fabric_operator.config import GPU_TOLERATIONS, Accelerator, OperatorConfig


@dataclass(frozen=True)
class Placement:
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    # nodeSelector keys where the user's value contradicts the GPU type's pool.
    conflicts: list[str] = field(default_factory=list)


def accelerator(backend: LLMBackend, config: OperatorConfig) -> Accelerator | None:
    gpu_type = backend.spec.gpu_type
    return config.catalogue().get(gpu_type) if gpu_type else None


def placement(backend: LLMBackend, config: OperatorConfig) -> Placement:
    spec = backend.spec
    pool = accelerator(backend, config)
    selector = dict(pool.node_selector) if pool else {}
    conflicts = [
        k for k, v in (spec.node_selector or {}).items() if k in selector and selector[k] != v
    ]
    selector.update(spec.node_selector or {})

    tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations or []]
    extra = list(pool.tolerations) if pool else []
    if spec.gpu_count and config.gpu_tolerations:
        extra.append(GPU_TOLERATIONS[spec.gpu_vendor])
    for tol in extra:
        dumped = tol.model_dump(by_alias=True, exclude_none=True)
        if dumped not in tolerations:
            tolerations.append(dumped)
    return Placement(selector, tolerations, conflicts)
