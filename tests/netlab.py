"""Test hosts in network namespaces: create, join with veth pairs, run programs, tear down.

Every name carries a per-run random tag, so parallel sessions never collide, and
everything created is removed even when a test fails.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


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


def wait_for(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `condition` until it returns a truthy value; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def run(argv: list[str], check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, **kw)


class Lab:
    """A set of network namespaces owned by one test."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen[Any]] = []

    def ns(self, short: str) -> str:
        """Create namespace `short` (named mcmw-TAG-short) with loopback up; return its name."""
        name = f"mcmw-{self.tag}-{short}"
        run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        self.exec(name, ["ip", "link", "set", "lo", "up"])
        return name

    def exec(self, ns: str, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", ns, *argv], check=check)

    def veth(self, ns_a: str, addr_a: str, ns_b: str, addr_b: str) -> None:
        """Join two namespaces with a veth pair carrying the given CIDR addresses."""
        a, b = f"v{secrets.token_hex(4)}", f"v{secrets.token_hex(4)}"
        run(["ip", "link", "add", a, "netns", ns_a, "type", "veth", "peer", "name", b, "netns", ns_b])
        for ns, dev, addr in ((ns_a, a, addr_a), (ns_b, b, addr_b)):
            self.exec(ns, ["ip", "addr", "add", addr, "dev", dev])
            self.exec(ns, ["ip", "link", "set", dev, "up"])

    def popen(self, ns: str, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)
        self.processes.append(proc)
        return proc

    def python(self, ns: str, code: str, *args: str, **kw: Any) -> subprocess.Popen[Any]:
        """Run a Python snippet inside `ns` with this interpreter."""
        return self.popen(ns, [sys.executable, "-c", code, *args], **kw)

    def close(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for name in reversed(self.namespaces):
            pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def lab():
    require_privileged()
    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()
