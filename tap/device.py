"""Open and configure a TAP device, route multicast into it, read and write frames."""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytun

log = logging.getLogger("mcmw.tap")

READ_SIZE = 65536


class TapError(OSError):
    """The TAP could not be created or configured; the message says which step failed."""


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise TapError(f"ip {' '.join(args)}: {result.stderr.strip() or 'failed'}")


def _sysctl(key: str, value: str) -> None:
    path = Path("/proc/sys") / key.replace(".", "/")
    try:
        path.write_text(value)
    except OSError as exc:
        raise TapError(f"sysctl {key}={value}: {exc.strerror}") from None


class TapDevice:
    """A non-persistent TAP: the kernel deletes it, and its routes, when the fd closes."""

    def __init__(
        self,
        name: str,
        address: ipaddress.IPv4Interface,
        mtu: int = 1500,
        ipv6_scopes: Sequence[int] = (),
    ) -> None:
        self.name = name
        self.address = address
        self.mtu = mtu
        self.ipv6_scopes = tuple(ipv6_scopes)
        self._dev: pytun.TunTapDevice | None = None
        self.fd = -1
        self.mac = b""

    def open(self) -> None:
        try:
            dev = pytun.TunTapDevice(name=self.name, flags=pytun.IFF_TAP | pytun.IFF_NO_PI)
        except pytun.Error as exc:
            raise TapError(f"cannot create TAP {self.name}: {exc}") from None
        self._dev = dev
        self.fd = dev.fileno()
        os.set_blocking(self.fd, False)
        try:
            self._configure()
        except Exception:
            self.close()
            raise
        self.mac = dev.hwaddr

    def _configure(self) -> None:
        name = self.name
        _ip("link", "set", name, "mtu", str(self.mtu))
        _ip("addr", "add", str(self.address), "dev", name)
        # Other nodes' packets arrive with their TAP address as source: one shared subnet
        # makes them pass strict reverse-path checks; loose mode keeps that true even
        # when an operator narrows the subnet.  IGMP queries come from our own address.
        _sysctl(f"net.ipv4.conf.{name}.rp_filter", "2")
        _sysctl(f"net.ipv4.conf.{name}.accept_local", "1")
        _sysctl(f"net.ipv6.conf.{name}.accept_dad", "0")
        _ip("link", "set", name, "up")
        _ip("route", "replace", "224.0.0.0/4", "dev", name)
        for scope in self.ipv6_scopes:
            _ip(
                "-6",
                "route",
                "replace",
                "multicast",
                f"ff{scope:02x}::/16",
                "dev",
                name,
                "table",
                "local",
            )

    def read_batch(self, limit: int) -> list[bytes]:
        """Frames the kernel sent, up to `limit`, stopping early at EAGAIN."""
        frames: list[bytes] = []
        read, fd = os.read, self.fd
        try:
            while len(frames) < limit:
                frames.append(read(fd, READ_SIZE))
        except BlockingIOError:
            pass
        return frames

    def write(self, frame: bytes) -> bool:
        """Hand a frame to the kernel; False when the kernel had no room for it."""
        try:
            os.write(self.fd, frame)
            return True
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.ENOBUFS, errno.EINVAL):
                return False
            raise

    def close(self) -> None:
        if self._dev is not None:
            self._dev.close()
            self._dev = None
            self.fd = -1
