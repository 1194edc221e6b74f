"""pytest side of the namespace test bed (mcmw/lab.py): privilege checks and the fixture."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from mcmw.lab import Lab, wait_for

__all__ = ["Lab", "lab", "require_privileged", "require_tools", "wait_for"]


def privileged_available() -> str | None:
    """None when namespaces and TAP devices can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    if not shutil.which("ip"):
        return "needs iproute2 (ip)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


def require_privileged() -> None:
    """Skip the test on a machine without privileges; fail instead under CI."""
    why = privileged_available()
    if why is None:
        return
    if os.environ.get("MCMW_REQUIRE_PRIVILEGED") == "1":
        pytest.fail(f"MCMW_REQUIRE_PRIVILEGED=1 but this test {why}")
    pytest.skip(why)


def require_tools(*names: str) -> None:
    """Skip without these programs (tshark, tcpdump, ...); fail instead under CI, whose
    setup script installs them, so that a missing one cannot pass as a skip."""
    missing = [name for name in names if shutil.which(name) is None]
    if not missing:
        return
    why = f"needs {', '.join(missing)}"
    if os.environ.get("MCMW_REQUIRE_PRIVILEGED") == "1":
        pytest.fail(f"MCMW_REQUIRE_PRIVILEGED=1 but this test {why}")
    pytest.skip(why)


@pytest.fixture
def lab() -> Iterator[Lab]:
    require_privileged()
    with Lab() as lab:
        yield lab
