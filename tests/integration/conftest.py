"""Integration fixtures: one local control plane and one operator for the session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.fixtures import OperatorProcess, local_cluster, temporary_namespace
from tests.support.kube import Cluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with local_cluster(tmp_path_factory) as c:
        yield c


@pytest.fixture(scope="session")
def operator(
    cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    op = OperatorProcess(cluster.kubeconfig, tmp_path_factory.mktemp("operator"))
    op.start()
    yield op
    op.stop()


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    with temporary_namespace(cluster) as name:
        yield name
