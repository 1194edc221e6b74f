"""The Internet checksum (RFC 1071), for IPv4 headers, IGMP and ICMPv6."""

from __future__ import annotations


def inet_checksum(data: bytes) -> int:
    """One's complement of the one's complement sum of 16-bit words; 0 if `data` verifies."""
    if len(data) % 2:
        data += b"\x00"
    # Summing as one big integer is much faster in Python than a word loop.
    total = sum(memoryview(data).cast("H")) if data else 0
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    # The sum was over native-endian words; swap to network order if needed.
    result = ~total & 0xFFFF
    return int.from_bytes(result.to_bytes(2, "little"), "big") if _LITTLE else result


_LITTLE = memoryview(b"\x01\x00").cast("H")[0] == 1
