"""MLDv1/MLDv2 through the shared state machine (RFC 2710, RFC 3810)."""

from __future__ import annotations

import pytest

from igmp import codec_mld
from igmp.actions import MembershipChange
from igmp.params import QuerierParams
from igmp.querier import Querier
from tests.igmp_kit import BLOCK, IS_IN, MLD, TO_EX, TO_IN, GroupRecord, changes, ip, queries

ROUTER, HOST, G = MLD.router, MLD.host, MLD.group
S1, S2 = MLD.sources[:2]


def v2(rtype: int, *sources: bytes, src: bytes = HOST, group: bytes = G) -> bytes:
    return codec_mld.build_report(2, src, records=[GroupRecord(rtype, group, sources)])


def started(version: int = 2) -> Querier:
    return MLD.querier(version=version)


def test_general_query_mldv2() -> None:
    q = Querier(6, QuerierParams(version=2), ROUTER, 0.0)
    (a,) = q.start(0.0)
    assert a.destination == codec_mld.ALL_NODES
    m = codec_mld.parse(a.packet)
    assert (m.version, m.group, m.max_resp_s, m.qrv, m.qqi_s, m.src) == (
        2, bytes(16), 10.0, 2, 125.0, ROUTER)
    assert codec_mld.validate(m) is None
    assert a.packet[7] == 1  # hop limit


def test_general_query_mldv1_is_24_bytes() -> None:
    (a,) = Querier(6, QuerierParams(version=1), ROUTER, 0.0).start(0.0)
    assert len(a.packet) == 40 + 8 + 24
    assert codec_mld.parse(a.packet).version == 1


def test_mldv2_join_source_filter_and_leave() -> None:
    q = started()
    out = q.handle(v2(IS_IN, S1, S2), 0.0)
    assert changes(out) == [MembershipChange(G, "include", frozenset({S1, S2}))]
    (gss,) = queries(q.handle(v2(BLOCK, S1), 1.0))
    assert (gss.group, gss.sources, gss.max_resp_s) == (G, (S1,), 1.0)
    q.expire(2.0)
    assert q.expire(3.0) == [MembershipChange(G, "include", frozenset({S2}))]
    assert q.counters["mld_v2_report"] == 2


def test_mldv1_report_and_done() -> None:
    q = started()
    out = q.handle(codec_mld.build_report(1, HOST, G), 0.0)
    assert changes(out) == [MembershipChange(G, "exclude", frozenset())]
    assert q.snapshot(0.0)[0]["compat_version"] == 1
    assert q.snapshot(0.0)[0]["group"] == "ff0e::1:2"
    # MLDv1 compatibility: source lists of TO_EX are ignored (RFC 3810 8.3.2).
    q.handle(v2(TO_EX, S1), 0.5)
    assert q.forwarding() == [MembershipChange(G, "exclude", frozenset())]
    (gsq,) = queries(q.handle(codec_mld.build_done(HOST, G), 1.0))
    assert (gsq.version, gsq.group, gsq.dst) == (2, G, G)
    q.expire(2.0)
    assert q.expire(3.0) == [MembershipChange(G, "include", frozenset())]
    assert q.counters["mld_v1_report"] == 1 and q.counters["mld_v1_done"] == 1


def test_mldv1_querier() -> None:
    q = started(version=1)
    q.handle(codec_mld.build_report(1, HOST, G), 0.0)
    (gsq,) = queries(q.handle(codec_mld.build_done(HOST, G), 1.0))
    assert (gsq.version, gsq.max_resp_s) == (1, 1.0)


@pytest.mark.parametrize("src", ["2001:db8::20", "::", "ff02::1"])
def test_report_from_non_link_local_source_dropped(src: str) -> None:
    q = started()
    assert q.handle(v2(TO_EX, src=ip(src)), 0.0) == []
    assert q.drops["bad_source"] == 1


def test_report_without_router_alert_or_with_hop_limit_dropped() -> None:
    q = started()
    body = v2(TO_EX)[48:]
    body = body[:2] + b"\0\0" + body[4:]
    assert q.handle(codec_mld.build_packet(body, HOST, codec_mld.ALL_MLDV2_ROUTERS,
                                           router_alert=False), 0.0) == []
    assert q.handle(codec_mld.build_packet(body, HOST, codec_mld.ALL_MLDV2_ROUTERS,
                                           hop_limit=255), 0.0) == []
    assert q.drops["no_router_alert"] == 1 and q.drops["bad_ttl"] == 1


def test_bad_checksum_and_wrong_destination() -> None:
    q = started()
    pkt = bytearray(v2(TO_EX))
    pkt[-1] ^= 1
    assert q.handle(bytes(pkt), 0.0) == []
    assert q.handle(codec_mld.build_done(HOST, G, dst=codec_mld.ALL_NODES), 0.0) == []
    assert q.handle(v2(TO_EX)[:60], 0.0) == []
    assert q.drops["checksum"] == 1
    assert q.drops["bad_destination"] == 1
    assert q.drops["truncated"] == 1


def test_unreportable_groups_ignored() -> None:
    q = started()
    for g in ("ff01::1", "ff02::1", "ff00::5"):
        assert q.handle(v2(TO_EX, group=ip(g)), 0.0) == []
    assert q.drops["bad_group"] == 3


def test_election_by_lowest_link_local() -> None:
    q = started()
    pkt, _ = codec_mld.build_query(2, ip("fe80::1"))
    q.handle(pkt, 0.0)
    assert not q.is_querier and q.status(0.0)["querier"] == "fe80::1"
    q.handle(v2(TO_EX), 1.0)
    assert queries(q.handle(v2(TO_IN), 2.0)) == []


def test_scapy_built_mld_reports_parse() -> None:
    from scapy.layers.inet6 import (
        ICMPv6MLDMultAddrRec,
        ICMPv6MLReport,
        ICMPv6MLReport2,
        IPv6,
        IPv6ExtHdrHopByHop,
        RouterAlert,
    )

    rep = IPv6(src="fe80::20", dst="ff02::16", hlim=1) / \
        IPv6ExtHdrHopByHop(options=[RouterAlert()]) / \
        ICMPv6MLReport2(records=[ICMPv6MLDMultAddrRec(rtype=1, dst="ff0e::1:2",
                                                      sources=["2001:db8::1"])])
    q = started()
    assert changes(q.handle(bytes(rep), 0.0)) == [MembershipChange(G, "include", frozenset({S1}))]
    v1 = IPv6(src="fe80::20", dst="ff0e::7", hlim=1) / \
        IPv6ExtHdrHopByHop(options=[RouterAlert()]) / ICMPv6MLReport(mladdr="ff0e::7")
    assert changes(q.handle(bytes(v1), 0.0)) == [
        MembershipChange(ip("ff0e::7"), "exclude", frozenset())]
