"""Shared test settings and the fixtures every suite may use."""

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def helm() -> Path:
    """Helm, as the project's own script provides it."""
    out = subprocess.run(
        ["bash", str(REPO / "hack" / "get-helm.sh")], check=True, stdout=subprocess.PIPE, text=True
    ).stdout
    return Path(out.strip().splitlines()[-1])
