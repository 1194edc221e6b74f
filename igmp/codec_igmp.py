"""IGMPv1/v2/v3 inside IPv4: parse whole packets, build queries (RFC 1112, 2236, 3376)."""

from __future__ import annotations

import struct

from igmp import codec_common, fpcode
from igmp.checksum import inet_checksum
from igmp.errors import Malformed
from igmp.messages import GroupRecord, Message

ALL_SYSTEMS = bytes((224, 0, 0, 1))
ALL_ROUTERS = bytes((224, 0, 0, 2))
ALL_V3_ROUTERS = bytes((224, 0, 0, 22))
ANY = bytes(4)
ANY_GROUP = bytes((224, 0, 0, 0))  # the base address: reserved, never a group

QUERY = 0x11
V1_REPORT = 0x12
V2_REPORT = 0x16
V2_LEAVE = 0x17
V3_REPORT = 0x22

IP_HEADER_LEN = 24  # with the 4-byte Router Alert option
ROUTER_ALERT = b"\x94\x04\x00\x00"


def is_multicast(addr: bytes) -> bool:
    return len(addr) == 4 and 224 <= addr[0] <= 239


def reportable(group: bytes) -> bool:
    """RFC 2236 6: 224.0.0.0 and 224.0.0.1 (all systems) are never reported."""
    return is_multicast(group) and group != ALL_SYSTEMS and group != ANY_GROUP


FAMILY = codec_common.Family(
    addr_len=4,
    any=ANY,
    all_systems=ALL_SYSTEMS,
    all_routers=ALL_ROUTERS,
    report_routers=ALL_V3_ROUTERS,
    query_type=QUERY,
    report_type=V3_REPORT,
    record_version=3,
    is_multicast=is_multicast,
    reportable=reportable,
)


def _ip_header(src: bytes, dst: bytes, payload_len: int, ttl: int = 1,
               router_alert: bool = True) -> bytes:
    options = ROUTER_ALERT if router_alert else b""
    total = 20 + len(options) + payload_len
    # TOS 0xc0 (internetwork control) and DF, as Linux sends its own IGMP.
    head = struct.pack("!BBHHHBBH4s4s", 0x45 + len(options) // 4, 0xC0, total, 0, 0x4000,
                       ttl, 2, 0, src, dst) + options
    return head[:10] + struct.pack("!H", inet_checksum(head)) + head[12:]


def _router_alert(options: bytes) -> bool:
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == 0:  # end of options
            return False
        if kind == 1:  # no-op
            i += 1
            continue
        if i + 1 >= len(options) or options[i + 1] < 2:
            return False
        if kind == 0x94:
            return True
        i += options[i + 1]
    return False


def parse(packet: bytes) -> Message:
    """Parse an IPv4 packet carrying IGMP; raise Malformed with a reason otherwise.

    Trailing bytes beyond the IPv4 Total Length (Ethernet padding) are ignored, so
    the version-by-length rule of RFC 3376 7.1 sees the real IGMP length.
    """
    if len(packet) < 20:
        raise Malformed("truncated", "shorter than an IPv4 header")
    vihl, _tos, total, _ident, frag, ttl, proto, _sum = struct.unpack_from("!BBHHHBBH", packet)
    if vihl >> 4 != 4:
        raise Malformed("bad_header", f"IP version {vihl >> 4}")
    ihl = (vihl & 0xF) * 4
    if ihl < 20:
        raise Malformed("bad_header", f"IHL {ihl}")
    if total < ihl or total > len(packet):
        raise Malformed("truncated", f"total length {total}, have {len(packet)}")
    if inet_checksum(packet[:ihl]) != 0:
        raise Malformed("checksum", "IPv4 header")
    if frag & 0x3FFF:
        raise Malformed("fragment", "IPv4 fragment")
    if proto != 2:
        raise Malformed("unknown_type", f"IP protocol {proto}")
    src = bytes(packet[12:16])
    dst = bytes(packet[16:20])
    alert = _router_alert(bytes(packet[20:ihl]))
    return parse_igmp(bytes(packet[ihl:total]), src, dst, ttl, alert)


def parse_igmp(data: bytes, src: bytes, dst: bytes, ttl: int, alert: bool) -> Message:
    """Parse the IGMP message `data` (the whole IP payload) sent from `src` to `dst`."""
    base = {"family": 4, "src": src, "dst": dst, "ttl": ttl, "router_alert": alert}
    if len(data) < 8:
        raise Malformed("truncated", f"IGMP length {len(data)}")
    kind, code = data[0], data[1]
    group = bytes(data[4:8])
    msg: Message
    if kind == QUERY:
        msg = _parse_query(data, base)
    elif kind in (V1_REPORT, V2_REPORT, V2_LEAVE):
        version = 1 if kind == V1_REPORT else 2
        mtype = "leave" if kind == V2_LEAVE else "report"
        msg = Message(version=version, type=mtype, raw_type=kind, group=group, **base)
    elif kind == V3_REPORT:
        msg = codec_common.parse_records(FAMILY, data, base)
    else:
        partial = Message(version=0, type="unknown", raw_type=kind, **base)
        raise Malformed("unknown_type", f"IGMP type 0x{kind:02x} code {code}", partial)
    if inet_checksum(data) != 0:
        raise Malformed("checksum", "IGMP", msg)
    return msg


def _parse_query(data: bytes, base: dict) -> Message:
    code, group = data[1], bytes(data[4:8])
    if len(data) == 8:
        # RFC 3376 7.1: an 8-byte query is v1 if Max Resp Code is 0, else v2.
        version = 1 if code == 0 else 2
        return Message(version=version, type="query", raw_type=QUERY, group=group,
                       max_resp_s=code / 10 if version == 2 else 10.0, **base)
    if len(data) < 12:
        # RFC 3376 7.1: queries of other lengths (9-11) must be ignored.
        partial = Message(version=0, type="query", raw_type=QUERY, group=group, **base)
        raise Malformed("truncated", f"query length {len(data)}", partial)
    return codec_common.parse_source_query(FAMILY, data, 8, group, fpcode.decode8(code) / 10, base)


def validate(msg: Message, own: bytes | None = None) -> str | None:
    """Router acceptance checks beyond syntax; the drop reason, or None if acceptable.

    `own` is the router's address: reports unicast to it are accepted too.
    """
    if msg.ttl != 1:
        return "bad_ttl"
    src = msg.src
    if src[0] >= 224 or src[0] == 127:
        return "bad_source"  # multicast, broadcast, loopback never send membership
    return codec_common.check_addresses(FAMILY, msg, own)


def max_sources(mtu: int = 1500) -> int:
    """How many sources fit in one v3 query of at most `mtu` bytes."""
    return max(1, (mtu - IP_HEADER_LEN - 12) // 4)


def build_query(
    version: int,
    src: bytes,
    group: bytes | None = None,
    sources: tuple[bytes, ...] | list[bytes] = (),
    max_resp_s: float = 10.0,
    s_flag: bool = False,
    qrv: int = 2,
    qqi_s: float = 125.0,
) -> tuple[bytes, bytes]:
    """A complete IPv4 query packet and its destination (224.0.0.1, or the group)."""
    group_field, dst = codec_common.query_destination(FAMILY, group)
    tenths = int(max_resp_s * 10 + 1e-6)
    if version >= 3:
        body = struct.pack("!BBH4sBBH", QUERY, fpcode.encode8(tenths), 0, group_field,
                           codec_common.query_flags(s_flag, qrv), fpcode.encode8(int(qqi_s + 1e-6)),
                           len(sources))
        body += b"".join(sources)
    else:
        # v2: Max Resp Time in tenths, 1..255; v1: zero, which is how hosts tell v1.
        code = min(255, max(1, tenths)) if version == 2 else 0
        body = struct.pack("!BBH4s", QUERY, code, 0, group_field)
    return build_packet(_with_checksum(body), src, dst), dst


def _with_checksum(body: bytes) -> bytes:
    return body[:2] + struct.pack("!H", inet_checksum(body)) + body[4:]


def build_packet(body: bytes, src: bytes, dst: bytes, ttl: int = 1,
                 router_alert: bool = True) -> bytes:
    """Wrap an IGMP message (checksum already set) in an IPv4 header."""
    return _ip_header(src, dst, len(body), ttl, router_alert) + body


def build_report(
    version: int,
    src: bytes,
    group: bytes | None = None,
    records: tuple[GroupRecord, ...] | list[GroupRecord] = (),
    dst: bytes | None = None,
) -> bytes:
    """A host's report as a whole IPv4 packet: v1/v2 for `group`, v3 with `records`.

    For tests, tools and replays; the router itself only sends queries.
    """
    if version == 3:
        body = _with_checksum(codec_common.records_body(FAMILY, records))
        return build_packet(body, src, dst or ALL_V3_ROUTERS)
    assert group is not None
    kind = V1_REPORT if version == 1 else V2_REPORT
    body = _with_checksum(struct.pack("!BBH4s", kind, 0, 0, group))
    return build_packet(body, src, dst or group, router_alert=version != 1)


def build_leave(src: bytes, group: bytes, dst: bytes = ALL_ROUTERS) -> bytes:
    """An IGMPv2 Leave Group as a whole IPv4 packet."""
    body = _with_checksum(struct.pack("!BBH4s", V2_LEAVE, 0, 0, group))
    return build_packet(body, src, dst)
