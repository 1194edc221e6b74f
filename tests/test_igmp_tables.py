"""One test per row of the RFC 3376 6.4.1 (current state) and 6.4.2 (state change)
tables, plus the filter-mode switch of 6.5 and the query rules of 6.6.3.

Defaults: GMI 260 s, LMQT 2 s, LMQI 1 s. State is built at t=0, the record applied at
t=10, so "GMI" reads 270 and an untouched timer 260; a lowered timer reads 12.
"""

from __future__ import annotations

import ipaddress

import pytest

from igmp import codec_igmp
from igmp.actions import MembershipChange, SendQuery
from igmp.messages import (
    ALLOW_NEW_SOURCES,
    BLOCK_OLD_SOURCES,
    CHANGE_TO_EXCLUDE_MODE,
    CHANGE_TO_INCLUDE_MODE,
    MODE_IS_EXCLUDE,
    MODE_IS_INCLUDE,
    GroupRecord,
)
from igmp.params import QuerierParams
from igmp.querier import Querier


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


ROUTER, HOST = ip("10.0.0.1"), ip("10.0.0.2")
G = ip("239.1.1.1")
S1, S2, S3, S4, S5 = (ip(f"192.0.2.{i}") for i in range(1, 6))
T = 10.0  # when the record under test arrives


def report(rtype: int, *sources: bytes, group: bytes = G) -> bytes:
    return codec_igmp.build_report(3, HOST, records=[GroupRecord(rtype, group, sources)])


def include(*a: bytes, params: QuerierParams | None = None) -> Querier:
    """A querier whose G is INCLUDE(A), every timer at 260."""
    q = Querier(4, params or QuerierParams(), ROUTER, 0.0)
    q.start(0.0)
    q.handle(report(MODE_IS_INCLUDE, *a), 0.0)
    return q


def exclude(x: tuple[bytes, ...], y: tuple[bytes, ...]) -> Querier:
    """A querier whose G is EXCLUDE(X, Y): X timers and the group timer at 260."""
    q = Querier(4, QuerierParams(), ROUTER, 0.0)
    q.start(0.0)
    q.handle(report(MODE_IS_EXCLUDE, *y), 0.0)
    q.handle(report(ALLOW_NEW_SOURCES, *x), 0.0)
    assert state(q) == ("exclude", 260.0, {**dict.fromkeys(x, 260.0), **dict.fromkeys(y)})
    return q


def state(q: Querier) -> tuple[str, float | None, dict[bytes, float | None]] | None:
    g = q.table.groups.get(G)
    if g is None:
        return None
    return g.mode, g.timer, dict(g.sources)


def sent(actions: list) -> list[tuple[tuple[bytes, ...], bool]]:
    """(sources, s_flag) of each query sent for G."""
    out = []
    for a in actions:
        if isinstance(a, SendQuery):
            m = codec_igmp.parse(a.packet)
            assert m.group == G and a.destination == G
            out.append((m.sources, m.s_flag))
    return out


def changed(actions: list) -> list[MembershipChange]:
    return [a for a in actions if isinstance(a, MembershipChange)]


# -- RFC 3376 6.4.1: current-state records ----------------------------------------


def test_641_include_is_in() -> None:
    # INCLUDE (A) + IS_IN (B) -> INCLUDE (A+B); (B)=GMI
    q = include(S1, S2)
    out = q.handle(report(MODE_IS_INCLUDE, S2, S3), T)
    assert state(q) == ("include", None, {S1: 260.0, S2: 270.0, S3: 270.0})
    assert changed(out) == [MembershipChange(G, "include", frozenset({S1, S2, S3}))]
    assert sent(out) == []


def test_641_include_is_ex() -> None:
    # INCLUDE (A) + IS_EX (B) -> EXCLUDE (A*B, B-A); (B-A)=0; Delete (A-B); GT=GMI
    q = include(S1, S2)
    out = q.handle(report(MODE_IS_EXCLUDE, S2, S3), T)
    assert state(q) == ("exclude", 270.0, {S2: 260.0, S3: None})
    assert changed(out) == [MembershipChange(G, "exclude", frozenset({S3}))]
    assert sent(out) == []


def test_641_exclude_is_in() -> None:
    # EXCLUDE (X,Y) + IS_IN (A) -> EXCLUDE (X+A, Y-A); (A)=GMI
    q = exclude((S1,), (S2, S3))
    out = q.handle(report(MODE_IS_INCLUDE, S2, S4), T)
    assert state(q) == ("exclude", 260.0, {S1: 260.0, S2: 270.0, S3: None, S4: 270.0})
    assert changed(out) == [MembershipChange(G, "exclude", frozenset({S3}))]
    assert sent(out) == []


def test_641_exclude_is_ex() -> None:
    # EXCLUDE (X,Y) + IS_EX (A) -> EXCLUDE (A-Y, Y*A); (A-X-Y)=GMI;
    # Delete (X-A); Delete (Y-A); GT=GMI
    q = exclude((S1, S2), (S3, S4))
    out = q.handle(report(MODE_IS_EXCLUDE, S2, S3, S5), T)
    assert state(q) == ("exclude", 270.0, {S2: 260.0, S3: None, S5: 270.0})
    assert changed(out) == [MembershipChange(G, "exclude", frozenset({S3}))]
    assert sent(out) == []


# -- RFC 3376 6.4.2: state-change records -------------------------------------------


def test_642_include_allow() -> None:
    # INCLUDE (A) + ALLOW (B) -> INCLUDE (A+B); (B)=GMI
    q = include(S1, S2)
    out = q.handle(report(ALLOW_NEW_SOURCES, S2, S3), T)
    assert state(q) == ("include", None, {S1: 260.0, S2: 270.0, S3: 270.0})
    assert sent(out) == []


def test_642_include_block() -> None:
    # INCLUDE (A) + BLOCK (B) -> INCLUDE (A); Send Q(G,A*B)
    q = include(S1, S2)
    out = q.handle(report(BLOCK_OLD_SOURCES, S2, S3), T)
    assert state(q) == ("include", None, {S1: 260.0, S2: 12.0})
    assert sent(out) == [((S2,), False)]
    assert changed(out) == []


def test_642_include_to_ex() -> None:
    # INCLUDE (A) + TO_EX (B) -> EXCLUDE (A*B, B-A); (B-A)=0; Delete (A-B);
    # Send Q(G,A*B); GT=GMI
    q = include(S1, S2)
    out = q.handle(report(CHANGE_TO_EXCLUDE_MODE, S2, S3), T)
    assert state(q) == ("exclude", 270.0, {S2: 12.0, S3: None})
    assert sent(out) == [((S2,), False)]
    assert changed(out) == [MembershipChange(G, "exclude", frozenset({S3}))]


def test_642_include_to_in() -> None:
    # INCLUDE (A) + TO_IN (B) -> INCLUDE (A+B); (B)=GMI; Send Q(G,A-B)
    q = include(S1, S2)
    out = q.handle(report(CHANGE_TO_INCLUDE_MODE, S2, S3), T)
    assert state(q) == ("include", None, {S1: 12.0, S2: 270.0, S3: 270.0})
    assert sent(out) == [((S1,), False)]


def test_642_exclude_allow() -> None:
    # EXCLUDE (X,Y) + ALLOW (A) -> EXCLUDE (X+A, Y-A); (A)=GMI
    q = exclude((S1,), (S2, S3))
    out = q.handle(report(ALLOW_NEW_SOURCES, S2, S4), T)
    assert state(q) == ("exclude", 260.0, {S1: 260.0, S2: 270.0, S3: None, S4: 270.0})
    assert changed(out) == [MembershipChange(G, "exclude", frozenset({S3}))]
    assert sent(out) == []


def test_642_exclude_block() -> None:
    # EXCLUDE (X,Y) + BLOCK (A) -> EXCLUDE (X+(A-Y), Y); (A-X-Y)=Group Timer;
    # Send Q(G,A-Y)
    q = exclude((S1, S3), (S2,))
    out = q.handle(report(BLOCK_OLD_SOURCES, S1, S2, S5), T)
    # S5 took the group timer (260), then S1 and S5 were lowered to LMQT by Q(G,A-Y).
    assert state(q) == ("exclude", 260.0, {S1: 12.0, S3: 260.0, S2: None, S5: 12.0})
    assert sent(out) == [((S1, S5), False)]
    assert changed(out) == []


def test_642_exclude_to_ex() -> None:
    # EXCLUDE (X,Y) + TO_EX (A) -> EXCLUDE (A-Y, Y*A); (A-X-Y)=Group Timer;
    # Delete (X-A); Delete (Y-A); Send Q(G,A-Y); GT=GMI
    q = exclude((S1, S2), (S3, S4))
    out = q.handle(report(CHANGE_TO_EXCLUDE_MODE, S2, S3, S5), T)
    assert state(q) == ("exclude", 270.0, {S2: 12.0, S3: None, S5: 12.0})
    assert sent(out) == [((S2, S5), False)]
    assert changed(out) == [MembershipChange(G, "exclude", frozenset({S3}))]


def test_642_exclude_to_in() -> None:
    # EXCLUDE (X,Y) + TO_IN (A) -> EXCLUDE (X+A, Y-A); (A)=GMI; Send Q(G,X-A); Send Q(G)
    q = exclude((S1, S2), (S3, S4))
    out = q.handle(report(CHANGE_TO_INCLUDE_MODE, S2, S3), T)
    assert state(q) == ("exclude", 12.0, {S1: 12.0, S2: 270.0, S3: 270.0, S4: None})
    assert sorted(sent(out)) == [((), False), ((S1,), False)]
    assert changed(out) == [MembershipChange(G, "exclude", frozenset({S4}))]
    # 6.5: when the lowered group timer runs out, G switches to INCLUDE with the
    # sources whose timers still run (S1 expired with it).
    out = q.expire(12.0)
    assert state(q) == ("include", None, {S2: 270.0, S3: 270.0})
    assert changed(out) == [MembershipChange(G, "include", frozenset({S2, S3}))]


# -- timers, 6.3 and 6.5 ------------------------------------------------------------


def test_exclude_source_timer_expiry_blocks_source() -> None:
    q = exclude((S1,), ())
    q.handle(report(MODE_IS_EXCLUDE, S1), 200.0)  # group timer to 460, S1 stays 260
    out = q.expire(260.0)
    assert state(q) == ("exclude", 460.0, {S1: None})
    assert changed(out) == [MembershipChange(G, "exclude", frozenset({S1}))]


def test_group_timer_expiry_with_no_running_sources_deletes_group() -> None:
    q = exclude((), (S1,))
    out = q.expire(260.0)
    assert state(q) is None
    assert changed(out) == [MembershipChange(G, "include", frozenset())]


# -- 6.6.3 query retransmission ---------------------------------------------------


def test_source_query_retransmission_and_s_flag_split() -> None:
    q = include(S1, S2)
    out = q.handle(report(BLOCK_OLD_SOURCES, S1, S2), T)
    assert sent(out) == [((S1, S2), False)]
    q.handle(report(ALLOW_NEW_SOURCES, S1), T + 0.5)  # S1 back to GMI, above LMQT
    out = q.expire(T + 1)
    # RFC 3376 6.6.3.2: S set for sources with timers above LMQT, clear for the rest.
    assert sent(out) == [((S1,), True), ((S2,), False)]
    assert q.expire(T + 2) == [MembershipChange(G, "include", frozenset({S1}))]
    assert state(q) == ("include", None, {S1: T + 0.5 + 260})


def test_group_query_retransmissions_follow_lmqc() -> None:
    p = QuerierParams(last_member_query_count=4, last_member_query_interval=0.5)
    q = Querier(4, p, ROUTER, 0.0)
    q.start(0.0)
    q.handle(report(CHANGE_TO_EXCLUDE_MODE), 0.0)
    times = [T]
    out = q.handle(report(CHANGE_TO_INCLUDE_MODE), T)
    assert sent(out) == [((), False)]
    while (t := q.next_deadline()) is not None and t < 100:
        out = q.expire(t)
        if sent(out):
            times.append(t)
        if changed(out):
            assert changed(out) == [MembershipChange(G, "include", frozenset())]
            assert t == pytest.approx(T + 2.0)  # LMQT = 4 * 0.5
            break
    assert times == [T, T + 0.5, T + 1.0, T + 1.5]


@pytest.mark.parametrize("family,count,per_packet", [(4, 400, 366), (6, 150, 89)])
def test_source_queries_split_to_fit_mtu(family: int, count: int, per_packet: int) -> None:
    p = QuerierParams(version=3 if family == 4 else 2, max_sources=1000)
    if family == 4:
        sources = [ip("10.1.0.0")[:2] + i.to_bytes(2, "big") for i in range(count)]
        rep = codec_igmp.build_report
        q = Querier(4, p, ROUTER, 0.0)
        mk = lambda t, s: rep(3, HOST, records=[GroupRecord(t, G, tuple(s))])  # noqa: E731
    else:
        from igmp import codec_mld

        g6 = ip("ff0e::1")
        sources = [ip("2001:db8::")[:14] + i.to_bytes(2, "big") for i in range(count)]
        q = Querier(6, p, ip("fe80::1"), 0.0)
        mk = lambda t, s: codec_mld.build_report(  # noqa: E731
            2, ip("fe80::2"), records=[GroupRecord(t, g6, tuple(s))])
    q.start(0.0)
    q.handle(mk(MODE_IS_INCLUDE, sources), 0.0)
    out = [a for a in q.handle(mk(BLOCK_OLD_SOURCES, sources), 1.0) if isinstance(a, SendQuery)]
    assert len(out) == 2
    assert all(len(a.packet) <= 1500 for a in out)
    parse = codec_igmp.parse if family == 4 else __import__("igmp.codec_mld").codec_mld.parse
    msgs = [parse(a.packet) for a in out]
    assert [len(m.sources) for m in msgs] == [per_packet, count - per_packet]
    assert [s for m in msgs for s in m.sources] == sources
