"""Fault tests: a control plane of their own (its kube-apiserver gets stopped), and an
operator process per test that watches only the test's namespace, so that killing it or
starving it never disturbs another test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fabric_operator.localcluster import LocalControlPlane
from tests.support.faults import fault_cluster, say
from tests.support.fixtures import OperatorProcess, temporary_namespace
from tests.support.kube import Cluster


@pytest.fixture(scope="package")
def fault_plane(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Cluster, LocalControlPlane | None]]:
    # Package scope: torn down when tests/faults is done, before another suite starts its
    # own control plane (two at once would share 2 cores).
    with fault_cluster(tmp_path_factory) as pair:
        yield pair


@pytest.fixture(scope="package")
def cluster(fault_plane: tuple[Cluster, LocalControlPlane | None]) -> Cluster:
    return fault_plane[0]


@pytest.fixture
def plane(fault_plane: tuple[Cluster, LocalControlPlane | None]) -> LocalControlPlane:
    if fault_plane[1] is None:
        pytest.skip(
            "needs the local control plane to stop and start its kube-apiserver; "
            "FABRIC_TEST_KUBECONFIG points at a cluster the tests do not run"
        )
    return fault_plane[1]


@pytest.fixture
def namespace(cluster: Cluster) -> Iterator[str]:
    with temporary_namespace(cluster) as name:
        yield name


def start_operator(cluster: Cluster, namespace: str, logdir: Path) -> OperatorProcess:
    op = OperatorProcess(cluster.kubeconfig, logdir, f"--namespace={namespace}")
    op.start()
    return op


@pytest.fixture
def operator(cluster: Cluster, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    """The operator for this test's namespace only; it must still be running at the end."""
    op = start_operator(cluster, namespace, tmp_path)
    yield op
    alive = op.proc is not None and op.proc.poll() is None
    op.stop()
    if not alive:
        say("operator had exited: %s", op.logs()[-2000:])
