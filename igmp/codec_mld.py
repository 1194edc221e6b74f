"""MLDv1/v2 inside IPv6: parse whole packets, build queries (RFC 2710, RFC 3810)."""

from __future__ import annotations

import struct

from igmp import codec_common, fpcode
from igmp.checksum import inet_checksum
from igmp.errors import Malformed
from igmp.messages import GroupRecord, Message

ALL_NODES = bytes.fromhex("ff020000000000000000000000000001")
ALL_ROUTERS = bytes.fromhex("ff020000000000000000000000000002")
ALL_MLDV2_ROUTERS = bytes.fromhex("ff020000000000000000000000000016")
ANY = bytes(16)

QUERY = 130
V1_REPORT = 131
V1_DONE = 132
V2_REPORT = 143

ICMPV6 = 58
HOP_BY_HOP = 0
# Hop-by-hop header: next header ICMPv6, length 0 (8 bytes), Router Alert value 0
# (MLD, RFC 2711), then a 2-byte PadN.
HBH_ROUTER_ALERT = bytes((ICMPV6, 0, 5, 2, 0, 0, 1, 0))
HEADERS_LEN = 40 + len(HBH_ROUTER_ALERT)


def is_multicast(addr: bytes) -> bool:
    return len(addr) == 16 and addr[0] == 0xFF


def is_link_local(addr: bytes) -> bool:
    return len(addr) == 16 and addr[0] == 0xFE and addr[1] & 0xC0 == 0x80


def reportable(group: bytes) -> bool:
    """RFC 3810 6: no messages for scopes 0 and 1, nor for ff02::1 (all nodes)."""
    return is_multicast(group) and (group[1] & 0x0F) > 1 and group != ALL_NODES


FAMILY = codec_common.Family(
    addr_len=16,
    any=ANY,
    all_systems=ALL_NODES,
    all_routers=ALL_ROUTERS,
    report_routers=ALL_MLDV2_ROUTERS,
    query_type=QUERY,
    report_type=V2_REPORT,
    record_version=2,
    is_multicast=is_multicast,
    reportable=reportable,
)


def _icmp6_checksum(src: bytes, dst: bytes, data: bytes) -> int:
    pseudo = src + dst + struct.pack("!I3xB", len(data), ICMPV6)
    return inet_checksum(pseudo + data)


def _hop_by_hop_alert(ext: bytes) -> bool:
    """True if the hop-by-hop options hold a Router Alert with value 0 (MLD)."""
    i = 2
    while i < len(ext):
        kind = ext[i]
        if kind == 0:  # Pad1
            i += 1
            continue
        if i + 1 >= len(ext):
            return False
        length = ext[i + 1]
        if kind == 5 and length == 2 and i + 4 <= len(ext):
            return ext[i + 2:i + 4] == b"\x00\x00"
        i += 2 + length
    return False


def parse(packet: bytes) -> Message:
    """Parse an IPv6 packet carrying MLD; raise Malformed with a reason otherwise."""
    if len(packet) < 40:
        raise Malformed("truncated", "shorter than an IPv6 header")
    if packet[0] >> 4 != 6:
        raise Malformed("bad_header", f"IP version {packet[0] >> 4}")
    plen, nh, hlim = struct.unpack_from("!HBB", packet, 4)
    if 40 + plen > len(packet):
        raise Malformed("truncated", f"payload length {plen}, have {len(packet) - 40}")
    src, dst = bytes(packet[8:24]), bytes(packet[24:40])
    end = 40 + plen
    offset = 40
    alert = False
    first = True
    while nh != ICMPV6:
        if nh == 44:
            raise Malformed("fragment", "IPv6 fragment")
        if nh not in (HOP_BY_HOP, 43, 60) or (nh == HOP_BY_HOP and not first):
            raise Malformed("unknown_type", f"next header {nh}")
        if offset + 8 > end:
            raise Malformed("truncated", "extension header")
        length = (packet[offset + 1] + 1) * 8
        if offset + length > end:
            raise Malformed("truncated", "extension header")
        if nh == HOP_BY_HOP:
            alert = _hop_by_hop_alert(bytes(packet[offset:offset + length]))
        nh = packet[offset]
        offset += length
        first = False
    return parse_mld(bytes(packet[offset:end]), src, dst, hlim, alert)


def parse_mld(data: bytes, src: bytes, dst: bytes, hlim: int, alert: bool) -> Message:
    """Parse the ICMPv6 message `data`, checking its checksum over the pseudo-header."""
    base = {"family": 6, "src": src, "dst": dst, "ttl": hlim, "router_alert": alert}
    if len(data) < 4:
        raise Malformed("truncated", f"ICMPv6 length {len(data)}")
    kind = data[0]
    msg: Message
    if kind == QUERY:
        msg = _parse_query(data, base)
    elif kind in (V1_REPORT, V1_DONE):
        if len(data) < 24:
            raise Malformed("truncated", f"MLDv1 length {len(data)}")
        mtype = "done" if kind == V1_DONE else "report"
        msg = Message(version=1, type=mtype, raw_type=kind, group=bytes(data[8:24]), **base)
    elif kind == V2_REPORT:
        if len(data) < 8:
            raise Malformed("truncated", f"MLDv2 report length {len(data)}")
        msg = codec_common.parse_records(FAMILY, data, base)
    else:
        partial = Message(version=0, type="unknown", raw_type=kind, **base)
        raise Malformed("unknown_type", f"ICMPv6 type {kind}", partial)
    if _icmp6_checksum(src, dst, data) != 0:
        raise Malformed("checksum", "ICMPv6", msg)
    return msg


def _parse_query(data: bytes, base: dict) -> Message:
    if len(data) < 24:
        raise Malformed("truncated", f"query length {len(data)}")
    (code,) = struct.unpack_from("!H", data, 4)
    group = bytes(data[8:24])
    if len(data) == 24:
        return Message(version=1, type="query", raw_type=QUERY, group=group,
                       max_resp_s=code / 1000, **base)
    if len(data) < 28:
        # RFC 3810 8.1: queries of other lengths must be ignored.
        partial = Message(version=0, type="query", raw_type=QUERY, group=group, **base)
        raise Malformed("truncated", f"query length {len(data)}", partial)
    return codec_common.parse_source_query(FAMILY, data, 24, group, fpcode.decode16(code) / 1000, base)


def validate(msg: Message, own: bytes | None = None) -> str | None:
    """Router acceptance checks of RFC 3810 5.1.14 / 5.2.13; drop reason or None."""
    if not is_link_local(msg.src):
        return "bad_source"  # includes :: (reports sent during DAD are ignored)
    if msg.ttl != 1:
        return "bad_ttl"
    if not msg.router_alert:
        return "no_router_alert"
    return codec_common.check_addresses(FAMILY, msg, own)


def max_sources(mtu: int = 1500) -> int:
    """How many sources fit in one MLDv2 query of at most `mtu` bytes."""
    return max(1, (mtu - HEADERS_LEN - 28) // 16)


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
    """A complete IPv6 query packet and its destination (ff02::1, or the group)."""
    group_field, dst = codec_common.query_destination(FAMILY, group)
    ms = int(max_resp_s * 1000 + 1e-6)
    if version >= 2:
        body = struct.pack("!BBHHH16sBBH", QUERY, 0, 0, fpcode.encode16(ms), 0, group_field,
                           codec_common.query_flags(s_flag, qrv), fpcode.encode8(int(qqi_s + 1e-6)),
                           len(sources))
        body += b"".join(sources)
    else:
        body = struct.pack("!BBHHH16s", QUERY, 0, 0, min(ms, 0xFFFF), 0, group_field)
    return build_packet(body, src, dst), dst


def build_packet(body: bytes, src: bytes, dst: bytes, hop_limit: int = 1,
                 router_alert: bool = True) -> bytes:
    """Set the ICMPv6 checksum of MLD message `body` and wrap it in IPv6 (+ hop-by-hop)."""
    body = body[:2] + struct.pack("!H", _icmp6_checksum(src, dst, body)) + body[4:]
    ext = HBH_ROUTER_ALERT if router_alert else b""
    head = struct.pack("!IHBB16s16s", 6 << 28, len(ext) + len(body),
                       HOP_BY_HOP if router_alert else ICMPV6, hop_limit, src, dst)
    return head + ext + body


def build_report(
    version: int,
    src: bytes,
    group: bytes | None = None,
    records: tuple[GroupRecord, ...] | list[GroupRecord] = (),
    dst: bytes | None = None,
) -> bytes:
    """A listener's report as a whole IPv6 packet: v1 for `group`, v2 with `records`.

    For tests, tools and replays; the router itself only sends queries.
    """
    if version == 2:
        return build_packet(codec_common.records_body(FAMILY, records), src, dst or ALL_MLDV2_ROUTERS)
    assert group is not None
    body = struct.pack("!BBHHH16s", V1_REPORT, 0, 0, 0, 0, group)
    return build_packet(body, src, dst or group)


def build_done(src: bytes, group: bytes, dst: bytes = ALL_ROUTERS) -> bytes:
    """An MLDv1 Done as a whole IPv6 packet."""
    body = struct.pack("!BBHHH16s", V1_DONE, 0, 0, 0, 0, group)
    return build_packet(body, src, dst)
