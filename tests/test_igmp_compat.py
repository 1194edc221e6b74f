"""Older-version compatibility (RFC 3376 7.3), querier election (6.6.2) and limits."""

from __future__ import annotations

import ipaddress

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


ROUTER, HOST = ip("10.0.0.5"), ip("10.0.0.20")
LOWER, HIGHER = ip("10.0.0.3"), ip("10.0.0.9")
G = ip("239.1.1.1")
S1, S2 = ip("192.0.2.1"), ip("192.0.2.2")


def v3(rtype: int, *sources: bytes, group: bytes = G) -> bytes:
    return codec_igmp.build_report(3, HOST, records=[GroupRecord(rtype, group, sources)])


def started(**kw: object) -> Querier:
    q = Querier(4, QuerierParams(**kw), ROUTER, 0.0)  # type: ignore[arg-type]
    q.start(0.0)
    return q


def fwd(q: Querier) -> dict[bytes, tuple[str, frozenset[bytes]]]:
    return {c.group: (c.mode, c.sources) for c in q.forwarding()}


def queries(actions: list) -> list:
    return [codec_igmp.parse(a.packet) for a in actions if isinstance(a, SendQuery)]


def query_from(src: bytes, version: int = 3, group: bytes | None = None,
               sources: tuple[bytes, ...] = (), s_flag: bool = False, qrv: int = 2,
               qqi: float = 125.0) -> bytes:
    pkt, _ = codec_igmp.build_query(version, src, group, sources, 10.0 if group is None else 1.0,
                                    s_flag, qrv, qqi)
    return pkt


# -- 7.3.2 group compatibility mode ---------------------------------------------


def test_v2_host_present_ignores_source_lists_and_block() -> None:
    q = started()
    q.handle(codec_igmp.build_report(2, HOST, G), 0.0)
    assert q.snapshot(0.0)[0]["compat_version"] == 2
    q.handle(v3(CHANGE_TO_EXCLUDE_MODE, S1), 1.0)
    assert fwd(q) == {G: ("exclude", frozenset())}  # TO_EX(S1) read as TO_EX({})
    q.handle(v3(MODE_IS_EXCLUDE, S1), 2.0)
    assert fwd(q) == {G: ("exclude", frozenset())}
    assert queries(q.handle(v3(BLOCK_OLD_SOURCES, S1), 3.0)) == []


def test_v2_host_timer_expires_back_to_v3() -> None:
    q = started()
    q.handle(codec_igmp.build_report(2, HOST, G), 0.0)
    q.handle(v3(MODE_IS_EXCLUDE), 200.0)  # keeps G alive past the v2 host timer
    q.expire(260.0)
    assert q.snapshot(260.0)[0]["compat_version"] == 3
    # Source lists count again: S1 is queried (Q(G,A-Y)) and blocked once nobody
    # asks for it within LMQT.
    (gss,) = queries(q.handle(v3(CHANGE_TO_EXCLUDE_MODE, S1), 261.0))
    assert gss.sources == (S1,)
    q.expire(262.0)
    assert q.expire(263.0) == [MembershipChange(G, "exclude", frozenset({S1}))]


def test_v1_host_present_ignores_leave_and_reports_v1_until_timer_expires() -> None:
    q = started()
    q.handle(codec_igmp.build_report(1, HOST, G), 0.0)
    q.handle(codec_igmp.build_report(2, HOST, G), 100.0)
    assert q.snapshot(100.0)[0]["compat_version"] == 1
    assert q.handle(codec_igmp.build_leave(HOST, G), 101.0) == []
    q.expire(260.0)  # v1 host timer out; the v2 one runs until 360
    assert q.snapshot(260.0)[0]["compat_version"] == 2
    out = q.handle(codec_igmp.build_leave(HOST, G), 261.0)
    assert [m.group for m in queries(out)] == [G]


def test_v2_querier_sends_v2_queries_and_ignores_source_lists() -> None:
    q = Querier(4, QuerierParams(version=2), ROUTER, 0.0)
    (general,) = q.start(0.0)
    assert codec_igmp.parse(general.packet).version == 2
    q.handle(v3(CHANGE_TO_EXCLUDE_MODE, S1), 0.0)
    assert fwd(q) == {G: ("exclude", frozenset())}
    assert q.snapshot(0.0)[0]["compat_version"] == 2
    (gsq,) = queries(q.handle(codec_igmp.build_leave(HOST, G), 1.0))
    assert (gsq.version, gsq.group, gsq.max_resp_s) == (2, G, 1.0)


def test_v1_querier_ignores_leaves_and_sends_no_group_queries() -> None:
    q = Querier(4, QuerierParams(version=1), ROUTER, 0.0)
    (general,) = q.start(0.0)
    assert codec_igmp.parse(general.packet).version == 1
    q.handle(codec_igmp.build_report(2, HOST, G), 0.0)
    assert q.handle(codec_igmp.build_leave(HOST, G), 1.0) == []
    assert queries(q.handle(v3(CHANGE_TO_INCLUDE_MODE), 2.0)) == []
    assert fwd(q) == {G: ("exclude", frozenset())}


# -- 6.6.2 querier election ----------------------------------------------------------


def test_lower_address_takes_over_and_we_resume_after_other_querier_present() -> None:
    q = started()
    assert q.handle(query_from(LOWER), 10.0) == []
    assert not q.is_querier and q.status(10.0)["querier"] == "10.0.0.3"
    # No general queries while another querier is present: OQPI = 2*125 + 10/2 = 255.
    assert q.next_deadline() == 265.0
    out = q.expire(265.0)
    assert q.is_querier and q.status(265.0)["querier"] == "10.0.0.5"
    (general,) = queries(out)
    assert general.group == bytes(4)
    assert q.next_deadline() == 390.0


def test_higher_address_and_unspecified_do_not_win() -> None:
    q = started()
    q.handle(query_from(HIGHER), 1.0)
    q.handle(query_from(bytes(4)), 1.0)
    assert q.is_querier
    assert q.counters["igmp_v3_query"] == 2


def test_non_querier_adopts_qrv_and_qqi() -> None:
    q = started()
    q.handle(query_from(LOWER, qrv=3, qqi=60.0), 0.0)
    assert (q.params.robustness, q.params.query_interval) == (3, 60.0)
    assert q.next_deadline() == 3 * 60 + 5
    q.expire(185.0)
    assert (q.params.robustness, q.params.query_interval) == (2, 125.0)


def test_non_querier_does_not_query_but_lowers_timers_on_querier_queries() -> None:
    q = started()
    q.handle(codec_igmp.build_report(2, HOST, G), 0.0)
    q.handle(query_from(LOWER), 1.0)
    assert q.handle(codec_igmp.build_leave(HOST, G), 5.0) == []
    assert q.snapshot(5.0)[0]["group_timer_s"] == 255.0  # untouched
    # The querier's group-specific query with S set changes nothing; with S clear
    # it lowers the group timer to LMQT (RFC 3376 6.6.1).
    assert q.handle(query_from(LOWER, group=G, s_flag=True), 5.0) == []
    assert q.snapshot(5.0)[0]["group_timer_s"] == 255.0
    assert q.handle(query_from(LOWER, group=G), 5.0) == []
    assert q.expire(7.0) == [MembershipChange(G, "include", frozenset())]


def test_non_querier_lowers_source_timers_on_group_and_source_query() -> None:
    q = started()
    q.handle(v3(MODE_IS_INCLUDE, S1, S2), 0.0)
    q.handle(query_from(LOWER, group=G, sources=(S1,)), 1.0)
    assert q.expire(3.0) == [MembershipChange(G, "include", frozenset({S2}))]


def test_becoming_non_querier_cancels_pending_retransmissions() -> None:
    q = started()
    q.handle(v3(ALLOW_NEW_SOURCES, S1), 0.0)
    assert len(queries(q.handle(v3(BLOCK_OLD_SOURCES, S1), 1.0))) == 1
    q.handle(query_from(LOWER), 1.5)
    assert queries(q.expire(2.0)) == []


# -- limits ------------------------------------------------------------------------------


def test_max_groups() -> None:
    q = started(max_groups=2)
    for i in range(3):
        q.handle(codec_igmp.build_report(2, HOST, ip(f"239.0.0.{i + 1}")), 0.0)
    assert len(q.snapshot(0.0)) == 2
    assert q.drops["over_limit"] == 1


def test_max_sources() -> None:
    q = started(max_sources=2)
    q.handle(v3(MODE_IS_INCLUDE, S1, S2, ip("192.0.2.3")), 0.0)
    assert fwd(q) == {G: ("include", frozenset({S1, S2}))}
    q.handle(v3(CHANGE_TO_EXCLUDE_MODE, ip("192.0.2.7"), ip("192.0.2.8"), ip("192.0.2.9")), 1.0)
    assert len(fwd(q)[G][1]) <= 2
    assert q.drops["over_limit"] == 2


def test_stop_withdraws_everything() -> None:
    q = started()
    q.handle(codec_igmp.build_report(2, HOST, G), 0.0)
    assert q.stop(1.0) == [MembershipChange(G, "include", frozenset())]
    assert q.snapshot(1.0) == [] and q.next_deadline() is None
