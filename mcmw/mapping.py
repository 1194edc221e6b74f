"""Multicast groups to overlay addresses.

Every node of a tree maps a group to the same overlay address, so routes for the
group (Add-Route / Remove-Route) and the packets of the group (IP-Data) can name it
by one number of `bits` bits. The mapping is chosen per tree (`overlay.mapping`):

identity
    The group's own value, `int(G)`. IPv4 groups need `bits >= 32` and then map
    exactly (the value of 239.1.1.1 is 0xEF010101). IPv6 groups keep their low
    `bits` bits, `int(G) mod 2**bits`, which is exact only when `bits == 128`.

modulo
    The offset of the group in its family's multicast block, modulo the address
    space: `(int(G) - 0xE0000000) mod 2**bits` for IPv4 (224.0.0.0 is 0) and
    `(int(G) - (0xff << 120)) mod 2**bits` for IPv6 (ff00:: is 0). With 24 bits,
    239.1.1.1 maps to 0x010101 = 65793.

hash
    `int.from_bytes(blake2b(P, digest_size=16).digest(), "big") mod 2**bits`, where P
    is the packed group: 4 bytes for IPv4, 16 for IPv6. Spreads groups evenly when
    their low bits are alike, and is stable across hosts, runs and Python versions
    (unlike the built-in `hash`).

Several groups can share an overlay address (any mapping narrower than the
groups); nodes must therefore still match the real group of every carried packet.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable

MAPPINGS = ("identity", "modulo", "hash")
MAX_BITS = 128

IPV4_MULTICAST_BASE = 0xE0000000  # 224.0.0.0
IPV6_MULTICAST_BASE = 0xFF << 120  # ff00::

Group = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_group(text: str) -> Group:
    """The multicast group written in `text` (IPv4 224.0.0.0/4 or IPv6 ff00::/8).

    Raises ValueError, with a message fit for an operator, for anything else.
    """
    stripped = text.strip()
    try:
        address = ipaddress.ip_address(stripped)
    except ValueError:
        raise ValueError(f"'{text}' is not an IPv4 or IPv6 address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise ValueError(f"'{text}': write the group without a %zone")
    if not address.is_multicast:
        raise ValueError(f"'{text}' is not a multicast group (IPv4 224.0.0.0/4 or IPv6 ff00::/8)")
    return address


def check_mapping(mapping: str, bits: int) -> None:
    """Raise ValueError unless `mapping` and `bits` describe a usable overlay space."""
    if mapping not in MAPPINGS:
        raise ValueError(f"unknown mapping '{mapping}' (one of {', '.join(MAPPINGS)})")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"address bits must be a whole number from 1 to {MAX_BITS}, not {bits!r}")


def make_mapper(mapping: str, bits: int) -> Callable[[bytes], int]:
    """A function from a packed group (4 bytes IPv4, 16 bytes IPv6) to its overlay address.

    For the data plane, which sees groups as packed header bytes. It does not check
    that the bytes are a multicast group; it raises ValueError for a wrong length,
    and for an IPv4 group under `identity` with fewer than 32 bits.
    """
    check_mapping(mapping, bits)
    size = 1 << bits
    mask = size - 1

    def identity(packed: bytes) -> int:
        _check_length(packed)
        if len(packed) == 4 and bits < 32:
            raise ValueError(f"identity mapping of IPv4 groups needs 32 bits or more, not {bits}")
        return int.from_bytes(packed, "big") & mask

    def modulo(packed: bytes) -> int:
        _check_length(packed)
        base = IPV4_MULTICAST_BASE if len(packed) == 4 else IPV6_MULTICAST_BASE
        return (int.from_bytes(packed, "big") - base) % size

    def hashed(packed: bytes) -> int:
        _check_length(packed)
        digest = hashlib.blake2b(bytes(packed), digest_size=16).digest()
        return int.from_bytes(digest, "big") & mask

    return {"identity": identity, "modulo": modulo, "hash": hashed}[mapping]


def overlay_address(group: Group, mapping: str, bits: int) -> int:
    """The overlay address of `group` under `mapping` in a space of 2**bits addresses."""
    return make_mapper(mapping, bits)(group.packed)


def _check_length(packed: bytes) -> None:
    if len(packed) not in (4, 16):
        raise ValueError(f"a packed group is 4 or 16 bytes, not {len(packed)}")
