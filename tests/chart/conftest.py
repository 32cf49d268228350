"""Chart tests: the chart's path (helm comes from tests/conftest.py)."""

from tests.conftest import REPO

CHART = REPO / "charts" / "fabric-operator"
