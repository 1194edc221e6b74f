"""The COPS codec: every message round-trips; bad input is refused with a reason."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overlay import codec
from overlay.codec import AddRoute, Close, CodecError, IpData, KeepAlive, Open, RemoveRoute, Route

G1 = bytes([239, 1, 1, 1])
G6 = bytes.fromhex("ff0e0000000000000000000000000001")
PACKET = bytes.fromhex("45000020000000001011" + "0000" + "a9fe0101" + "ef010101") + bytes(12)

MESSAGES = [
    Open("alice", 24, "modulo", "hop", 7001, 10),
    Open("b" * 64, 32, "identity", "link", 0, 30),
    KeepAlive(123456789, 987654321, 5000),
    AddRoute((Route(65793, G1),)),
    AddRoute((Route(1, G1, "include", (b"\xa9\xfe\x01\x01", b"\xa9\xfe\x01\x02")), Route(9, G6))),
    RemoveRoute((Route(65793, G1),)),
    IpData(65793, 7, PACKET),
    IpData(1, 0xFFFFFFFF, PACKET + b"\x01"),
    IpData(1, 2, b"\x99" * 13, (7, 1360, 8028)),
    Close(codec.CLOSE_MISMATCH, "mapping hash, expected modulo"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: codec.Message) -> None:
    data = codec.encode(msg)
    assert len(data) % 4 == 0
    assert struct.unpack_from("!I", data, 4)[0] == len(data)
    assert codec.decode(data) == msg


def test_ip_data_header_matches_encode() -> None:
    msg = IpData(5, 9, PACKET + b"xyz")
    assert codec.encode(msg).startswith(codec.ip_data_header(5, 9, len(msg.packet)))


def test_encode_routes_splits_large_updates() -> None:
    sources = tuple(struct.pack("!I", 0xA9FE0000 + i) for i in range(1000))
    routes = [Route(i, bytes([239, 0, i // 256, i % 256]), "include", sources) for i in range(40)]
    messages = codec.encode_routes(True, routes)
    assert len(messages) > 1
    assert all(len(m) <= codec.MAX_MESSAGE_LEN for m in messages)
    decoded = [r for m in messages for r in codec.decode(m).routes]
    assert decoded == routes


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"\x10\x09", "shorter than the header"),
        (b"\x20\x09\x8c\xa5\x00\x00\x00\x08", "COPS version 2"),
        (b"\x10\x09\x00\x01\x00\x00\x00\x08", "client-type 0x0001"),
        (b"\x10\x63\x8c\xa5\x00\x00\x00\x08", "unknown op-code 99"),
        (b"\x10\x09\x8c\xa5\x7f\x00\x00\x00", "out of range"),
        (b"\x10\x09\x8c\xa5\x00\x00\x00\x0c\x00\x02\x09\x01", "below 4"),
        (b"\x10\x09\x8c\xa5\x00\x00\x00\x0c\x00\x40\x09\x01", "runs past the message"),
        (b"\x10\x09\x8c\xa5\x00\x00\x00\x0c\x00\x04\x09\x02", "C-Type 2"),
        (b"\x10\x09\x8c\xa5\x00\x00\x00\x0c\x00\x04\x09\x01", "wrong size"),
        (b"\x10\x01\x8c\xa5\x00\x00\x00\x08", "route objects"),
    ],
)
def test_bad_input_rejected_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(CodecError, match=reason):
        codec.decode(data)


def test_truncated_message_rejected() -> None:
    data = codec.encode(MESSAGES[0])
    for cut in range(len(data)):
        with pytest.raises(CodecError):
            codec.decode(data[:cut])


def test_route_with_unicast_group_rejected() -> None:
    data = codec.encode(AddRoute((Route(1, bytes([10, 0, 0, 1])),)))
    with pytest.raises(CodecError, match="not a multicast"):
        codec.decode(data)


def test_route_source_count_must_fit() -> None:
    data = bytearray(codec.encode(AddRoute((Route(1, G1, "include", (bytes(4),)),))))
    data[8 + 4 + 6 : 8 + 4 + 8] = struct.pack("!H", 3)  # claims 3 sources, carries 1
    with pytest.raises(CodecError, match="does not fit 3 sources"):
        codec.decode(bytes(data))


addresses4 = st.binary(min_size=4, max_size=4)
groups = st.one_of(
    st.builds(lambda b: bytes([0xE0 | (b[0] & 0x0F)]) + b[1:], addresses4),
    st.builds(lambda b: b"\xff" + b, st.binary(min_size=15, max_size=15)),
)


@st.composite
def routes(draw: st.DrawFn) -> Route:
    group = draw(groups)
    sources = draw(st.lists(st.binary(min_size=len(group), max_size=len(group)), max_size=5))
    return Route(
        draw(st.integers(0, 2**32 - 1)),
        group,
        draw(st.sampled_from(["include", "exclude"])),
        tuple(sources),
    )


messages = st.one_of(
    st.builds(
        Open,
        st.text(min_size=1, max_size=20).filter(
            lambda s: "\x00" not in s and len(s.encode()) <= 64
        ),
        st.integers(1, 128),
        st.sampled_from(["identity", "modulo", "hash"]),
        st.sampled_from(["hop", "link"]),
        st.integers(0, 65535),
        st.integers(0, 65535),
    ),
    st.builds(KeepAlive, *[st.integers(0, 2**64 - 1)] * 3),
    st.builds(lambda rs: AddRoute(tuple(rs)), st.lists(routes(), min_size=1, max_size=4)),
    st.builds(lambda rs: RemoveRoute(tuple(rs)), st.lists(routes(), min_size=1, max_size=4)),
    st.builds(
        IpData,
        st.integers(0, 2**32 - 1),
        st.integers(0, 2**32 - 1),
        st.binary(min_size=28, max_size=200),
    ),
    st.builds(Close, st.integers(0, 65535), st.text(max_size=50)),
)


@given(messages)
def test_random_messages_round_trip(msg: codec.Message) -> None:
    assert codec.decode(codec.encode(msg)) == msg


@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_codec_error(data: bytes) -> None:
    try:
        codec.decode(data)
    except CodecError:
        pass


@given(st.sampled_from(MESSAGES), st.integers(0, 400), st.integers(0, 255))
def test_mutated_messages_never_raise_anything_but_codec_error(
    msg: codec.Message, position: int, value: int
) -> None:
    data = bytearray(codec.encode(msg))
    data[position % len(data)] = value
    try:
        codec.decode(bytes(data))
    except CodecError:
        pass
