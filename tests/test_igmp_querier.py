"""Querier behaviour on a virtual clock: startup and general queries, v1/v2/v3
reports and leaves, group-specific queries, expiry, checksums, wire encodings."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from igmp import codec_igmp, codec_mld, fpcode
from igmp.actions import MembershipChange, SendQuery
from igmp.params import QuerierParams
from igmp.querier import Querier
from mcmw.capture import write_pcap
from tap.ethernet import frame_for_ip
from tests.igmp_kit import (
    ALLOW,
    BLOCK,
    IGMP,
    IS_EX,
    IS_IN,
    MLD,
    TO_EX,
    TO_IN,
    GroupRecord,
    changes,
    ip,
    queries,
    run_until,
)
from tests.netlab import require_tools

ROUTER, HOST, G = IGMP.router, IGMP.host, IGMP.group
S1, S2 = IGMP.sources[:2]
P = QuerierParams(version=3)  # QI 125, QRI 10, RV 2, LMQI 1 -> GMI 260, LMQT 2


def v3(*records: tuple[int, bytes, tuple[bytes, ...]], src: bytes = HOST) -> bytes:
    return codec_igmp.build_report(3, src, records=[GroupRecord(t, g, s) for t, g, s in records])


def started(params: QuerierParams = P, now: float = 0.0) -> Querier:
    return IGMP.querier(params, now)


# -- general queries ---------------------------------------------------------


def test_startup_then_periodic_general_queries() -> None:
    q = Querier(4, P, ROUTER, 0.0)
    first = q.start(0.0)
    assert len(first) == 1 and first[0].destination == codec_igmp.ALL_SYSTEMS
    msg = codec_igmp.parse(first[0].packet)
    assert (msg.version, msg.group, msg.max_resp_s, msg.qrv, msg.qqi_s, msg.s_flag) == (
        3, bytes(4), 10.0, 2, 125.0, False)
    assert codec_igmp.validate(msg) is None
    times = [t for t, a in run_until(q, 600) if isinstance(a, SendQuery)]
    # Startup Query Count 2 at Startup Query Interval QI/4, then every QI.
    assert times == [31.25, 156.25, 281.25, 406.25, 531.25]


def test_startup_parameters_are_configurable() -> None:
    p = QuerierParams(version=3, query_interval=60, startup_query_interval=5,
                      startup_query_count=4)
    q = Querier(4, p, ROUTER, 100.0)
    q.start(100.0)
    times = [t for t, a in run_until(q, 250) if isinstance(a, SendQuery)]
    assert times == [105, 110, 115, 175, 235]


def test_late_expire_does_not_burst() -> None:
    q = started()
    out = q.expire(1000.0)
    assert len(queries(out)) == 1
    assert q.next_deadline() == pytest.approx(1125.0)


@pytest.mark.parametrize("version,length,code", [(1, 8, 0), (2, 8, 100), (3, 12, 100)])
def test_query_versions(version: int, length: int, code: int) -> None:
    q = Querier(4, QuerierParams(version=version), ROUTER, 0.0)
    (a,) = q.start(0.0)
    ihl = (a.packet[0] & 0xF) * 4
    assert len(a.packet) - ihl == length
    assert a.packet[ihl + 1] == code
    assert codec_igmp.parse(a.packet).version == version


# -- IGMPv2 ------------------------------------------------------------------


def test_v2_report_then_leave_sends_lmqc_group_queries_then_expires() -> None:
    q = started()
    out = q.handle(codec_igmp.build_report(2, HOST, G), 5.0)
    assert changes(out) == [MembershipChange(G, "exclude", frozenset())]
    assert q.counters["igmp_v2_report"] == 1
    assert q.snapshot(5.0)[0]["compat_version"] == 2
    # A second report changes nothing in forwarding terms.
    assert changes(q.handle(codec_igmp.build_report(2, HOST, G), 6.0)) == []

    out = q.handle(codec_igmp.build_leave(HOST, G), 10.0)
    (gsq,) = queries(out)
    assert (gsq.group, gsq.dst, gsq.max_resp_s, gsq.s_flag) == (G, G, 1.0, False)
    assert changes(out) == []
    events = run_until(q, 20.0)
    assert [(t, codec_igmp.parse(a.packet).group) for t, a in events
            if isinstance(a, SendQuery)] == [(11.0, G)]
    assert [(t, a) for t, a in events if isinstance(a, MembershipChange)] == [
        (12.0, MembershipChange(G, "include", frozenset()))]
    assert q.snapshot(20.0) == []


def test_report_after_leave_keeps_group_and_sets_s_flag() -> None:
    q = started()
    q.handle(codec_igmp.build_report(2, HOST, G), 1.0)
    q.handle(codec_igmp.build_leave(HOST, G), 10.0)
    q.handle(codec_igmp.build_report(2, ip("10.0.0.3"), G), 10.5)
    events = run_until(q, 30.0)
    (retx,) = [codec_igmp.parse(a.packet) for t, a in events if isinstance(a, SendQuery)]
    assert retx.s_flag is True  # group timer is back above LMQT
    assert changes([a for _, a in events]) == []
    assert q.snapshot(30.0)[0]["mode"] == "exclude"


def test_group_expires_after_gmi_without_reports() -> None:
    q = started()
    q.handle(codec_igmp.build_report(2, HOST, G), 0.0)
    events = run_until(q, 1000.0)
    gone = [t for t, a in events if isinstance(a, MembershipChange)]
    assert gone == [260.0]


def test_leave_to_other_destination_or_naming_other_group_is_ignored() -> None:
    q = started()
    q.handle(codec_igmp.build_report(2, HOST, G), 0.0)
    assert q.handle(codec_igmp.build_leave(HOST, G, dst=ip("224.0.0.1")), 1.0) == []
    assert q.handle(codec_igmp.build_leave(HOST, G, dst=ip("239.9.9.9")), 1.0) == []
    assert q.drops["bad_destination"] == 2
    assert q.snapshot(1.0)[0]["group_timer_s"] == 259.0


# -- IGMPv1 ------------------------------------------------------------------


def test_v1_report_and_leave_ignored_in_v1_compat() -> None:
    q = started()
    out = q.handle(codec_igmp.build_report(1, HOST, G), 0.0)
    assert changes(out) == [MembershipChange(G, "exclude", frozenset())]
    assert q.snapshot(0.0)[0]["compat_version"] == 1
    assert q.handle(codec_igmp.build_leave(HOST, G), 1.0) == []
    assert q.counters["igmp_v1_report"] == 1 and q.counters["igmp_v2_leave"] == 1


# -- IGMPv3 ------------------------------------------------------------------


def test_v3_to_ex_empty_then_to_in_empty() -> None:
    q = started()
    out = q.handle(v3((TO_EX, G, ())), 1.0)
    assert changes(out) == [MembershipChange(G, "exclude", frozenset())]
    assert q.snapshot(1.0)[0]["compat_version"] == 3
    out = q.handle(v3((TO_IN, G, ())), 2.0)
    assert [(m.group, m.sources) for m in queries(out)] == [(G, ())]
    events = run_until(q, 10.0)
    assert [t for t, a in events if isinstance(a, SendQuery)] == [3.0]
    assert [(t, a) for t, a in events if isinstance(a, MembershipChange)] == [
        (4.0, MembershipChange(G, "include", frozenset()))]


def test_v3_is_ex_empty_joins() -> None:
    q = started()
    out = q.handle(v3((IS_EX, G, ())), 1.0)
    assert changes(out) == [MembershipChange(G, "exclude", frozenset())]


def test_v3_include_sources_and_source_expiry() -> None:
    q = started()
    out = q.handle(v3((IS_IN, G, (S1,))), 0.0)
    assert changes(out) == [MembershipChange(G, "include", frozenset({S1}))]
    out = q.handle(v3((ALLOW, G, (S2,))), 100.0)
    assert changes(out) == [MembershipChange(G, "include", frozenset({S1, S2}))]
    events = run_until(q, 1000.0)
    assert [(t, a) for t, a in events if isinstance(a, MembershipChange)] == [
        (260.0, MembershipChange(G, "include", frozenset({S2}))),
        (360.0, MembershipChange(G, "include", frozenset())),
    ]


def test_v3_block_sends_group_and_source_query() -> None:
    q = started()
    q.handle(v3((IS_IN, G, (S1, S2))), 0.0)
    out = q.handle(v3((BLOCK, G, (S1,))), 10.0)
    (gss,) = queries(out)
    assert (gss.group, gss.sources, gss.s_flag, gss.dst) == (G, (S1,), False, G)
    events = run_until(q, 20.0)
    assert [(t, codec_igmp.parse(a.packet).sources) for t, a in events
            if isinstance(a, SendQuery)] == [(11.0, (S1,))]
    assert [(t, a) for t, a in events if isinstance(a, MembershipChange)] == [
        (12.0, MembershipChange(G, "include", frozenset({S2})))]


def test_several_records_in_one_report_give_one_change_per_group() -> None:
    q = started()
    g2 = ip("239.2.2.2")
    out = q.handle(v3((ALLOW, G, (S1,)), (ALLOW, G, (S2,)),
                      (TO_EX, g2, ())), 0.0)
    assert changes(out) == [MembershipChange(G, "include", frozenset({S1, S2})),
                            MembershipChange(g2, "exclude", frozenset())]


# -- input checks ---------------------------------------------------------------


def test_bad_igmp_checksum_is_counted_and_ignored() -> None:
    q = started()
    pkt = bytearray(codec_igmp.build_report(2, HOST, G))
    pkt[-1] ^= 0xFF
    assert q.handle(bytes(pkt), 0.0) == []
    assert q.drops["checksum"] == 1 and q.snapshot(0.0) == []


def test_bad_ip_header_checksum_is_counted() -> None:
    q = started()
    pkt = bytearray(codec_igmp.build_report(2, HOST, G))
    pkt[8] = 2  # TTL changed without fixing the header checksum
    assert q.handle(bytes(pkt), 0.0) == []
    assert q.drops["checksum"] == 1


@pytest.mark.parametrize("cut", [0, 10, 20, 25, 30])
def test_truncated(cut: int) -> None:
    q = started()
    assert q.handle(codec_igmp.build_report(2, HOST, G)[:cut], 0.0) == []
    assert sum(q.drops.values()) == 1


def test_ethernet_padding_is_ignored() -> None:
    q = started()
    pkt = codec_igmp.build_report(2, HOST, G) + bytes(14)  # padded to a 60-byte frame
    assert changes(q.handle(pkt, 0.0)) == [MembershipChange(G, "exclude", frozenset())]


def test_unknown_type_and_other_protocols() -> None:
    q = started()
    body = bytearray(struct.pack("!BBH4s", 0x13, 0, 0, bytes(4)))  # DVMRP
    body[2:4] = struct.pack("!H", __import__("igmp.checksum").checksum.inet_checksum(body))
    assert q.handle(codec_igmp.build_packet(bytes(body), HOST, G), 0.0) == []
    udp = bytearray(codec_igmp.build_report(2, HOST, G))
    udp[9] = 17
    assert q.handle(bytes(udp), 0.0) == []  # header checksum now wrong: checksum
    assert q.drops["unknown_type"] == 1


def test_v3_report_to_wrong_destination_dropped() -> None:
    q = started()
    pkt = codec_igmp.build_report(3, HOST, records=[GroupRecord(4, G, ())], dst=G)
    assert q.handle(pkt, 0.0) == []
    assert q.drops["bad_destination"] == 1


def test_ttl_other_than_one_dropped() -> None:
    q = started()
    body = codec_igmp.build_report(2, HOST, G)[24:]
    assert q.handle(codec_igmp.build_packet(body, HOST, G, ttl=2), 0.0) == []
    assert q.drops["bad_ttl"] == 1


# -- wire encodings ------------------------------------------------------------


def test_v3_max_resp_code_and_qqic_float_encoding() -> None:
    # QRI 100 s = 1000 tenths -> exp 2, mant 15: (0x1f << 5) = 992 tenths, rounded down.
    p = QuerierParams(version=3, query_interval=300, query_response_interval=100,
                      robustness=9)
    q = Querier(4, p, ROUTER, 0.0)
    (a,) = q.start(0.0)
    raw = a.packet[24:]
    assert raw[1] == 0xAF  # 1|010|1111
    assert raw[9] == 0x92  # QQIC 300 s -> exp 1, mant 2: (0x12 << 4) = 288, rounded down
    assert raw[8] & 0x07 == 0  # robustness 9 does not fit QRV: 0
    msg = codec_igmp.parse(a.packet)
    assert msg.max_resp_s == 99.2 and msg.qqi_s == 288.0


def test_v2_max_resp_time_in_tenths() -> None:
    p = QuerierParams(version=2, query_response_interval=2.5)
    (a,) = Querier(4, p, ROUTER, 0.0).start(0.0)
    assert a.packet[24 + 1] == 25


def test_query_checksums_verify() -> None:
    (a,) = started().start(0.0)
    from igmp.checksum import inet_checksum

    assert inet_checksum(a.packet[:24]) == 0 and inet_checksum(a.packet[24:]) == 0
    assert a.packet[8] == 1 and a.packet[20:24] == b"\x94\x04\x00\x00"


def test_scapy_reads_our_queries() -> None:
    from scapy.layers.igmp import IGMPv3, IGMPv3_MQ
    from scapy.layers.inet import IP

    q = started()
    q.handle(v3((IS_IN, G, (S1, S2))), 0.0)
    out = q.handle(v3((BLOCK, G, (S1, S2))), 1.0)
    (a,) = [a for a in out if isinstance(a, SendQuery)]
    pkt = IP(a.packet)
    assert pkt[IGMPv3].type == 0x11 and pkt[IGMPv3].mrcode == 10
    assert pkt[IGMPv3_MQ].gaddr == "239.1.1.1"
    assert pkt[IGMPv3_MQ].srcaddrs == ["192.0.2.1", "192.0.2.2"]


# -- RFC 3376 4.1.1 / 4.1.7, RFC 3810 5.1.3: the floating-point codes over their range ----


def test_8_bit_code_round_trips_over_the_whole_range() -> None:
    # Every code decodes to a value that encodes back to the same code ...
    values = [fpcode.decode8(code) for code in range(256)]
    assert [fpcode.encode8(v) for v in values] == list(range(256))
    # ... the values grow with the code, linearly below 128 and by the RFC formula above ...
    assert values[:128] == list(range(128)) and values == sorted(set(values))
    assert all(values[c] == ((c & 0x0F) | 0x10) << (((c >> 4) & 0x07) + 3) for c in range(128, 256))
    assert values[-1] == 31744
    # ... and any other value encodes to the largest code not above it (hosts then answer
    # no later than the router expects), clamped at the top.
    for value in range(0, 32000):
        code = fpcode.encode8(value)
        assert values[code] <= value and (code == 255 or values[code + 1] > value), value
    assert fpcode.encode8(10**9) == 255 and fpcode.encode8(-5) == 0


def test_16_bit_code_round_trips_over_the_whole_range() -> None:
    values = [fpcode.decode16(code) for code in range(65536)]
    assert [fpcode.encode16(v) for v in values] == list(range(65536))
    assert values[:32768] == list(range(32768)) and values == sorted(set(values))
    assert all(
        values[c] == ((c & 0x0FFF) | 0x1000) << (((c >> 12) & 0x07) + 3) for c in range(32768, 65536, 97)
    )
    assert values[-1] == 8387584
    for value in [*range(32760, 33000), *range(40000, 8_400_000, 997)]:
        code = fpcode.encode16(value)
        assert values[code] <= value and (code == 65535 or values[code + 1] > value), value


@pytest.mark.parametrize("family", [4, 6])
def test_max_resp_and_qqic_survive_a_query_round_trip_for_every_code(family: int) -> None:
    """Each Max Resp Code and QQIC a query can carry: the value it stands for, put into
    build_query, comes back out of parse with the same code and value."""
    codec, version = (codec_igmp, 3) if family == 4 else (codec_mld, 2)
    src = IGMP.router if family == 4 else MLD.router
    unit = 10 if family == 4 else 1000  # tenths of a second / milliseconds
    codes = range(256) if family == 4 else range(0, 65536, 61)
    for code, qqic in zip(codes, (c % 256 for c in range(10**6)), strict=False):
        value = fpcode.decode8(code) if family == 4 else fpcode.decode16(code)
        qqi = fpcode.decode8(qqic)
        packet, _ = codec.build_query(version, src, None, (), value / unit, False, 2, float(qqi))
        m = codec.parse(packet)
        # The code as sent: IGMP's byte 1 after IPv4 with Router Alert (24 bytes), MLD's
        # bytes 4-5 after IPv6 and the hop-by-hop header (48 bytes).
        sent = packet[25] if family == 4 else struct.unpack_from("!H", packet, 48 + 4)[0]
        assert (sent, m.qqic) == (code, qqic), (code, qqic)
        assert (m.max_resp_s, m.qqi_s) == (value / unit, float(qqi))


# -- derived timers (RFC 3376 8, RFC 3810 9) ----------------------------------------------


def test_derived_timers_follow_the_rfc_formulas() -> None:
    d = QuerierParams()
    assert (d.group_membership_interval, d.other_querier_present_interval) == (260.0, 255.0)
    assert (d.last_member_query_time, d.older_host_present_interval) == (2.0, 260.0)
    assert (d.startup_interval, d.startup_count, d.lmqc) == (31.25, 2, 2)
    p = QuerierParams(robustness=3, query_interval=60, query_response_interval=5,
                      last_member_query_interval=0.5)
    assert p.group_membership_interval == 3 * 60 + 5  # RV * QI + QRI
    assert p.other_querier_present_interval == 3 * 60 + 5 / 2  # RV * QI + QRI / 2
    assert p.last_member_query_time == 0.5 * 3  # LMQI * LMQC, LMQC = RV by default
    assert p.older_host_present_interval == p.group_membership_interval
    assert (p.startup_interval, p.startup_count) == (15.0, 3)  # QI / 4, RV
    p = QuerierParams(last_member_query_count=5, startup_query_interval=7, startup_query_count=1)
    assert (p.last_member_query_time, p.startup_interval, p.startup_count) == (5.0, 7.0, 1)


# -- status ---------------------------------------------------------------------------------


def test_status_shows_filter_mode_sources_timers_compat_and_querier() -> None:
    q = started()
    g2 = ip("239.2.2.2")
    q.handle(v3((IS_IN, G, (S1, S2))), 0.0)
    q.handle(v3((TO_EX, g2, (S1,))), 10.0)
    q.handle(codec_igmp.build_report(2, HOST, ip("239.3.3.3")), 20.0)
    status = q.status(30.0)
    assert (status["protocol"], status["version"], status["is_querier"]) == ("igmp", 3, True)
    assert (status["querier"], status["address"], status["robustness"]) == ("10.0.0.5", "10.0.0.5", 2)
    assert status["next_general_query_s"] == 1.25  # the second startup query at 31.25
    by_group = {g["group"]: g for g in status["groups"]}
    assert by_group["239.1.1.1"] == {
        "group": "239.1.1.1",
        "mode": "include",
        "sources": ["192.0.2.1", "192.0.2.2"],
        "requested": [],
        "source_timers": {"192.0.2.1": 230.0, "192.0.2.2": 230.0},
        "group_timer_s": None,
        "compat_version": 3,
        "older_host_timers_s": {"v1": None, "v2": None},
    }
    ex = by_group["239.2.2.2"]
    assert (ex["mode"], ex["sources"], ex["requested"], ex["group_timer_s"]) == (
        "exclude", ["192.0.2.1"], [], 240.0)
    assert ex["source_timers"] == {"192.0.2.1": None}
    v2 = by_group["239.3.3.3"]
    assert (v2["compat_version"], v2["older_host_timers_s"]) == (2, {"v1": None, "v2": 250.0})
    assert status["counters"] == {"igmp_v3_report": 2, "igmp_v2_report": 1}
    q.handle(b"\x45", 30.0)
    q.handle(v3((IS_IN, G, (S1,)), src=ip("127.0.0.1")), 30.0)
    assert q.status(30.0)["drops"] == {"truncated": 1, "bad_source": 1}
    q.handle(IGMP.query(IGMP.lower), 31.0)
    status = q.status(31.0)
    assert (status["is_querier"], status["querier"], status["next_general_query_s"]) == (
        False, "10.0.0.3", None)
    assert status["other_querier_present_s"] == 255.0


def _tshark(tmp_path: Path, packets: list[SendQuery]) -> str:
    path = tmp_path / "queries.pcap"
    mac = bytes.fromhex("020000000001")
    write_pcap(str(path), [(i * 10**9, frame_for_ip(a.packet, mac)) for i, a in enumerate(packets)])
    res = subprocess.run(["tshark", "-r", str(path), "-V", "-o", "ip.check_checksum:TRUE"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_tshark_dissects_our_queries_cleanly(tmp_path: Path) -> None:
    require_tools("tshark")
    packets: list[SendQuery] = []
    for version in (1, 2, 3):
        q = Querier(4, QuerierParams(version=version), ROUTER, 0.0)
        packets += q.start(0.0)
        q.handle(codec_igmp.build_report(2, HOST, G), 0.0)
        packets += [a for a in q.handle(codec_igmp.build_leave(HOST, G), 1.0)
                    if isinstance(a, SendQuery)]
    q = started()
    q.handle(v3((IS_IN, G, (S1, S2))), 0.0)
    packets += [a for a in q.handle(v3((BLOCK, G, (S1, S2))), 1.0)
                if isinstance(a, SendQuery)]
    for version in (1, 2):
        m = Querier(6, QuerierParams(version=version), ip("fe80::1"), 0.0)
        packets += m.start(0.0)
        m.handle(codec_mld.build_report(1, ip("fe80::2"), ip("ff0e::1")), 0.0)
        packets += [a for a in m.handle(codec_mld.build_done(ip("fe80::2"), ip("ff0e::1")), 1.0)
                    if isinstance(a, SendQuery)]
    assert len(packets) == 10
    text = _tshark(tmp_path, packets)
    assert "Malformed" not in text
    assert "[Expert Info (Error" not in text
    assert "[Expert Info (Warning" not in text
    assert "incorrect" not in text.lower()
    assert text.count("Membership Query") >= 6
    assert text.count("Multicast Listener Query") == 4
    assert "Router Alert" in text
    assert text.count("[Checksum Status: Good]") == len(packets)
    assert text.count("[Header checksum status: Good]") == 6


def test_scapy_built_reports_parse() -> None:
    from scapy.layers.igmp import IGMP, IGMPv3_MR, IGMPv3_MR_Group
    from scapy.layers.inet import IP, IPOption_Router_Alert

    rep = IP(src="10.0.0.2", dst="224.0.0.22", ttl=1, options=[IPOption_Router_Alert()]) / \
        IGMPv3_MR(records=[IGMPv3_MR_Group(rtype=4, maddr="239.1.1.1", srcaddrs=["192.0.2.1"]),
                           IGMPv3_MR_Group(rtype=1, maddr="239.2.2.2")])
    q = started()
    out = q.handle(bytes(rep), 0.0)
    assert changes(out) == [MembershipChange(G, "exclude", frozenset({S1}))]
    assert q.counters["igmp_v3_report"] == 1
    v2 = IP(src="10.0.0.2", dst="239.3.3.3", ttl=1) / IGMP(type=0x16, gaddr="239.3.3.3")
    assert changes(q.handle(bytes(v2), 1.0)) == [
        MembershipChange(ip("239.3.3.3"), "exclude", frozenset())]
