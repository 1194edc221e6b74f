"""Property tests: no input escapes as an exception from the parsers, `mcmw decode`'s
reading or the querier, and the emitted forwarding changes always add up to the
querier's forwarding state (IGMP and MLD)."""

from __future__ import annotations

import struct

import pytest
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
from mcmw.decode import Decoder, membership
from tests.igmp_kit import FAMILIES, Fam, ip

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
    fields = Decoder().ip(pkt, q.family)  # `mcmw decode`'s reading of the same packet
    assert fields.get("malformed") or "drop" in fields or fields.get("protocol") not in ("igmp", "mld")
    if len(pkt) >= (20 if q.family == 4 else 40):
        membership(pkt, q.family)  # decode's membership reading, salvage included
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

GROUPS = [0, 1]  # the kit's group, and a second one
SOURCES = ["S1", "S2", "S3", "S4"]

event = st.one_of(
    st.tuples(st.just("v3"), st.integers(1, 6), st.sampled_from(GROUPS),
              st.lists(st.sampled_from(SOURCES), max_size=4, unique=True)),
    st.tuples(st.just("old"), st.sampled_from([1, 2]), st.sampled_from(GROUPS), st.just([])),
    st.tuples(st.just("leave"), st.just(0), st.sampled_from(GROUPS), st.just([])),
    st.tuples(st.just("query"), st.sampled_from([0, 1]), st.sampled_from(GROUPS),
              st.lists(st.sampled_from(SOURCES), max_size=2, unique=True)),
)


def _group(fam: Fam, index: int) -> bytes:
    return fam.group if index == 0 else fam.group[:-1] + bytes((fam.group[-1] + 1,))


def _packet(fam: Fam, kind: str, n: int, index: int, sources: list[str]) -> bytes:
    group = _group(fam, index)
    if kind == "v3":
        return fam.record(n, *sources, group=group)
    if kind == "old":  # IGMPv1/v2; MLD has only v1
        return fam.old_report(min(n, fam.older), group)
    if kind == "leave":
        return fam.leave(group)
    # A query from a higher address (we stay querier) or a lower one (we step down).
    return fam.query(fam.higher if n else fam.lower, group, sources)


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(st.floats(0, 150), event), max_size=40),
       lmqc=st.integers(1, 3))
@pytest.mark.parametrize("fam", FAMILIES)
def test_changes_add_up_to_forwarding_state(fam: Fam, steps: list, lmqc: int) -> None:
    q = Querier(fam.family, QuerierParams(version=fam.newest, last_member_query_count=lmqc),
                fam.router, 0.0)
    codec = fam.codec
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
                assert codec.validate(codec.parse(a.packet)) is None

    now = 0.0
    apply(q.start(now))
    for delta, (kind, n, group, sources) in steps:
        end = now + delta
        while (t := q.next_deadline()) is not None and t <= end:
            assert t >= now
            now = t
            apply(q.expire(now))
        now = end
        apply(q.handle(_packet(fam, kind, n, group, sources), now))
        assert view == {c.group: (c.mode, c.sources) for c in q.forwarding()}
        for g in q.table.groups.values():
            assert g.mode == EXCLUDE or (g.sources and None not in g.sources.values())
    stop = now + 2000
    while (t := q.next_deadline()) is not None and t <= stop:
        apply(q.expire(t))
    assert not q.drops
    # With no reports, everything ages out.
    assert view == {} and q.table.groups == {}
