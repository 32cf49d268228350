"""Where an LLMBackend's pods may run: the GPU type's node pool (a nodeSelector, and node
affinity terms where one type has several label values), merged with the user's own
nodeSelector, tolerations and affinity (merged, never replaced)."""

from __future__ import annotations

import copy
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
    affinity: dict[str, Any] | None = None  # the user's, with the pool's terms ANDed in


def accelerator(backend: LLMBackend, config: OperatorConfig) -> Accelerator | None:
    gpu_type = backend.spec.gpu_type
    return config.catalogue().get(gpu_type) if gpu_type else None


def placement(backend: LLMBackend, config: OperatorConfig) -> Placement:
    spec = backend.spec
    pool = accelerator(backend, config)
    selector = dict(pool.node_selector) if pool else {}
    conflicts = pool.contradicted_by(spec.node_selector or {}) if pool else []
    selector.update(spec.node_selector or {})

    tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations or []]
    extra = list(pool.tolerations) if pool else []
    if spec.gpu_count and config.gpu_tolerations:
        extra.append(GPU_TOLERATIONS[spec.gpu_vendor])
    for tol in extra:
        dumped = tol.model_dump(by_alias=True, exclude_none=True)
        if dumped not in tolerations:
            tolerations.append(dumped)
    affinity = merge_affinity(spec.affinity, pool.node_affinity if pool else [])
    return Placement(selector, tolerations, conflicts, affinity)


REQUIRED = "requiredDuringSchedulingIgnoredDuringExecution"
EVERY_NODE: dict[str, Any] = {}  # no term given: the pool's terms alone


def merge_affinity(
    user: dict[str, Any] | None, pool_terms: list[dict[str, list[str]]]
) -> dict[str, Any] | None:
    """The user's affinity with the pool's terms required as well. Node selector terms are
    ORed and the expressions within one ANDed, so "the user's and the pool's" is every
    user term joined with every pool term; the user's other affinity stays as it is."""
    if not pool_terms:
        return user
    pool = [
        [{"key": k, "operator": "In", "values": list(v)} for k, v in sorted(t.items())]
        for t in pool_terms
    ]
    out = copy.deepcopy(user or {})
    node = out.get("nodeAffinity") or {}
    required = node.get(REQUIRED) or {} if isinstance(node, dict) else None
    theirs = (
        required.get("nodeSelectorTerms") or [EVERY_NODE] if isinstance(required, dict) else None
    )
    if (
        not isinstance(node, dict)
        or not isinstance(required, dict)
        or not isinstance(theirs, list)
        or not all(
            isinstance(t, dict) and isinstance(t.get("matchExpressions") or [], list)
            for t in theirs
        )
    ):
        return user  # not an Affinity: the API server's refusal says what is wrong
    out["nodeAffinity"] = node
    terms = []
    for term in theirs:
        if term is not EVERY_NODE and not (term.get("matchExpressions") or term.get("matchFields")):
            # A user's empty term matches no node: joined with the pool's it would match some.
            terms.append(term)
            continue
        for exprs in pool:
            joined = dict(term)
            joined["matchExpressions"] = list(term.get("matchExpressions") or []) + exprs
            terms.append(joined)
    node[REQUIRED] = {**required, "nodeSelectorTerms": terms}
    return out
