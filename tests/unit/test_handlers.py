"""kopf settings the operator depends on (server-side selection, paging, no posting)."""

from __future__ import annotations

import kopf
from kopf._cogs.structs import references

from fabric_operator.controller.handlers import configure_settings


def resource(group: str, plural: str) -> references.Resource:
    return references.Resource(group, "v1", plural, namespaced=True)


def test_only_pods_are_selected_by_the_api_server() -> None:
    settings = kopf.OperatorSettings()
    configure_settings(settings)
    selectors = settings.watching.label_selectors
    assert selectors.collect(resource("", "pods")) == [
        "app.kubernetes.io/managed-by=fabric-operator"
    ]
    # Children are not: one whose labels were changed by hand must still be seen.
    for group, plural in (
        ("apps", "deployments"),
        ("", "services"),
        ("llm.fabric.dev", "llmbackends"),
    ):
        assert selectors.collect(resource(group, plural)) == []
    assert selectors.collect(resource("metrics.k8s.io", "pods")) == []  # not the core pods
    assert settings.watching.chunk_size == 100 and settings.queueing.idle_timeout == 0.5
    assert settings.posting.enabled is False and settings.scanning.disabled is True
