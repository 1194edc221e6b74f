"""Ethernet framing for multicast: group address <-> MAC, headers, router identities."""

from __future__ import annotations

import hashlib
import struct

ETH_HEADER_LEN = 14
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD


def multicast_mac(group: bytes) -> bytes:
    """The Ethernet address of an IP multicast group: 01:00:5e + low 23 bits (RFC 1112),
    or 33:33 + low 32 bits (RFC 2464)."""
    if len(group) == 4:
        return b"\x01\x00\x5e" + bytes((group[1] & 0x7F,)) + group[2:4]
    return b"\x33\x33" + group[12:16]


def router_mac(node: str) -> bytes:
    """A stable, locally administered unicast MAC for the router side of a node's TAP."""
    digest = hashlib.sha256(b"mcmw-router:" + node.encode()).digest()
    return bytes(((digest[0] & 0xFC) | 0x02,)) + digest[1:6]


def link_local_from_mac(mac: bytes) -> bytes:
    """The IPv6 link-local address (fe80::/64 + modified EUI-64, RFC 4291) of a MAC."""
    eui = bytes((mac[0] ^ 0x02,)) + mac[1:3] + b"\xff\xfe" + mac[3:6]
    return b"\xfe\x80" + bytes(6) + eui


def ethernet_header(dst: bytes, src: bytes, ethertype: int) -> bytes:
    return dst + src + struct.pack("!H", ethertype)


def frame_for_ip(packet: bytes, src_mac: bytes) -> bytes:
    """Wrap an IP multicast packet in the Ethernet header of its destination group."""
    if packet[0] >> 4 == 4:
        return ethernet_header(multicast_mac(packet[16:20]), src_mac, ETHERTYPE_IPV4) + packet
    return ethernet_header(multicast_mac(packet[24:40]), src_mac, ETHERTYPE_IPV6) + packet


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)
