"""Groups to overlay addresses: parse_group, the three mappings, the data-plane mapper."""

from __future__ import annotations

import hashlib
import ipaddress
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcmw.mapping import MAPPINGS, make_mapper, overlay_address, parse_group

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


# --- parse_group -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "group"),
    [
        ("239.1.1.1", V4("239.1.1.1")),
        ("224.0.0.0", V4("224.0.0.0")),
        (" 239.255.255.255\n", V4("239.255.255.255")),
        ("ff0e::1", V6("ff0e::1")),
        ("FF05::1:3", V6("ff05::1:3")),
        ("ff02::1", V6("ff02::1")),  # link-local groups still map; they are just never carried
    ],
)
def test_parse_group(text: str, group: V4 | V6) -> None:
    assert parse_group(text) == group


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("10.0.0.1", "'10.0.0.1' is not a multicast group"),
        ("240.0.0.1", "is not a multicast group"),
        ("fe80::1", "'fe80::1' is not a multicast group"),
        ("239.1.1", "'239.1.1' is not an IPv4 or IPv6 address"),
        ("224.0.0.256", "is not an IPv4 or IPv6 address"),
        ("group", "'group' is not an IPv4 or IPv6 address"),
        ("", "is not an IPv4 or IPv6 address"),
        ("239.1.1.1/32", "is not an IPv4 or IPv6 address"),
        ("ff02::1%eth0", "without a %zone"),
    ],
)
def test_parse_group_rejects(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        parse_group(text)


# --- the mappings --------------------------------------------------------------------


def test_spec_example() -> None:
    # (0xEF010101 - 0xE0000000) mod 2**24 = 0x010101
    assert overlay_address(V4("239.1.1.1"), "modulo", 24) == 65793


@pytest.mark.parametrize(
    ("group", "bits", "address"),
    [
        ("224.0.0.0", 24, 0),
        ("224.1.1.1", 24, 0x010101),  # shares 239.1.1.1's address: nodes match the real group
        ("239.255.255.255", 24, 0xFFFFFF),
        ("239.1.1.1", 32, 0x0F010101),
        ("239.1.1.1", 128, 0x0F010101),
        ("239.1.1.1", 8, 0x01),
        ("239.1.1.1", 1, 1),
        ("ff0e::1", 24, 1),
        ("ff05::1:3", 32, 0x00010003),
        ("ff0e::1", 128, (0x0E << 112) | 1),
        ("ff00::", 128, 0),
    ],
)
def test_modulo(group: str, bits: int, address: int) -> None:
    assert overlay_address(ipaddress.ip_address(group), "modulo", bits) == address


@pytest.mark.parametrize(
    ("group", "bits", "address"),
    [
        ("239.1.1.1", 32, 0xEF010101),
        ("239.1.1.1", 128, 0xEF010101),
        ("224.0.0.1", 33, 0xE0000001),
        ("ff0e::1", 128, int(V6("ff0e::1"))),
        ("ff0e::1234:5678", 16, 0x5678),  # IPv6 keeps its low bits
        ("ff0e::1234:5678", 32, 0x12345678),
    ],
)
def test_identity(group: str, bits: int, address: int) -> None:
    assert overlay_address(ipaddress.ip_address(group), "identity", bits) == address


def test_identity_ipv4_needs_32_bits() -> None:
    with pytest.raises(ValueError, match="needs 32 bits or more"):
        overlay_address(V4("239.1.1.1"), "identity", 24)


def test_hash_is_the_documented_blake2b() -> None:
    for group in (V4("239.1.1.1"), V6("ff0e::1")):
        digest = hashlib.blake2b(group.packed, digest_size=16).digest()
        expected = int.from_bytes(digest, "big")
        assert overlay_address(group, "hash", 128) == expected
        assert overlay_address(group, "hash", 24) == expected % 2**24


def test_hash_is_stable() -> None:
    # Pinned values: a change here breaks every mixed-version tree.
    assert overlay_address(V4("239.1.1.1"), "hash", 24) == 13154826
    assert overlay_address(V6("ff0e::1"), "hash", 24) == 10091921
    assert overlay_address(V4("239.1.1.1"), "hash", 128) == 0xD4F2687201B96A138C49DC1416C8BA0A


def test_hash_spreads_alike_groups() -> None:
    # Groups differing only above the low bits collide under modulo, not under hash.
    groups = [V4(f"{a}.1.1.1") for a in range(224, 240)]
    assert len({overlay_address(g, "modulo", 24) for g in groups}) == 1
    assert len({overlay_address(g, "hash", 24) for g in groups}) == len(groups)


# --- the data-plane mapper -----------------------------------------------------------

_GROUPS = st.one_of(
    st.integers(0xE0000000, 0xEFFFFFFF).map(V4),
    st.integers(0xFF << 120, 2**128 - 1).map(V6),
)


@given(_GROUPS, st.sampled_from(MAPPINGS), st.integers(32, 128))
def test_mapper_matches_overlay_address(group: V4 | V6, mapping: str, bits: int) -> None:
    address = make_mapper(mapping, bits)(group.packed)
    assert address == overlay_address(group, mapping, bits)
    assert 0 <= address < 2**bits


@given(_GROUPS, st.sampled_from(["modulo", "hash"]), st.integers(1, 128))
def test_every_address_is_in_the_space(group: V4 | V6, mapping: str, bits: int) -> None:
    assert 0 <= overlay_address(group, mapping, bits) < 2**bits


def test_mapper_accepts_bytes_like() -> None:
    mapper = make_mapper("modulo", 24)
    assert mapper(bytearray(V4("239.1.1.1").packed)) == 65793
    assert mapper(memoryview(V4("239.1.1.1").packed)) == 65793
    assert make_mapper("hash", 24)(memoryview(V4("239.1.1.1").packed)) == 13154826


@pytest.mark.parametrize("packed", [b"", b"\xef\x01\x01", b"\xef" * 5, b"\xff" * 17])
@pytest.mark.parametrize("mapping", MAPPINGS)
def test_mapper_rejects_other_lengths(mapping: str, packed: bytes) -> None:
    with pytest.raises(ValueError, match="4 or 16 bytes"):
        make_mapper(mapping, 32)(packed)


@pytest.mark.parametrize(
    ("mapping", "bits", "why"),
    [
        ("random", 24, "unknown mapping 'random'"),
        ("modulo", 0, "from 1 to 128"),
        ("modulo", 129, "from 1 to 128"),
        ("hash", True, "from 1 to 128"),
        ("hash", 24.0, "from 1 to 128"),
    ],
)
def test_mapper_rejects_bad_spaces(mapping: str, bits: int, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        make_mapper(mapping, bits)
