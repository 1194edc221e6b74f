"""Older-version compatibility (RFC 3376 7.3, RFC 3810 8.3), querier election (6.6.2,
RFC 3810 7.6.2) and limits; what both families share runs for both."""

from __future__ import annotations

import pytest

from igmp.actions import MembershipChange
from igmp.params import QuerierParams
from igmp.querier import Querier
from tests.igmp_kit import (
    ALLOW,
    BLOCK,
    IGMP,
    IS_EX,
    IS_IN,
    S1,
    TO_EX,
    TO_IN,
    Fam,
    GroupRecord,
    both_families,
    fwd,
    ip,
    queries,
    text,
)

# -- 7.3.2 group compatibility mode ---------------------------------------------


@both_families
def test_older_host_present_ignores_source_lists_and_block(fam: Fam) -> None:
    # IGMPv2 host on an IGMPv3 querier; MLDv1 host on an MLDv2 querier.
    q = fam.querier()
    g = fam.group
    q.handle(fam.old_report(), 0.0)
    assert q.snapshot(0.0)[0]["compat_version"] == fam.older
    q.handle(fam.record(TO_EX, S1), 1.0)
    assert fwd(q) == {g: ("exclude", frozenset())}  # TO_EX(S1) read as TO_EX({})
    q.handle(fam.record(IS_EX, S1), 2.0)
    assert fwd(q) == {g: ("exclude", frozenset())}
    assert queries(q.handle(fam.record(BLOCK, S1), 3.0)) == []


@both_families
def test_older_host_timer_expires_back_to_the_newest_version(fam: Fam) -> None:
    q = fam.querier()
    q.handle(fam.old_report(), 0.0)
    q.handle(fam.record(IS_EX), 200.0)  # keeps the group alive past the older host timer
    q.expire(260.0)
    assert q.snapshot(260.0)[0]["compat_version"] == fam.newest
    # Source lists count again: S1 is queried (Q(G,A-Y)) and blocked once nobody
    # asks for it within LMQT.
    (gss,) = queries(q.handle(fam.record(TO_EX, S1), 261.0))
    assert gss.sources == (fam.src(S1),)
    q.expire(262.0)
    assert q.expire(263.0) == [MembershipChange(fam.group, "exclude", frozenset({fam.src(S1)}))]


def test_v1_host_present_ignores_leave_and_reports_v1_until_timer_expires() -> None:
    q, g = IGMP.querier(), IGMP.group
    q.handle(IGMP.old_report(1), 0.0)
    q.handle(IGMP.old_report(2), 100.0)
    assert q.snapshot(100.0)[0]["compat_version"] == 1
    assert q.handle(IGMP.leave(), 101.0) == []
    q.expire(260.0)  # v1 host timer out; the v2 one runs until 360
    assert q.snapshot(260.0)[0]["compat_version"] == 2
    out = q.handle(IGMP.leave(), 261.0)
    assert [m.group for m in queries(out)] == [g]


@both_families
def test_older_querier_sends_older_queries_and_ignores_source_lists(fam: Fam) -> None:
    # An IGMPv2 / MLDv1 querier (RFC 3376 7.3.1: configured to the oldest version).
    q = Querier(fam.family, QuerierParams(version=fam.older), fam.router, 0.0)
    (general,) = queries(q.start(0.0))
    assert general.version == fam.older
    q.handle(fam.record(TO_EX, S1), 0.0)
    assert fwd(q) == {fam.group: ("exclude", frozenset())}
    assert q.snapshot(0.0)[0]["compat_version"] == fam.older
    (gsq,) = queries(q.handle(fam.leave(), 1.0))
    assert (gsq.version, gsq.group, gsq.max_resp_s) == (fam.older, fam.group, 1.0)


def test_v1_querier_ignores_leaves_and_sends_no_group_queries() -> None:
    q = Querier(4, QuerierParams(version=1), IGMP.router, 0.0)
    (general,) = queries(q.start(0.0))
    assert general.version == 1
    q.handle(IGMP.old_report(2), 0.0)
    assert q.handle(IGMP.leave(), 1.0) == []
    assert queries(q.handle(IGMP.record(TO_IN), 2.0)) == []
    assert fwd(q) == {IGMP.group: ("exclude", frozenset())}


# -- 6.6.2 querier election ----------------------------------------------------------


@both_families
def test_lower_address_takes_over_and_we_resume_after_other_querier_present(fam: Fam) -> None:
    q = fam.querier()
    assert q.handle(fam.query(fam.lower), 10.0) == []
    assert not q.is_querier and q.status(10.0)["querier"] == text(fam.lower)
    # No general queries while another querier is present: OQPI = 2*125 + 10/2 = 255.
    assert q.next_deadline() == 265.0
    out = q.expire(265.0)
    assert q.is_querier and q.status(265.0)["querier"] == text(fam.router)
    (general,) = queries(out)
    assert general.group == bytes(len(fam.group))
    assert q.next_deadline() == 390.0


@both_families
def test_higher_address_and_unspecified_do_not_win(fam: Fam) -> None:
    q = fam.querier()
    q.handle(fam.query(fam.higher), 1.0)
    assert q.is_querier
    if fam.family == 4:  # MLD drops a query from :: (not link-local) before the election
        q.handle(fam.query(bytes(4)), 1.0)
        assert q.is_querier
    assert q.counters[f"{fam.name}_v{fam.newest}_query"] == (2 if fam.family == 4 else 1)


@both_families
def test_non_querier_adopts_qrv_and_qqi(fam: Fam) -> None:
    q = fam.querier()
    q.handle(fam.query(fam.lower, qrv=3, qqi=60.0), 0.0)
    assert (q.params.robustness, q.params.query_interval) == (3, 60.0)
    assert q.next_deadline() == 3 * 60 + 5
    q.expire(185.0)
    assert (q.params.robustness, q.params.query_interval) == (2, 125.0)


@both_families
def test_non_querier_does_not_query_but_lowers_timers_on_querier_queries(fam: Fam) -> None:
    q, g = fam.querier(), fam.group
    q.handle(fam.old_report(), 0.0)
    q.handle(fam.query(fam.lower), 1.0)
    assert q.handle(fam.leave(), 5.0) == []
    assert q.snapshot(5.0)[0]["group_timer_s"] == 255.0  # untouched
    # The querier's group-specific query with S set changes nothing; with S clear
    # it lowers the group timer to LMQT (RFC 3376 6.6.1).
    assert q.handle(fam.query(fam.lower, group=g, s_flag=True), 5.0) == []
    assert q.snapshot(5.0)[0]["group_timer_s"] == 255.0
    assert q.handle(fam.query(fam.lower, group=g), 5.0) == []
    assert q.expire(7.0) == [MembershipChange(g, "include", frozenset())]


@both_families
def test_non_querier_lowers_source_timers_on_group_and_source_query(fam: Fam) -> None:
    q = fam.querier()
    q.handle(fam.record(IS_IN, S1, "S2"), 0.0)
    q.handle(fam.query(fam.lower, group=fam.group, sources=(S1,)), 1.0)
    assert q.expire(3.0) == [MembershipChange(fam.group, "include", frozenset({fam.src("S2")}))]


@both_families
def test_becoming_non_querier_cancels_pending_retransmissions(fam: Fam) -> None:
    q = fam.querier()
    q.handle(fam.record(ALLOW, S1), 0.0)
    assert len(queries(q.handle(fam.record(BLOCK, S1), 1.0))) == 1
    q.handle(fam.query(fam.lower), 1.5)
    assert queries(q.expire(2.0)) == []


# -- limits ------------------------------------------------------------------------------


@both_families
def test_max_groups(fam: Fam) -> None:
    q = fam.querier(max_groups=2)
    for i in range(3):
        group = ip(f"239.0.0.{i + 1}") if fam.family == 4 else ip(f"ff0e::{i + 1}")
        q.handle(fam.old_report(group=group), 0.0)
    assert len(q.snapshot(0.0)) == 2
    assert q.drops["over_limit"] == 1


@both_families
def test_max_sources(fam: Fam) -> None:
    q, g = fam.querier(max_sources=2), fam.group
    q.handle(fam.record(IS_IN, S1, "S2", "S3"), 0.0)
    assert fwd(q) == {g: ("include", frozenset({fam.src(S1), fam.src("S2")}))}
    q.handle(fam.record(TO_EX, "S3", "S4", "S5"), 1.0)
    assert len(fwd(q)[g][1]) <= 2
    assert q.drops["over_limit"] == 2


@pytest.mark.parametrize("groups,sources", [(64, 16), (8, 300)])
def test_memory_stays_bounded_under_a_flood(groups: int, sources: int) -> None:
    """A host that reports ever new groups and sources, for ever (RFC 3376 has no limit):
    the table holds at most max_groups groups of at most max_sources sources, the timer
    heap stays proportional to them, and what is refused is counted."""
    q = IGMP.querier(max_groups=groups, max_sources=sources)
    now = 0.0
    for i in range(3000):
        now += 0.01
        group = ip("239.0.0.0")[:2] + (i % 5000).to_bytes(2, "big")
        fresh = tuple(ip("10.0.0.0")[:1] + (i * 7 + k).to_bytes(3, "big") for k in range(7))
        rtype = (IS_IN, ALLOW, TO_EX, IS_EX, BLOCK, TO_IN)[i % 6]
        records = [GroupRecord(rtype, group, fresh), GroupRecord(ALLOW, IGMP.group, fresh)]
        report = IGMP.codec.build_report(3, IGMP.host, records=records)
        q.handle(report, now)
        q.expire(now)
        table = q.table
        assert len(table.groups) <= groups
        assert all(len(g.sources) <= sources for g in table.groups.values())
        assert len(table._timers) <= groups and len(table._timers._heap) <= 2 * groups + 65
        assert not table._before and not table._queries  # per-input scratch, emptied
    assert q.drops["over_limit"] > 0 and q.drops["internal_error"] == 0
    assert set(q.counters) == {"igmp_v3_report"}


@both_families
def test_stop_withdraws_everything(fam: Fam) -> None:
    q = fam.querier()
    q.handle(fam.old_report(), 0.0)
    assert q.stop(1.0) == [MembershipChange(fam.group, "include", frozenset())]
    assert q.snapshot(1.0) == [] and q.next_deadline() is None
