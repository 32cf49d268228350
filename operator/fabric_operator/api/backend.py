"""An LLMBackend as the operator sees it: identity from metadata, desired state from spec."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fabric_operator.api.v1alpha1 import API_VERSION, KIND, LLMBackendSpec


@dataclass(frozen=True)
class LLMBackend:
    """The parts of an LLMBackend object that rendering and reconciling need."""

    name: str
    namespace: str
    spec: LLMBackendSpec
    uid: str | None = None
    generation: int | None = None

    @classmethod
    def from_manifest(cls, obj: Mapping[str, Any]) -> LLMBackend:
        """Parse a whole object; raises pydantic.ValidationError on a bad spec."""
        meta = obj.get("metadata") or {}
        return cls(
            name=meta.get("name", ""),
            namespace=meta.get("namespace") or "default",
            spec=LLMBackendSpec.model_validate(obj.get("spec") or {}),
            uid=meta.get("uid"),
            generation=meta.get("generation"),
        )

    @property
    def served_model_name(self) -> str:
        return self.spec.served_model_name or self.name

    def owner_reference(self) -> dict[str, Any]:
        """The controller owner reference every child carries (needs a uid)."""
        if not self.uid:
            raise ValueError("an owner reference needs the LLMBackend's uid")
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
