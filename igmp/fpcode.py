"""Floating-point time codes: IGMPv3 Max Resp Code and QQIC (RFC 3376 4.1.1, 4.1.7),
MLDv2 Maximum Response Code (RFC 3810 5.1.3; QQIC there is the IGMP 8-bit form).

An 8-bit code below 128 is the value itself; above, 1|exp(3)|mant(4) means
(mant | 0x10) << (exp + 3). The 16-bit MLD code is the same with a 12-bit mantissa
and threshold 32768. Encoding rounds down so hosts answer no later than we expect.
"""

from __future__ import annotations


def _decode(code: int, mant_bits: int) -> int:
    limit = 1 << (mant_bits + 3)
    if code < limit:
        return code
    exp = (code >> mant_bits) & 0x7
    mant = code & ((1 << mant_bits) - 1)
    return (mant | (1 << mant_bits)) << (exp + 3)


def _encode(value: int, mant_bits: int) -> int:
    limit = 1 << (mant_bits + 3)
    value = max(0, int(value))
    if value < limit:
        return value
    hidden = 1 << mant_bits
    largest = ((hidden << 1) - 1) << 10
    value = min(value, largest)
    # Smallest exponent whose mantissa fits: value >> (exp + 3) < 2 * hidden.
    exp = 0
    while (value >> (exp + 3)) >= (hidden << 1):
        exp += 1
    mant = (value >> (exp + 3)) - hidden
    return limit | (exp << mant_bits) | mant


def decode8(code: int) -> int:
    """IGMPv3 Max Resp Code / QQIC (either protocol) -> value (tenths of s, or s)."""
    return _decode(code & 0xFF, 4)


def encode8(value: int) -> int:
    """Value -> 8-bit code, rounded down, clamped to the largest (31744)."""
    return _encode(value, 4)


def decode16(code: int) -> int:
    """MLDv2 Maximum Response Code -> milliseconds."""
    return _decode(code & 0xFFFF, 12)


def encode16(value: int) -> int:
    """Milliseconds -> MLDv2 Maximum Response Code, rounded down, clamped (8387584)."""
    return _encode(value, 12)
