"""COPS framing (RFC 2748 2.1, 2.2) of mcmw's peer messages: strict, bounded encode/decode.

Numbers and a hex example of every message are in docs/protocol.md.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

COPS_VERSION = 1
CLIENT_TYPE = 0x8CA5  # enterprise-specific range (RFC 2748 2.1): "mcmw"
PROTOCOL_VERSION = 1
HEADER_LEN = 8
OBJECT_HEADER_LEN = 4
MAX_MESSAGE_LEN = 128 * 1024  # the largest message a peer may send (bounds buffers)
MAX_NODE_NAME = 64
MAX_REASON = 256

# Op-codes: RFC 2748's where the meaning is close, so that COPS dissectors read them.
OP_ADD_ROUTE = 1  # REQ: request state
OP_IP_DATA = 3  # RPT: report state
OP_REMOVE_ROUTE = 4  # DRQ: delete request state
OP_OPEN = 6  # OPN: client-open
OP_CLOSE = 8  # CC: client-close
OP_KEEPALIVE = 9  # KA: keep-alive

# Object C-Nums (RFC 2748 2.2); each of ours has C-Type 1.
CNUM_ERROR = 8
CNUM_CLIENT_SI = 9
CNUM_KA_TIMER = 10
CNUM_PEPID = 11

MAPPING_CODES = {"identity": 0, "modulo": 1, "hash": 2}
MAPPING_NAMES = {v: k for k, v in MAPPING_CODES.items()}
TTL_CODES = {"hop": 0, "link": 1}
TTL_NAMES = {v: k for k, v in TTL_CODES.items()}
MODE_INCLUDE, MODE_EXCLUDE = 1, 2
MODE_NAMES = {MODE_INCLUDE: "include", MODE_EXCLUDE: "exclude"}
MODE_CODES = {v: k for k, v in MODE_NAMES.items()}

# Close error codes (Error object): why a link was closed.
CLOSE_NORMAL = 1
CLOSE_BAD_MESSAGE = 2
CLOSE_MISMATCH = 3
CLOSE_UNKNOWN_PEER = 4
CLOSE_DEAD = 5
CLOSE_OVERLOAD = 6
CLOSE_REPLACED = 7

COMMON_HEADER = struct.Struct("!BBHI")
OBJECT_HEADER = struct.Struct("!HBB")
OPEN_INFO = struct.Struct("!BBBBHH16s")  # ..., udp port, reserved, nonce
KEEPALIVE_INFO = struct.Struct("!QQQ")
ROUTE_HEAD = struct.Struct("!IBBH")
ERROR_BODY = struct.Struct("!HH")
FRAGMENT_INFO = struct.Struct("!III")  # packet id, offset, total length of the IP packet
KA_TIMER = struct.Struct("!HH")
# IP-Data: common header + one ClientSI (overlay address, link sequence, IP packet).
IP_DATA_HEAD = struct.Struct("!BBHIHBBII")
IP_DATA_HEAD_LEN = IP_DATA_HEAD.size  # 20
IP_DATA_PREFIX = struct.Struct("!BBHIHBBI")  # the head up to the sequence number
IP_DATA_FIELDS = struct.Struct("!8xHBB4xI")  # what a receiver reads: object length, C-Num, C-Type, seq
SEQ = struct.Struct("!I")
IP_DATA_MIN_OBJECT = OBJECT_HEADER_LEN + 8 + 20  # object header, address, seq, IPv4 header
VERSION_FLAGS = COPS_VERSION << 4


class CodecError(ValueError):
    """A peer message that does not parse; str() is the reason."""


@dataclass(frozen=True)
class Route:
    """Interest in one group: mode include/exclude with sources (empty exclude = any)."""

    overlay_address: int
    group: bytes
    mode: str = "exclude"
    sources: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Open:
    node: str
    address_bits: int
    mapping: str
    ttl_mode: str = "hop"
    udp_port: int = 0
    dead_interval: int = 10
    version: int = PROTOCOL_VERSION
    nonce: bytes = bytes(16)  # random per connection when messages are authenticated


@dataclass(frozen=True)
class KeepAlive:
    timestamp_ns: int = 0  # sender's clock when sent
    echo_ns: int = 0  # the peer's last timestamp, returned for RTT
    held_ns: int = 0  # how long the sender held that timestamp before this message


@dataclass(frozen=True)
class AddRoute:
    routes: tuple[Route, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class RemoveRoute:
    routes: tuple[Route, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class IpData:
    overlay_address: int
    seq: int
    packet: bytes  # the IP packet, or when `fragment` is set, one piece of it
    fragment: tuple[int, int, int] | None = None  # (packet id, offset, total length)


@dataclass(frozen=True)
class Close:
    code: int
    reason: str


Message = Open | KeepAlive | AddRoute | RemoveRoute | IpData | Close

MESSAGE_NAMES = {
    OP_OPEN: "open",
    OP_KEEPALIVE: "keepalive",
    OP_ADD_ROUTE: "add-route",
    OP_REMOVE_ROUTE: "remove-route",
    OP_IP_DATA: "ip-data",
    OP_CLOSE: "close",
}


def _pad(length: int) -> int:
    return -length % 4


def _object(cnum: int, content: bytes) -> bytes:
    return OBJECT_HEADER.pack(OBJECT_HEADER_LEN + len(content), cnum, 1) + content + bytes(_pad(len(content)))


def _message(opcode: int, objects: list[bytes]) -> bytes:
    body = b"".join(objects)
    return COMMON_HEADER.pack(VERSION_FLAGS, opcode, CLIENT_TYPE, HEADER_LEN + len(body)) + body


def max_route_sources(group_len: int) -> int:
    """The most sources one route object can list: its 16-bit length bounds it (4094
    IPv6 or 16379 IPv4 addresses)."""
    return (0xFFFF - OBJECT_HEADER_LEN - ROUTE_HEAD.size) // group_len - 1


def _route_content(route: Route) -> bytes:
    family = 4 if len(route.group) == 4 else 6
    return (
        ROUTE_HEAD.pack(route.overlay_address, family, MODE_CODES[route.mode], len(route.sources))
        + route.group
        + b"".join(route.sources)
    )


def ip_data_prefix(overlay_address: int, packet_len: int, trailer_len: int = 0) -> bytes:
    """The 16 bytes of an IP-Data message before its sequence number (then the packet,
    its padding, and `trailer_len` bytes of objects after it: an Integrity object sealed
    with it). They depend on the size alone, so a stream of one size packs them once."""
    content = 8 + packet_len
    total = IP_DATA_HEAD_LEN + packet_len + _pad(content) + trailer_len
    return IP_DATA_PREFIX.pack(
        VERSION_FLAGS,
        OP_IP_DATA,
        CLIENT_TYPE,
        total,
        OBJECT_HEADER_LEN + content,
        CNUM_CLIENT_SI,
        1,
        overlay_address,
    )


def ip_data_header(overlay_address: int, seq: int, packet_len: int, trailer_len: int = 0) -> bytes:
    """The 20 bytes before the packet in an IP-Data message."""
    return ip_data_prefix(overlay_address, packet_len, trailer_len) + SEQ.pack(seq)


def encode_fragment(address: int, seq: int, packet_id: int, offset: int, total: int, chunk: bytes) -> bytes:
    """An IP-Data message carrying bytes [offset, offset + len(chunk)) of a `total`-byte
    packet: the usual ClientSI with the piece, then a second ClientSI saying which piece."""
    return _message(
        OP_IP_DATA,
        [
            _object(CNUM_CLIENT_SI, struct.pack("!II", address, seq) + chunk),
            _object(CNUM_CLIENT_SI, FRAGMENT_INFO.pack(packet_id, offset, total)),
        ],
    )


def encode(msg: Message) -> bytes:
    if isinstance(msg, IpData):
        if msg.fragment is not None:
            return encode_fragment(msg.overlay_address, msg.seq, *msg.fragment, msg.packet)
        return (
            ip_data_header(msg.overlay_address, msg.seq, len(msg.packet))
            + msg.packet
            + bytes(_pad(len(msg.packet)))
        )
    if isinstance(msg, Open):
        return _message(
            OP_OPEN,
            [
                _object(CNUM_PEPID, msg.node.encode() + b"\x00"),
                _object(CNUM_KA_TIMER, KA_TIMER.pack(0, msg.dead_interval)),
                _object(
                    CNUM_CLIENT_SI,
                    OPEN_INFO.pack(
                        msg.version,
                        msg.address_bits,
                        MAPPING_CODES[msg.mapping],
                        TTL_CODES[msg.ttl_mode],
                        msg.udp_port,
                        0,
                        msg.nonce,
                    ),
                ),
            ],
        )
    if isinstance(msg, KeepAlive):
        return _message(
            OP_KEEPALIVE,
            [_object(CNUM_CLIENT_SI, KEEPALIVE_INFO.pack(msg.timestamp_ns, msg.echo_ns, msg.held_ns))],
        )
    if isinstance(msg, AddRoute | RemoveRoute):
        opcode = OP_ADD_ROUTE if isinstance(msg, AddRoute) else OP_REMOVE_ROUTE
        return _message(opcode, [_object(CNUM_CLIENT_SI, _route_content(r)) for r in msg.routes])
    if isinstance(msg, Close):
        return _message(
            OP_CLOSE,
            [
                _object(CNUM_ERROR, ERROR_BODY.pack(msg.code, 0)),
                _object(CNUM_CLIENT_SI, msg.reason.encode()[:MAX_REASON]),
            ],
        )
    raise TypeError(f"not a peer message: {msg!r}")


def encode_routes(add: bool, routes: list[Route]) -> list[bytes]:
    """Route messages for `routes`, split so that none exceeds MAX_MESSAGE_LEN."""
    messages: list[bytes] = []
    batch: list[Route] = []
    size = HEADER_LEN
    for route in routes:
        route_size = OBJECT_HEADER_LEN + 8 + len(route.group) * (1 + len(route.sources)) + 3
        if batch and size + route_size > MAX_MESSAGE_LEN:
            messages.append(encode(AddRoute(tuple(batch)) if add else RemoveRoute(tuple(batch))))
            batch, size = [], HEADER_LEN
        batch.append(route)
        size += route_size
    if batch:
        messages.append(encode(AddRoute(tuple(batch)) if add else RemoveRoute(tuple(batch))))
    return messages


def check_header(buf: bytes | bytearray | memoryview, offset: int) -> tuple[int, int]:
    """(op-code, length) of the message at `offset`; CodecError if the header is wrong."""
    if len(buf) - offset < HEADER_LEN:
        raise CodecError(f"{len(buf) - offset} bytes, shorter than the common header")
    vf, opcode, client_type, length = COMMON_HEADER.unpack_from(buf, offset)
    if vf >> 4 != COPS_VERSION:
        raise CodecError(f"COPS version {vf >> 4}, expected {COPS_VERSION}")
    if client_type != CLIENT_TYPE:
        raise CodecError(f"client-type 0x{client_type:04x}, expected 0x{CLIENT_TYPE:04x}")
    if opcode not in MESSAGE_NAMES:
        raise CodecError(f"unknown op-code {opcode}")
    if length < HEADER_LEN or length % 4 or length > MAX_MESSAGE_LEN:
        raise CodecError(f"message length {length} out of range")
    return opcode, length


def _objects(body: bytes) -> list[tuple[int, bytes]]:
    objects: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(body):
        if len(body) - offset < OBJECT_HEADER_LEN:
            raise CodecError("truncated object header")
        length, cnum, ctype = OBJECT_HEADER.unpack_from(body, offset)
        if length < OBJECT_HEADER_LEN:
            raise CodecError(f"object length {length} below 4")
        if ctype != 1:
            raise CodecError(f"object C-Num {cnum} has C-Type {ctype}, expected 1")
        end = offset + length
        if end > len(body):
            raise CodecError(f"object C-Num {cnum} runs past the message")
        objects.append((cnum, body[offset + OBJECT_HEADER_LEN : end]))
        offset = end + _pad(length)
    if offset != len(body):
        raise CodecError("object padding runs past the message")
    return objects


def _expect(objects: list[tuple[int, bytes]], cnums: list[int], what: str) -> list[bytes]:
    got = [c for c, _ in objects]
    if got != cnums:
        raise CodecError(f"{what}: objects {got}, expected {cnums}")
    return [content for _, content in objects]


def _decode_route(content: bytes) -> Route:
    if len(content) < ROUTE_HEAD.size:
        raise CodecError("route object truncated")
    address, family, mode, count = ROUTE_HEAD.unpack_from(content)
    if family not in (4, 6):
        raise CodecError(f"route family {family}")
    if mode not in MODE_NAMES:
        raise CodecError(f"route filter mode {mode}")
    size = 4 if family == 4 else 16
    if len(content) != ROUTE_HEAD.size + size * (1 + count):
        raise CodecError(f"route object length {len(content)} does not fit {count} sources")
    start = ROUTE_HEAD.size
    group = content[start : start + size]
    if (family == 4 and group[0] >> 4 != 0xE) or (family == 6 and group[0] != 0xFF):
        raise CodecError("route group is not a multicast address")
    sources = tuple(content[start + size * (i + 1) : start + size * (i + 2)] for i in range(count))
    return Route(address, group, MODE_NAMES[mode], sources)


def decode(data: bytes | bytearray | memoryview) -> Message:
    """Decode exactly one whole message; CodecError with the reason otherwise."""
    data = bytes(data)
    if len(data) < HEADER_LEN:
        raise CodecError(f"message of {len(data)} bytes is shorter than the header")
    opcode, length = check_header(data, 0)
    if length != len(data):
        raise CodecError(f"message length field {length}, got {len(data)} bytes")
    objects = _objects(data[HEADER_LEN:])
    name = MESSAGE_NAMES[opcode]
    if opcode == OP_IP_DATA:
        if len(objects) == 2:
            content, info = _expect(objects, [CNUM_CLIENT_SI, CNUM_CLIENT_SI], name)
            if len(content) < 9 or len(info) != FRAGMENT_INFO.size:
                raise CodecError("ip-data fragment of the wrong size")
            address, seq = struct.unpack_from("!II", content)
            return IpData(address, seq, content[8:], FRAGMENT_INFO.unpack(info))
        (content,) = _expect(objects, [CNUM_CLIENT_SI], name)
        if len(content) < IP_DATA_MIN_OBJECT - OBJECT_HEADER_LEN:
            raise CodecError("ip-data too short for an IP packet")
        address, seq = struct.unpack_from("!II", content)
        return IpData(address, seq, content[8:])
    if opcode == OP_OPEN:
        pepid, katimer, info = _expect(objects, [CNUM_PEPID, CNUM_KA_TIMER, CNUM_CLIENT_SI], name)
        if not pepid.endswith(b"\x00") or len(pepid) > MAX_NODE_NAME + 1:
            raise CodecError("open: node name not NUL-terminated or too long")
        try:
            node = pepid[:-1].decode()
        except UnicodeDecodeError:
            raise CodecError("open: node name is not UTF-8") from None
        if len(katimer) != KA_TIMER.size or len(info) != OPEN_INFO.size:
            raise CodecError("open: object of the wrong size")
        _, dead = KA_TIMER.unpack(katimer)
        version, bits, mapping, ttl, udp_port, _, nonce = OPEN_INFO.unpack(info)
        if mapping not in MAPPING_NAMES or ttl not in TTL_NAMES:
            raise CodecError(f"open: unknown mapping {mapping} or ttl mode {ttl}")
        return Open(node, bits, MAPPING_NAMES[mapping], TTL_NAMES[ttl], udp_port, dead, version, nonce)
    if opcode == OP_KEEPALIVE:
        (info,) = _expect(objects, [CNUM_CLIENT_SI], name)
        if len(info) != KEEPALIVE_INFO.size:
            raise CodecError("keepalive: timestamps of the wrong size")
        return KeepAlive(*KEEPALIVE_INFO.unpack(info))
    if opcode in (OP_ADD_ROUTE, OP_REMOVE_ROUTE):
        if any(c != CNUM_CLIENT_SI for c, _ in objects) or not objects:
            raise CodecError(f"{name}: expected one or more route objects")
        routes = tuple(_decode_route(content) for _, content in objects)
        return AddRoute(routes) if opcode == OP_ADD_ROUTE else RemoveRoute(routes)
    error, reason = _expect(objects, [CNUM_ERROR, CNUM_CLIENT_SI], name)
    if len(error) != ERROR_BODY.size:
        raise CodecError("close: error object of the wrong size")
    code, _ = ERROR_BODY.unpack(error)
    return Close(code, reason.decode(errors="replace")[:MAX_REASON])
