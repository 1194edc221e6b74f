"""Peer socket buffers: the size asked for, past the host's limits when root, and a
warning that names the limit when not."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mcmw.runtime import SOCKET_BUFFER, big_buffers
from tests.netlab import require_privileged, require_tools

DEBIAN_DEFAULT = 212992  # net.core.rmem_max and wmem_max of a fresh Debian machine
LIMITS = (Path("/proc/sys/net/core/rmem_max"), Path("/proc/sys/net/core/wmem_max"))
REPO = Path(__file__).resolve().parent.parent

CHILD = """
import logging, socket, sys
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
from mcmw.runtime import big_buffers
for kind in ("UDP", "UDP", "TCP"):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if kind == "UDP" else socket.SOCK_STREAM)
    big_buffers(s, kind)
    get = s.getsockopt
    print(get(socket.SOL_SOCKET, socket.SO_RCVBUF), get(socket.SOL_SOCKET, socket.SO_SNDBUF))
"""


@contextmanager
def debian_default_limits() -> Iterator[None]:
    """The host's global socket buffer limits at Debian's defaults, put back after."""
    before = [path.read_text() for path in LIMITS]
    try:
        for path in LIMITS:
            path.write_text(f"{DEBIAN_DEFAULT}\n")
        yield
    finally:
        for path, text in zip(LIMITS, before, strict=True):
            path.write_text(text)


def test_as_root_the_buffers_are_what_mcmw_asks_for_whatever_the_limits() -> None:
    require_privileged()
    with debian_default_limits():
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            with socket.socket(socket.AF_INET, kind) as sock:
                big_buffers(sock, "UDP")
                # The kernel reports twice the size set (its bookkeeping overhead).
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * SOCKET_BUFFER
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * SOCKET_BUFFER


def test_without_the_capability_the_limits_apply_and_the_log_says_which() -> None:
    require_privileged()
    require_tools("setpriv")
    with debian_default_limits():
        drop = ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin", "--"]
        result = subprocess.run(
            [*drop, sys.executable, "-c", CHILD], cwd=REPO, capture_output=True, text=True, timeout=30
        )
    assert result.returncode == 0, result.stderr
    sizes = [tuple(map(int, line.split())) for line in result.stdout.split("\n") if line]
    assert sizes == [(2 * DEBIAN_DEFAULT, 2 * DEBIAN_DEFAULT)] * 3
    warnings = result.stderr.strip().split("\n")
    # Once per kind of socket and limit, not once per socket.
    assert warnings == [
        f"UDP socket buffer {DEBIAN_DEFAULT // 1024} KiB, not the {SOCKET_BUFFER // 1024} KiB "
        f"asked for: without root, net.core.{limit} caps it (a burst longer than it holds is dropped)"
        for limit in ("wmem_max", "rmem_max")
    ] + [
        f"TCP socket buffer {DEBIAN_DEFAULT // 1024} KiB, not the {SOCKET_BUFFER // 1024} KiB "
        f"asked for: without root, net.core.{limit} caps it (a burst longer than it holds is dropped)"
        for limit in ("wmem_max", "rmem_max")
    ]
