"""e2e: the chart installed with Helm on a cluster of its own, with real nodes.

`local` (machines without Docker, the default): the local control plane with two real
nodes (containerd, runc, CNI, kubelet, kube-proxy; `tests.support.realcluster`), images
built with podman and imported into each node. kind (where Docker is): `FABRIC_E2E=kind`;
not wired yet, and the suite says so.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.support.realcluster import RealCluster, real_cluster

NODES = 2  # pods on both: the gateway reaches engines across nodes


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    if os.environ.get("FABRIC_E2E") == "kind":
        missing = [t for t in ("kind", "docker") if shutil.which(t) is None]
        pytest.skip(
            f"{', '.join(missing) or 'kind support'} not found: the kind e2e path "
            "is not implemented yet"
        )
    if os.environ.get("FABRIC_TEST_KUBECONFIG"):
        pytest.skip("FABRIC_TEST_KUBECONFIG is set: the e2e suite brings its own cluster")
    # Per module: gone before the next module starts clusters of its own (2 cores).
    with real_cluster(tmp_path_factory.mktemp("e2e-cluster"), NODES) as cluster:
        yield cluster
