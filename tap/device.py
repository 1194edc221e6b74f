"""Open and configure a TAP device, route multicast into it, read and write frames.

Bridged (`bridge` set): the TAP becomes a port of an existing Linux bridge, so the node
is a router on a real LAN. The address and the multicast routes then belong on the
bridge (the host's layer-3 interface on that LAN); the TAP is a plain port with no
addresses of its own. What is added to the bridge is removed again on close.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytun

from tap.offload import VNET_HEADER_LEN, tap_writes

log = logging.getLogger("mcmw.tap")

# A read takes one frame: the MTU, the Ethernet header and a VLAN tag. Reading into a
# buffer no bigger than that keeps the allocation per frame small (a 64 KiB buffer per
# read, cut down afterwards, cost a tenth of the reading node's time in malloc); a frame
# beyond it, after someone raised the MTU by hand, arrives cut short and is counted
# malformed.
FRAME_OVERHEAD = 14 + 4
# Frames the kernel holds for us while the node is busy (tun's default is 500: 5 ms of a
# 100 000 pps stream). A node sharing its core with the applications it serves is
# sometimes off the CPU longer than that; 2000 frames, 3 MB at most, ride it out.
TX_QUEUE_FRAMES = 2000


class TapError(OSError):
    """The TAP could not be created or configured; the message says which step failed."""


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise TapError(f"ip {' '.join(args)}: {result.stderr.strip() or 'failed'}")


def _sysctl(key: str, value: str) -> str:
    """Set a sysctl; return its previous value."""
    path = Path("/proc/sys") / key.replace(".", "/")
    try:
        old = path.read_text().strip()
        path.write_text(value)
    except OSError as exc:
        raise TapError(f"sysctl {key}={value}: {exc.strerror}") from None
    return old


def _ip_json(*args: str) -> list[dict[str, object]]:
    result = subprocess.run(["ip", "-j", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise TapError(f"ip {' '.join(args)}: {result.stderr.strip() or 'failed'}")
    try:
        value = json.loads(result.stdout or "[]")
    except ValueError:
        raise TapError(f"ip {' '.join(args)}: unreadable output") from None
    return value if isinstance(value, list) else []


class TapDevice:
    """A non-persistent TAP: the kernel deletes it, and its routes, when the fd closes."""

    def __init__(
        self,
        name: str,
        address: ipaddress.IPv4Interface,
        mtu: int = 1500,
        ipv6_scopes: Sequence[int] = (),
        bridge: str | None = None,
    ) -> None:
        self.name = name
        self.address = address
        self.mtu = mtu
        self.read_size = VNET_HEADER_LEN + mtu + FRAME_OVERHEAD
        self.trains = True  # whether the kernel takes UDP trains (tap/offload.py)
        self.ipv6_scopes = tuple(ipv6_scopes)
        self.bridge = bridge
        self._dev: pytun.TunTapDevice | None = None
        self.fd = -1
        self.mac = b""
        self._undo: list[tuple[str, ...]] = []  # bridged: what to take back, newest last

    def open(self) -> None:
        if self.bridge is not None:
            self._check_bridge(self.bridge)
        try:
            dev = pytun.TunTapDevice(
                name=self.name, flags=pytun.IFF_TAP | pytun.IFF_NO_PI | pytun.IFF_VNET_HDR
            )
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
        if self.bridge is not None:
            assert self._dev is not None
            self._configure_bridged(self.bridge, self._dev.hwaddr)
            return
        name = self.name
        _ip("link", "set", name, "mtu", str(self.mtu), "txqueuelen", str(TX_QUEUE_FRAMES))
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

    # -- bridged ------------------------------------------------------------------

    @staticmethod
    def _check_bridge(bridge: str) -> None:
        try:
            links = _ip_json("-d", "link", "show", "dev", bridge)
        except TapError:
            raise TapError(
                f"bridge {bridge}: no such interface; create it first (ip link add {bridge} type bridge)"
            ) from None
        info = links[0].get("linkinfo") if links else None
        kind = info.get("info_kind") if isinstance(info, dict) else None
        if kind != "bridge":
            raise TapError(f"bridge {bridge}: is a {kind or 'plain'} interface, not a Linux bridge")
        if "UP" not in (links[0].get("flags") or []):
            log.warning("bridge %s is down: the LAN will not hear the node until it is up", bridge)

    def _configure_bridged(self, bridge: str, hwaddr: bytes) -> None:
        name = self.name
        _ip("link", "set", name, "mtu", str(self.mtu), "txqueuelen", str(TX_QUEUE_FRAMES))
        # A Linux bridge without an explicit MAC takes the lowest of its ports'; a TAP
        # coming and going must not change the LAN address of the host. fe:... is above
        # every vendor's addresses (libvirt does the same for its TAPs).
        mac = b"\xfe" + hwaddr[1:6]
        _ip("link", "set", name, "address", ":".join(f"{b:02x}" for b in mac))
        # A bridge port has no layer-3 life of its own: no IPv6 link-local address,
        # so the host does not send its own MLD reports straight into the TAP.
        _sysctl(f"net.ipv6.conf.{name}.disable_ipv6", "1")
        _ip("link", "set", name, "master", bridge)
        # With IGMP/MLD snooping on, the bridge sends multicast only to ports with
        # listeners and to router ports. The node is a router that wants every group
        # (to carry local senders) and every report (also when another router is the
        # querier and the node's own queries are silent): a permanent router port.
        try:
            _ip("link", "set", "dev", name, "type", "bridge_slave", "mcast_router", "2")
        except TapError as exc:
            log.warning(
                "%s: cannot make %s a permanent multicast router port; with "
                "snooping on, reports may miss the node: %s",
                bridge,
                name,
                exc,
            )
        _ip("link", "set", name, "up")
        # The address: the node's queries come from it, and local applications that
        # send through the bridge take their packets' source from the bridge.
        existing: set[tuple[str, int]] = set()
        for link in _ip_json("-4", "addr", "show", "dev", bridge):
            for item in link.get("addr_info") or []:  # type: ignore[attr-defined]
                existing.add((str(item.get("local")), int(item.get("prefixlen", -1))))
        if (str(self.address.ip), self.address.network.prefixlen) not in existing:
            _ip("addr", "add", str(self.address), "dev", bridge)
            self._undo.append(("ip", "addr", "del", str(self.address), "dev", bridge))
        for key, value in (("rp_filter", "2"), ("accept_local", "1")):
            old = _sysctl(f"net.ipv4.conf.{bridge}.{key}", value)
            if old != value:
                self._undo.append(("sysctl", f"net.ipv4.conf.{bridge}.{key}", old))
        self._route_to("-4", "224.0.0.0/4", bridge)
        for scope in self.ipv6_scopes:
            self._route_to("-6", f"ff{scope:02x}::/16", bridge)

    def _route_to(self, family: str, prefix: str, dev: str) -> None:
        """Point a multicast route at `dev` (IPv6: a multicast route in table local, as
        unbridged), remembering the route it replaces to put it back on close."""
        where = ["table", "local", "type", "multicast"] if family == "-6" else []
        kind = ["multicast"] if family == "-6" else []
        table = ["table", "local"] if family == "-6" else []
        before = _ip_json(family, "route", "show", *where, "exact", prefix)
        if any(r.get("dev") == dev for r in before):
            return  # already where it belongs, set by the operator: leave it be
        _ip(family, "route", "replace", *kind, prefix, "dev", dev, *table)
        # Undone last in, first out: first delete ours, then restore what it replaced.
        for route in before[:1]:  # `replace` took the place of the first one
            if "dev" in route:
                old = [prefix, "dev", str(route["dev"])]
                if "metric" in route:
                    old += ["metric", str(route["metric"])]
                self._undo.append(("ip", family, "route", "add", *kind, *old, *table))
        self._undo.append(("ip", family, "route", "del", *kind, prefix, "dev", dev, *table))

    def _unbridge(self) -> None:
        """Take back what was added to the bridge, newest first; never raises."""
        while self._undo:
            step = self._undo.pop()
            try:
                if step[0] == "sysctl":
                    _sysctl(step[1], step[2])
                else:
                    _ip(*step[1:])
            except TapError as exc:
                log.warning("cleanup of %s: %s", self.bridge, exc)

    # -- frames -------------------------------------------------------------------

    def read_batch(self, limit: int) -> list[bytes]:
        """Frames the kernel sent, up to `limit`, stopping early at EAGAIN."""
        # Each read starts with a virtio-net header; the TAP offers no offloads, so the
        # kernel sends whole, checksummed frames and the header says nothing: cut it off.
        frames: list[bytes] = []
        append, read, fd, size = frames.append, os.read, self.fd, self.read_size
        try:
            for _ in range(limit):
                append(read(fd, size)[VNET_HEADER_LEN:])
        except BlockingIOError:
            pass
        return frames

    def write_frames(self, frames: list[bytes]) -> int:
        """Hand frames to the kernel, like datagrams in trains; return how many it had no
        room for (dropped)."""
        writev, fd, dropped = os.writev, self.fd, 0
        for start, end, buffers in tap_writes(frames, self.trains):
            try:
                writev(fd, buffers)
            except OSError as exc:
                if end - start > 1 and exc.errno == errno.EINVAL:
                    # A kernel before 6.2 takes no UDP trains from a TAP: this one and
                    # every later one frame by frame (those of this call are built).
                    if self.trains:
                        log.info("%s: the kernel takes no UDP trains; one write per frame", self.name)
                        self.trains = False
                    dropped += self.write_frames(frames[start:end])
                    continue
                if exc.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.EINVAL):
                    raise
                dropped += end - start
        return dropped

    def close(self) -> None:
        if self._dev is not None:
            self._dev.close()  # the kernel deletes the TAP, which leaves the bridge
            self._dev = None
            self.fd = -1
        self._unbridge()
