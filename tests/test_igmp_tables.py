"""One test per row of the RFC 3376 6.4.1 (current state) and 6.4.2 (state change)
tables, plus the filter-mode switch of 6.5 and the query rules of 6.6.3; every test runs
for IGMPv3 and for MLDv2 (RFC 3810 7.4.1, 7.4.2: the same rows) through the one state
machine.

Defaults: GMI 260 s, LMQT 2 s, LMQI 1 s. State is built at t=0, the record applied at
t=10, so "GMI" reads 270 and an untouched timer 260; a lowered timer reads 12.
"""

from __future__ import annotations

import pytest

from igmp.actions import Action, SendQuery
from igmp.params import QuerierParams
from igmp.querier import Querier
from tests.igmp_kit import (
    ALLOW,
    BLOCK,
    FAMILIES,
    IS_EX,
    IS_IN,
    S1,
    S2,
    S3,
    S4,
    S5,
    TO_EX,
    TO_IN,
    Fam,
    GroupRecord,
    changes,
    ip,
    queries,
)

pytestmark = pytest.mark.parametrize("fam", FAMILIES)
T = 10.0  # when the record under test arrives


def include(fam: Fam, *a: str, params: QuerierParams | None = None) -> Querier:
    """A querier whose group is INCLUDE(A), every timer at 260."""
    q = fam.querier(params)
    q.handle(fam.record(IS_IN, *a), 0.0)
    return q


def exclude(fam: Fam, x: tuple[str, ...], y: tuple[str, ...]) -> Querier:
    """A querier whose group is EXCLUDE(X, Y): X timers and the group timer at 260."""
    q = fam.querier()
    q.handle(fam.record(IS_EX, *y), 0.0)
    q.handle(fam.record(ALLOW, *x), 0.0)
    assert state(fam, q) == ("exclude", 260.0, {**dict.fromkeys(x, 260.0), **dict.fromkeys(y)})
    return q


def state(fam: Fam, q: Querier) -> tuple[str, float | None, dict[str, float | None]] | None:
    """The group's filter mode, group timer and source timers (None: excluded, Y)."""
    g = q.table.groups.get(fam.group)
    if g is None:
        return None
    return g.mode, g.timer, {fam.symbol(s): t for s, t in g.sources.items()}


def sent(fam: Fam, actions: list[Action]) -> list[tuple[tuple[str, ...], bool]]:
    """(sources, s_flag) of each query sent, all of them for the group and to it."""
    out = []
    for m in queries(actions):
        assert m.group == fam.group and m.dst == fam.group
        out.append((tuple(fam.symbol(s) for s in m.sources), bool(m.s_flag)))
    return out


def changed(fam: Fam, actions: list[Action]) -> list[tuple[str, frozenset[str]]]:
    """The forwarding changes (RFC 3376 6.3), all of them for the group."""
    assert all(c.group == fam.group for c in changes(actions))
    return [(c.mode, fam.symbols(c.sources)) for c in changes(actions)]


# -- RFC 3376 6.4.1: current-state records ----------------------------------------


def test_641_include_is_in(fam: Fam) -> None:
    # INCLUDE (A) + IS_IN (B) -> INCLUDE (A+B); (B)=GMI
    q = include(fam, S1, S2)
    out = q.handle(fam.record(IS_IN, S2, S3), T)
    assert state(fam, q) == ("include", None, {S1: 260.0, S2: 270.0, S3: 270.0})
    assert changed(fam, out) == [("include", {S1, S2, S3})]
    assert sent(fam, out) == []


def test_641_include_is_ex(fam: Fam) -> None:
    # INCLUDE (A) + IS_EX (B) -> EXCLUDE (A*B, B-A); (B-A)=0; Delete (A-B); GT=GMI
    q = include(fam, S1, S2)
    out = q.handle(fam.record(IS_EX, S2, S3), T)
    assert state(fam, q) == ("exclude", 270.0, {S2: 260.0, S3: None})
    assert changed(fam, out) == [("exclude", {S3})]
    assert sent(fam, out) == []


def test_641_exclude_is_in(fam: Fam) -> None:
    # EXCLUDE (X,Y) + IS_IN (A) -> EXCLUDE (X+A, Y-A); (A)=GMI
    q = exclude(fam, (S1,), (S2, S3))
    out = q.handle(fam.record(IS_IN, S2, S4), T)
    assert state(fam, q) == ("exclude", 260.0, {S1: 260.0, S2: 270.0, S3: None, S4: 270.0})
    assert changed(fam, out) == [("exclude", {S3})]
    assert sent(fam, out) == []


def test_641_exclude_is_ex(fam: Fam) -> None:
    # EXCLUDE (X,Y) + IS_EX (A) -> EXCLUDE (A-Y, Y*A); (A-X-Y)=GMI;
    # Delete (X-A); Delete (Y-A); GT=GMI
    q = exclude(fam, (S1, S2), (S3, S4))
    out = q.handle(fam.record(IS_EX, S2, S3, S5), T)
    assert state(fam, q) == ("exclude", 270.0, {S2: 260.0, S3: None, S5: 270.0})
    assert changed(fam, out) == [("exclude", {S3})]
    assert sent(fam, out) == []


# -- RFC 3376 6.4.2: state-change records -------------------------------------------


def test_642_include_allow(fam: Fam) -> None:
    # INCLUDE (A) + ALLOW (B) -> INCLUDE (A+B); (B)=GMI
    q = include(fam, S1, S2)
    out = q.handle(fam.record(ALLOW, S2, S3), T)
    assert state(fam, q) == ("include", None, {S1: 260.0, S2: 270.0, S3: 270.0})
    assert changed(fam, out) == [("include", {S1, S2, S3})]
    assert sent(fam, out) == []


def test_642_include_block(fam: Fam) -> None:
    # INCLUDE (A) + BLOCK (B) -> INCLUDE (A); Send Q(G,A*B)
    q = include(fam, S1, S2)
    out = q.handle(fam.record(BLOCK, S2, S3), T)
    assert state(fam, q) == ("include", None, {S1: 260.0, S2: 12.0})
    assert sent(fam, out) == [((S2,), False)]
    assert changed(fam, out) == []


def test_642_include_to_ex(fam: Fam) -> None:
    # INCLUDE (A) + TO_EX (B) -> EXCLUDE (A*B, B-A); (B-A)=0; Delete (A-B);
    # Send Q(G,A*B); GT=GMI
    q = include(fam, S1, S2)
    out = q.handle(fam.record(TO_EX, S2, S3), T)
    assert state(fam, q) == ("exclude", 270.0, {S2: 12.0, S3: None})
    assert sent(fam, out) == [((S2,), False)]
    assert changed(fam, out) == [("exclude", {S3})]


def test_642_include_to_in(fam: Fam) -> None:
    # INCLUDE (A) + TO_IN (B) -> INCLUDE (A+B); (B)=GMI; Send Q(G,A-B)
    q = include(fam, S1, S2)
    out = q.handle(fam.record(TO_IN, S2, S3), T)
    assert state(fam, q) == ("include", None, {S1: 12.0, S2: 270.0, S3: 270.0})
    assert sent(fam, out) == [((S1,), False)]
    assert changed(fam, out) == [("include", {S1, S2, S3})]


def test_642_exclude_allow(fam: Fam) -> None:
    # EXCLUDE (X,Y) + ALLOW (A) -> EXCLUDE (X+A, Y-A); (A)=GMI
    q = exclude(fam, (S1,), (S2, S3))
    out = q.handle(fam.record(ALLOW, S2, S4), T)
    assert state(fam, q) == ("exclude", 260.0, {S1: 260.0, S2: 270.0, S3: None, S4: 270.0})
    assert changed(fam, out) == [("exclude", {S3})]
    assert sent(fam, out) == []


def test_642_exclude_block(fam: Fam) -> None:
    # EXCLUDE (X,Y) + BLOCK (A) -> EXCLUDE (X+(A-Y), Y); (A-X-Y)=Group Timer;
    # Send Q(G,A-Y)
    q = exclude(fam, (S1, S3), (S2,))
    out = q.handle(fam.record(BLOCK, S1, S2, S5), T)
    # S5 took the group timer (260), then S1 and S5 were lowered to LMQT by Q(G,A-Y).
    assert state(fam, q) == ("exclude", 260.0, {S1: 12.0, S3: 260.0, S2: None, S5: 12.0})
    assert sent(fam, out) == [((S1, S5), False)]
    assert changed(fam, out) == []


def test_642_exclude_to_ex(fam: Fam) -> None:
    # EXCLUDE (X,Y) + TO_EX (A) -> EXCLUDE (A-Y, Y*A); (A-X-Y)=Group Timer;
    # Delete (X-A); Delete (Y-A); Send Q(G,A-Y); GT=GMI
    q = exclude(fam, (S1, S2), (S3, S4))
    out = q.handle(fam.record(TO_EX, S2, S3, S5), T)
    assert state(fam, q) == ("exclude", 270.0, {S2: 12.0, S3: None, S5: 12.0})
    assert sent(fam, out) == [((S2, S5), False)]
    assert changed(fam, out) == [("exclude", {S3})]


def test_642_exclude_to_in(fam: Fam) -> None:
    # EXCLUDE (X,Y) + TO_IN (A) -> EXCLUDE (X+A, Y-A); (A)=GMI; Send Q(G,X-A); Send Q(G)
    q = exclude(fam, (S1, S2), (S3, S4))
    out = q.handle(fam.record(TO_IN, S2, S3), T)
    assert state(fam, q) == ("exclude", 12.0, {S1: 12.0, S2: 270.0, S3: 270.0, S4: None})
    assert sorted(sent(fam, out)) == [((), False), ((S1,), False)]
    assert changed(fam, out) == [("exclude", {S4})]
    # 6.5: when the lowered group timer runs out, the group switches to INCLUDE with the
    # sources whose timers still run (S1 expired with it).
    out = q.expire(12.0)
    assert state(fam, q) == ("include", None, {S2: 270.0, S3: 270.0})
    assert changed(fam, out) == [("include", {S2, S3})]


def test_642_exclude_to_in_queries_x_minus_a_in_table_order(fam: Fam) -> None:
    # The sources of Q(G,X-A) come in the order the table holds them, whatever
    # PYTHONHASHSEED is, so that replays of one capture give the same bytes.
    q = exclude(fam, (S5, S1, S4, S2), (S3,))
    assert sent(fam, q.handle(fam.record(TO_IN), T)) == [((), False), ((S5, S1, S4, S2), False)]


# -- timers, 6.3 and 6.5 ------------------------------------------------------------


def test_exclude_source_timer_expiry_blocks_source(fam: Fam) -> None:
    q = exclude(fam, (S1,), ())
    q.handle(fam.record(IS_EX, S1), 200.0)  # group timer to 460, S1 stays 260
    out = q.expire(260.0)
    assert state(fam, q) == ("exclude", 460.0, {S1: None})
    assert changed(fam, out) == [("exclude", {S1})]


def test_group_timer_expiry_with_no_running_sources_deletes_group(fam: Fam) -> None:
    q = exclude(fam, (), (S1,))
    out = q.expire(260.0)
    assert state(fam, q) is None
    assert changed(fam, out) == [("include", set())]


# -- 6.6.3 query retransmission ---------------------------------------------------


def test_source_query_retransmission_and_s_flag_split(fam: Fam) -> None:
    q = include(fam, S1, S2)
    out = q.handle(fam.record(BLOCK, S1, S2), T)
    assert sent(fam, out) == [((S1, S2), False)]
    q.handle(fam.record(ALLOW, S1), T + 0.5)  # S1 back to GMI, above LMQT
    out = q.expire(T + 1)
    # RFC 3376 6.6.3.2: S set for sources with timers above LMQT, clear for the rest.
    assert sent(fam, out) == [((S1,), True), ((S2,), False)]
    assert changed(fam, q.expire(T + 2)) == [("include", {S1})]
    assert state(fam, q) == ("include", None, {S1: T + 0.5 + 260})


def test_group_query_retransmissions_follow_lmqc(fam: Fam) -> None:
    q = fam.querier(last_member_query_count=4, last_member_query_interval=0.5)
    q.handle(fam.record(TO_EX), 0.0)
    times = [T]
    assert sent(fam, q.handle(fam.record(TO_IN), T)) == [((), False)]
    while (t := q.next_deadline()) is not None and t < 100:
        out = q.expire(t)
        if sent(fam, out):
            times.append(t)
        if changes(out):
            assert changed(fam, out) == [("include", set())]
            assert t == pytest.approx(T + 2.0)  # LMQT = 4 * 0.5
            break
    assert times == [T, T + 0.5, T + 1.0, T + 1.5]


def test_source_queries_split_to_fit_mtu(fam: Fam) -> None:
    # 400 IPv4 sources: 366 fit in 1500 bytes; 150 IPv6 sources: 89 do.
    count, per_packet = (400, 366) if fam.family == 4 else (150, 89)
    prefix = ip("10.1.0.0")[:2] if fam.family == 4 else ip("2001:db8::")[:14]
    sources = tuple(prefix + i.to_bytes(2, "big") for i in range(count))
    q = fam.querier(max_sources=1000)

    def report(rtype: int) -> bytes:
        return fam.codec.build_report(fam.newest, fam.host, records=[GroupRecord(rtype, fam.group, sources)])

    q.handle(report(IS_IN), 0.0)
    out = [a for a in q.handle(report(BLOCK), 1.0) if isinstance(a, SendQuery)]
    assert all(len(a.packet) <= 1500 for a in out)
    msgs = queries(out)
    assert [len(m.sources) for m in msgs] == [per_packet, count - per_packet]
    assert tuple(s for m in msgs for s in m.sources) == sources
