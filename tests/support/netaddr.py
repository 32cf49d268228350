"""Extra local addresses for pods run as processes.

The Endpoints controller refuses loopback pod IPs (127.0.0.0/8: "may not be in the
loopback range"), so each process-backed pod gets an address of the benchmarking range
198.18.0.0/15 (RFC 2544: never routed) added to `lo` for the test's duration.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator

import pytest

PREFIX = "198.18.0."


@contextlib.contextmanager
def local_address(n: int) -> Iterator[str]:
    """198.18.0.n on `lo` while in use (needs root with CAP_NET_ADMIN)."""
    ip = f"{PREFIX}{n}"
    if shutil.which("ip") is None:
        pytest.skip("iproute2 `ip` not found: cannot give a process-backed pod its address")
    added = subprocess.run(
        ["ip", "addr", "add", f"{ip}/32", "dev", "lo"], capture_output=True, text=True, check=False
    )
    if added.returncode != 0 and "File exists" not in added.stderr:
        pytest.skip(
            f"cannot add {ip} to lo (needs root with CAP_NET_ADMIN): {added.stderr.strip()}"
        )
    try:
        yield ip
    finally:
        if added.returncode == 0:
            subprocess.run(["ip", "addr", "del", f"{ip}/32", "dev", "lo"], check=False)
