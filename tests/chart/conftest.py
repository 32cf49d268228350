"""Helm, as the project's own script provides it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

CHART = REPO / "charts" / "fabric-operator"


@pytest.fixture(scope="session")
def helm() -> Path:
    out = subprocess.run(
        ["bash", str(REPO / "hack" / "get-helm.sh")], check=True, stdout=subprocess.PIPE, text=True
    ).stdout
    return Path(out.strip().splitlines()[-1])
