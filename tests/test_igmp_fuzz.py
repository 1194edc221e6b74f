"""Property tests: no input escapes as an exception, and the emitted forwarding
changes always add up to the querier's forwarding state."""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from igmp import codec_igmp, codec_mld
from igmp.actions import MembershipChange, SendQuery
from igmp.checksum import inet_checksum
from igmp.errors import Malformed
from igmp.messages import GroupRecord
from igmp.params import QuerierParams
from igmp.querier import Querier
from igmp.state import EXCLUDE, INCLUDE


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


R4, H4, G4 = ip("10.0.0.5"), ip("10.0.0.7"), ip("239.1.1.1")
R6, H6, G6 = ip("fe80::5"), ip("fe80::7"), ip("ff0e::1")

SEEDS4 = [
    codec_igmp.build_report(3, H4, records=[GroupRecord(t, G4, (ip("192.0.2.1"),))
                                            for t in range(1, 7)]),
    codec_igmp.build_report(2, H4, G4),
    codec_igmp.build_report(1, H4, G4),
    codec_igmp.build_leave(H4, G4),
    codec_igmp.build_query(3, ip("10.0.0.1"), G4, [ip("192.0.2.1")])[0],
    codec_igmp.build_query(2, ip("10.0.0.1"))[0],
]
SEEDS6 = [
    codec_mld.build_report(2, H6, records=[GroupRecord(t, G6, (ip("2001:db8::1"),))
                                           for t in range(1, 7)]),
    codec_mld.build_report(1, H6, G6),
    codec_mld.build_done(H6, G6),
    codec_mld.build_query(2, ip("fe80::1"), G6, [ip("2001:db8::1")])[0],
    codec_mld.build_query(1, ip("fe80::1"))[0],
]


def fix_checksums(pkt: bytearray) -> bytearray:
    """Make the checksums right again, so mutations reach the deeper parsers."""
    if len(pkt) >= 20 and pkt[0] >> 4 == 4:
        ihl = (pkt[0] & 0xF) * 4
        if 20 <= ihl <= len(pkt):
            pkt[10:12] = b"\0\0"
            pkt[10:12] = struct.pack("!H", inet_checksum(bytes(pkt[:ihl])))
            total = struct.unpack_from("!H", pkt, 2)[0]
            if ihl + 4 <= total <= len(pkt):
                pkt[ihl + 2:ihl + 4] = b"\0\0"
                pkt[ihl + 2:ihl + 4] = struct.pack("!H", inet_checksum(bytes(pkt[ihl:total])))
    elif len(pkt) >= 52 and pkt[0] >> 4 == 6 and pkt[6] == 0:
        off = 40 + (pkt[41] + 1) * 8
        end = 40 + struct.unpack_from("!H", pkt, 4)[0]
        if off + 4 <= end <= len(pkt):
            pkt[off + 2:off + 4] = b"\0\0"
            pseudo = bytes(pkt[8:40]) + struct.pack("!I3xB", end - off, 58)
            pkt[off + 2:off + 4] = struct.pack("!H", inet_checksum(pseudo + bytes(pkt[off:end])))
    return pkt


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    pkt = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["flip", "set", "cut", "extend"]))
        if kind in ("flip", "set") and pkt:
            i = draw(st.integers(0, len(pkt) - 1))
            pkt[i] = pkt[i] ^ (1 << draw(st.integers(0, 7))) if kind == "flip" else \
                draw(st.integers(0, 255))
        elif kind == "cut" and pkt:
            del pkt[draw(st.integers(0, len(pkt) - 1)):]
        else:
            pkt += draw(st.binary(max_size=40))
    if draw(st.booleans()):
        pkt = fix_checksums(pkt)
    return bytes(pkt)


def _check(q: Querier, codec: object, pkt: bytes) -> None:
    try:
        codec.parse(pkt)  # type: ignore[attr-defined]
    except Malformed:
        pass
    q.handle(pkt, 1.0)
    q.expire(5.0)
    q.snapshot(5.0)
    assert q.drops["internal_error"] == 0


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(pkt=st.one_of(st.binary(max_size=200), mutated(SEEDS4)))
def test_igmp_never_raises(pkt: bytes) -> None:
    q = Querier(4, QuerierParams(), R4, 0.0)
    q.start(0.0)
    _check(q, codec_igmp, pkt)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(pkt=st.one_of(st.binary(max_size=200), mutated(SEEDS6)))
def test_mld_never_raises(pkt: bytes) -> None:
    q = Querier(6, QuerierParams(version=2), R6, 0.0)
    q.start(0.0)
    _check(q, codec_mld, pkt)


# -- state machine ---------------------------------------------------------------

GROUPS = [ip("239.1.1.1"), ip("239.1.1.2")]
SOURCES = [ip(f"192.0.2.{i}") for i in range(1, 5)]

event = st.one_of(
    st.tuples(st.just("v3"), st.integers(1, 6), st.sampled_from(GROUPS),
              st.lists(st.sampled_from(SOURCES), max_size=4, unique=True)),
    st.tuples(st.just("v2"), st.sampled_from([1, 2]), st.sampled_from(GROUPS), st.just([])),
    st.tuples(st.just("leave"), st.just(0), st.sampled_from(GROUPS), st.just([])),
    st.tuples(st.just("query"), st.sampled_from([0, 1]), st.sampled_from(GROUPS),
              st.lists(st.sampled_from(SOURCES), max_size=2, unique=True)),
)


def _packet(kind: str, n: int, group: bytes, sources: list[bytes]) -> bytes:
    if kind == "v3":
        return codec_igmp.build_report(3, H4, records=[GroupRecord(n, group, tuple(sources))])
    if kind == "v2":
        return codec_igmp.build_report(n, H4, group)
    if kind == "leave":
        return codec_igmp.build_leave(H4, group)
    # A query from a higher address (we stay querier) or a lower one (we step down).
    src = ip("10.0.0.9") if n else ip("10.0.0.1")
    return codec_igmp.build_query(3, src, group, sources, 1.0)[0]


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.tuples(st.floats(0, 150), event), max_size=40),
       lmqc=st.integers(1, 3))
def test_changes_add_up_to_forwarding_state(steps: list, lmqc: int) -> None:
    q = Querier(4, QuerierParams(last_member_query_count=lmqc), R4, 0.0)
    view: dict[bytes, tuple[str, frozenset[bytes]]] = {}

    def apply(actions: list) -> None:
        for a in actions:
            if isinstance(a, MembershipChange):
                assert a.mode in (INCLUDE, EXCLUDE)
                assert view.get(a.group, (INCLUDE, frozenset())) != (a.mode, a.sources)
                if a.mode == INCLUDE and not a.sources:
                    view.pop(a.group, None)
                else:
                    view[a.group] = (a.mode, a.sources)
            else:
                assert isinstance(a, SendQuery) and len(a.packet) <= 1500
                codec_igmp.parse(a.packet)

    now = 0.0
    apply(q.start(now))
    for delta, (kind, n, group, sources) in steps:
        end = now + delta
        while (t := q.next_deadline()) is not None and t <= end:
            assert t >= now
            now = t
            apply(q.expire(now))
        now = end
        apply(q.handle(_packet(kind, n, group, sources), now))
        assert view == {c.group: (c.mode, c.sources) for c in q.forwarding()}
        for g in q.table.groups.values():
            assert g.mode == EXCLUDE or (g.sources and None not in g.sources.values())
    stop = now + 2000
    while (t := q.next_deadline()) is not None and t <= stop:
        apply(q.expire(t))
    assert not q.drops["internal_error"]
    # With no reports, everything ages out.
    assert view == {} and q.table.groups == {}
