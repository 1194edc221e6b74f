"""What IGMPv3 (RFC 3376 4) and MLDv2 (RFC 3810 5) share on the wire, written once.

The two protocols lay out source-specific queries and group records the same way and
differ only in address width and where the fields start; the acceptance rules for
destinations and groups (RFC 3376 4.2.14, RFC 3810 5) also have one shape. Each codec
describes its family with a `Family` and calls these with it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from igmp import fpcode
from igmp.errors import Malformed
from igmp.messages import GroupRecord, Message

COUNTS = struct.Struct("!BBH")  # flags, QQIC, number of sources / type, aux len, sources
REPORT_HEAD = struct.Struct("!BBHHH")  # type, reserved, checksum, reserved, records


@dataclass(frozen=True)
class Family:
    """The numbers and addresses that tell IGMP from MLD where their formats agree."""

    addr_len: int  # 4 or 16
    any: bytes  # the unspecified address: a general query's group field
    all_systems: bytes  # 224.0.0.1 / ff02::1: where general queries go
    all_routers: bytes  # 224.0.0.2 / ff02::2: where v2 leaves / MLDv1 dones go
    report_routers: bytes  # 224.0.0.22 / ff02::16: where v3 / MLDv2 reports go
    query_type: int
    report_type: int  # IGMPv3 / MLDv2 report
    record_version: int  # the version whose reports carry records: 3 / 2
    is_multicast: Callable[[bytes], bool]
    reportable: Callable[[bytes], bool]  # a group a host may report (not 224.0.0.1, ff02::1, ...)
    record: struct.Struct = field(init=False)  # type, aux len, number of sources, group

    def __post_init__(self) -> None:
        object.__setattr__(self, "record", struct.Struct(f"!BBH{self.addr_len}s"))


def split_addresses(data: bytes, start: int, count: int, width: int) -> tuple[bytes, ...]:
    return tuple(bytes(data[i : i + width]) for i in range(start, start + width * count, width))


# -- parsing ---------------------------------------------------------------------------


def parse_source_query(
    fam: Family, data: bytes, at: int, group: bytes, max_resp_s: float, base: dict[str, Any]
) -> Message:
    """The IGMPv3 / MLDv2 query whose flags byte is at `at`: S, QRV, QQIC and sources."""
    flags, qqic, count = COUNTS.unpack_from(data, at)
    start = at + COUNTS.size
    if start + fam.addr_len * count > len(data):
        partial = Message(version=0, type="query", raw_type=fam.query_type, group=group, **base)
        raise Malformed("truncated", f"query with {count} sources in {len(data)} bytes", partial)
    return Message(
        version=fam.record_version, type="query", raw_type=fam.query_type, group=group,
        max_resp_s=max_resp_s, s_flag=bool(flags & 0x08), qrv=flags & 0x07, qqic=qqic,
        qqi_s=float(fpcode.decode8(qqic)), sources=split_addresses(data, start, count, fam.addr_len),
        **base,
    )


def parse_records(fam: Family, data: bytes, base: dict[str, Any]) -> Message:
    """An IGMPv3 / MLDv2 report (`data` at least 8 bytes): its group records, every
    count checked against the bytes there are."""
    (count,) = struct.unpack_from("!H", data, 6)
    records: list[GroupRecord] = []
    offset, size = 8, len(data)
    width, record = fam.addr_len, fam.record
    head = record.size
    for _ in range(count):
        if offset + head > size:
            raise Malformed("truncated", f"record {len(records) + 1} of {count}",
                            _report(fam, records, base))
        rtype, aux, nsrc, group = record.unpack_from(data, offset)
        first = offset + head
        end = first + width * nsrc + 4 * aux
        if end > size:
            raise Malformed("truncated", f"record {len(records) + 1} sources",
                            _report(fam, records, base))
        records.append(GroupRecord(rtype, group, split_addresses(data, first, nsrc, width), aux))
        offset = end
    return _report(fam, records, base)


def _report(fam: Family, records: list[GroupRecord], base: dict[str, Any]) -> Message:
    return Message(version=fam.record_version, type="report", raw_type=fam.report_type,
                   records=tuple(records), **base)


def check_addresses(fam: Family, msg: Message, own: bytes | None) -> str | None:
    """The group and destination a message may have (RFC 3376 4.2.14, RFC 3810 5);
    the drop reason, or None. Reports sent unicast to the router (`own`) are accepted."""
    group = msg.group or fam.any
    if msg.type == "query":
        if group != fam.any and not fam.is_multicast(group):
            return "bad_group"
        if msg.dst != fam.all_systems and msg.dst != group:
            return "bad_destination"
        return None
    if msg.type == "report" and msg.version == fam.record_version:
        if msg.dst != fam.report_routers and msg.dst != own:
            return "bad_destination"
        return None
    if not fam.reportable(group):
        return "bad_group"
    if msg.type in ("leave", "done"):
        # RFC 2236 3: leaves go to all-routers; some hosts send them to the group.
        if msg.dst != fam.all_routers and msg.dst != group:
            return "bad_destination"
        return None
    if msg.dst != group and msg.dst != own:
        return "bad_destination"  # v1/v2 and MLDv1 reports go to the group they report
    return None


# -- building --------------------------------------------------------------------------


def query_flags(s_flag: bool, qrv: int) -> int:
    """The S|QRV byte: a robustness above 7 does not fit and is sent as 0 (RFC 3376 4.1.6)."""
    return (0x08 if s_flag else 0) | (qrv if 0 < qrv <= 7 else 0)


def query_destination(fam: Family, group: bytes | None) -> tuple[bytes, bytes]:
    """(group field, IP destination) of a query: general ones go to all systems."""
    return (group, group) if group else (fam.any, fam.all_systems)


def records_body(fam: Family, records: Sequence[GroupRecord]) -> bytes:
    """An IGMPv3 / MLDv2 report message with its checksum field zero."""
    body = REPORT_HEAD.pack(fam.report_type, 0, 0, 0, len(records))
    for r in records:
        body += fam.record.pack(r.type, r.aux_len, len(r.sources), r.group)
        body += b"".join(r.sources) + bytes(4 * r.aux_len)
    return body
