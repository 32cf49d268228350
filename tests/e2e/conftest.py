"""e2e: the chart installed with Helm on a cluster of its own.

`local` (machines without Docker): the real control plane with simulated nodes; the
operator runs as a local process holding exactly the chart's ServiceAccount token.
kind (where Docker is) is not wired yet: the suite says so when asked for it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.support.fixtures import local_cluster
from tests.support.kube import Cluster


@pytest.fixture(scope="session")
def e2e_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if os.environ.get("FABRIC_E2E") == "kind":
        missing = [t for t in ("kind", "docker") if shutil.which(t) is None]
        pytest.skip(
            f"{', '.join(missing) or 'kind support'} not found: the kind e2e path "
            "is not implemented yet"
        )
    with local_cluster(tmp_path_factory, install_crd=False) as cluster:
        if not cluster.local:
            pytest.skip(
                "FABRIC_TEST_KUBECONFIG is set: the e2e suite needs the local control "
                "plane (it adds simulated nodes)"
            )
        yield cluster
