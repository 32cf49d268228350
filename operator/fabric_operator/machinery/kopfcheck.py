"""The kopf release the operator's two wraps of kopf internals were checked against.

`indexgate` replaces three methods of a private kopf class, `relist` wraps a private kopf
function. pyproject pins kopf to this minor release; each wrap also checks, at start, that
what it replaces still has the shape it was written against, and the operator refuses to
start (KopfChanged) rather than run on a kopf whose internals moved: without the wraps a
restart's index wait turns quadratic and deletions a relisting hides go unseen.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

CHECKED = "1.45"


def installed() -> str:
    try:
        return version("kopf")
    except PackageNotFoundError:
        return "unknown"


class KopfChangedError(RuntimeError):
    """The installed kopf's internals are not those the operator was checked against."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"kopf {installed()} is not the kopf {CHECKED}.x this operator was checked "
            f"against: {what}. Install kopf>={CHECKED},<1.46 (the version pyproject.toml "
            "pins), or check the wraps in fabric_operator/machinery/indexgate.py and "
            "relist.py against the new kopf first."
        )
