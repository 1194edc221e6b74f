"""The benchmark's two sites and its stream: addresses, the group, the mcmw tree file.

Plain data with no import of mcmw, so that `core.py --src OTHER_CHECKOUT` can use it
before it imports the mcmw it measures.

Addresses: veths in 198.18.0.0/15 (RFC 2544 benchmark range), TAPs in 169.254/16.
"""

from __future__ import annotations

GROUP = "239.1.1.1"
PORT = 5001
SIZE = 1316  # 7 MPEG-TS packets of 188 bytes
TTL = 16
VETH_A, VETH_B = "198.18.0.1", "198.18.0.2"
TAP_A, TAP_B = "169.254.1.1", "169.254.1.2"
UDP_PORT = 7001


def other_groups(count: int) -> list[str]:
    """`count` groups besides GROUP (239.2.0.1 on), for a routing table of that size."""
    base = (239 << 24) | (2 << 16)
    return [".".join(str((base + i) >> s & 0xFF) for s in (24, 16, 8, 0)) for i in range(1, count + 1)]


def mcmw_tree(transport: str = "tcp", secret_file: str | None = None) -> str:
    """The two-node tree file: with transport 'udp' both nodes announce a UDP data port
    (and IP-Data of up to 1420 bytes goes whole); with `secret_file` (a path relative
    to the tree file) every peer message is authenticated."""
    udp = f"    udp: {UDP_PORT}\n" if transport == "udp" else ""
    secret = f"  secret_file: {secret_file}\n" if secret_file else ""
    # As the README's tutorial: a 1316-byte datagram authenticated is a 1408-byte IP-Data
    # message, which the default (1400) would send in two fragments.
    udp_max = "  udp_max_message: 1420\n" if transport == "udp" else ""
    return (
        "overlay:\n"
        "  address_bits: 24\n"
        "  mapping: modulo\n"
        f"{secret}{udp_max}"
        "nodes:\n"
        "  a:\n"
        f"    listen: {VETH_A}:7000\n{udp}"
        f"    tap: {{name: mcmw0, address: {TAP_A}/16}}\n"
        "  b:\n"
        f"    listen: {VETH_B}:7000\n{udp}"
        f"    tap: {{name: mcmw0, address: {TAP_B}/16}}\n"
        "links:\n"
        "  - [a, b]\n"
    )
