"""Group membership against crafted frames, through a running node.

`mcmw run` in a network namespace; frames built with scapy are injected through an
AF_PACKET socket bound to the TAP in that namespace (tests/apps/frame_tap.py), so they
reach the node as if a host or a router on the segment had sent them. The same socket
captures what the node sends, which is how queries are counted and measured, and every
query captured is dissected by tshark. The Linux kernel of the namespace is a host on
the segment too. Needs root.
"""

from __future__ import annotations

import ipaddress
import random
import time
import warnings
from collections import Counter
from typing import Any, TypeVar

import pytest
from scapy.all import Packet, Raw, raw
from scapy.layers.inet import IP, IPOption_Router_Alert
from scapy.layers.inet6 import (
    ICMPv6MLDMultAddrRec,
    ICMPv6MLDone,
    ICMPv6MLQuery2,
    ICMPv6MLReport,
    ICMPv6MLReport2,
    IPv6,
    IPv6ExtHdrHopByHop,
    RouterAlert,
)
from scapy.layers.l2 import Ether

from igmp.messages import ALLOW, BLOCK, IS_EX, TO_EX, TO_IN
from mcmw.lab import Lab
from tap.ethernet import format_mac, link_local_from_mac, multicast_mac
from tests.test_membership_kernel import MARGIN, Query, Segment, assert_dissects_cleanly, queries

with warnings.catch_warnings():  # newer scapy moved these to scapy.layers.igmp; 2.5 has only these
    warnings.simplefilter("ignore", DeprecationWarning)
    from scapy.contrib.igmp import IGMP
    from scapy.contrib.igmpv3 import IGMPv3gr, IGMPv3mq, IGMPv3mr

pytestmark = pytest.mark.privileged
T = TypeVar("T")

# Short timers: general queries every 2 s, so their absence is quick to see.
# GMI = 2 * 2 + 1 = 5 s; Other Querier Present Interval = 2 * 2 + 1 / 2 = 4.5 s;
# LMQT = 0.5 s * 2 = 1 s. Limits low enough to reach with a few frames.
PARAMS: dict[str, Any] = {
    "query_interval": "2s",
    "query_response_interval": "1s",
    "robustness": 2,
    "last_member_query_interval": "500ms",
    "max_groups": 16,
    "max_sources": 400,
}
QI, GMI, OQPI = 2.0, 5.0, 4.5
LMQC, LMQT = 2, 1.0
MAX_GROUPS, MAX_SOURCES = 16, 400

HOST_MAC = "02:00:00:00:99:01"
HOST4, HOST6 = "169.254.9.9", "fe80::9"
OTHER_HOST4 = "169.254.9.10"


def segment(lab: Lab, **tap: Any) -> Segment:
    return Segment(lab, "c", "c", igmp=PARAMS, mld=PARAMS, tap=tap or None).start()


# -- frames -----------------------------------------------------------------------------


def mac_for(dst: str) -> str:
    address = ipaddress.ip_address(dst)
    if not address.is_multicast:
        return "ff:ff:ff:ff:ff:ff"
    return format_mac(multicast_mac(address.packed))


def v4(payload: Packet, dst: str, src: str = HOST4, ttl: int = 1, **ip: Any) -> bytes:
    """An IPv4 frame with the Router Alert option, TTL 1, from a host of the segment."""
    ip.setdefault("options", [IPOption_Router_Alert()])
    return raw(Ether(src=HOST_MAC, dst=mac_for(dst)) / IP(src=src, dst=dst, ttl=ttl, **ip) / payload)


def v6(payload: Packet, dst: str, src: str = HOST6, hlim: int = 1, alert: bool = True) -> bytes:
    """An IPv6 frame with a hop-by-hop Router Alert (MLD), hop limit 1."""
    if alert:
        head = IPv6(src=src, dst=dst, hlim=hlim) / IPv6ExtHdrHopByHop(nh=58, options=[RouterAlert(value=0)])
    else:
        head = IPv6(src=src, dst=dst, hlim=hlim, nh=58)
    return raw(Ether(src=HOST_MAC, dst=mac_for(dst)) / head / payload)


def report1(group: str, **kw: Any) -> bytes:
    return v4(IGMP(type=0x12, gaddr=group), dst=group, **kw)


def report2(group: str, dst: str | None = None, **kw: Any) -> bytes:
    return v4(IGMP(type=0x16, gaddr=group), dst=dst or group, **kw)


def leave2(group: str, dst: str = "224.0.0.2") -> bytes:
    return v4(IGMP(type=0x17, gaddr=group), dst=dst)


def records4(*records: tuple[int, str, list[str]], **fields: Any) -> Packet:
    return IGMPv3mr(records=[IGMPv3gr(rtype=t, maddr=g, srcaddrs=list(s)) for t, g, s in records], **fields)


def report3(*records: tuple[int, str, list[str]], dst: str = "224.0.0.22", **kw: Any) -> bytes:
    return v4(records4(*records), dst=dst, **kw)


def query3(src: str, group: str = "0.0.0.0", **fields: Any) -> bytes:
    """Another router's IGMPv3 query: Max Resp 1 s, QRV 2, QQIC 2 s, as ours."""
    fields = {"mrcode": 10, "qrv": 2, "qqic": 2, **fields}
    return v4(IGMPv3mq(gaddr=group, **fields), dst="224.0.0.1" if group == "0.0.0.0" else group, src=src)


def mld_report1(group: str, **kw: Any) -> bytes:
    return v6(ICMPv6MLReport(mladdr=group), dst=group, **kw)


def mld_done(group: str, dst: str = "ff02::2") -> bytes:
    return v6(ICMPv6MLDone(mladdr=group), dst=dst)


def records6(*records: tuple[int, str, list[str]], **fields: Any) -> Packet:
    return ICMPv6MLReport2(
        records=[ICMPv6MLDMultAddrRec(rtype=t, dst=g, sources=list(s)) for t, g, s in records], **fields
    )


def mld_report2(*records: tuple[int, str, list[str]], dst: str = "ff02::16", **kw: Any) -> bytes:
    return v6(records6(*records), dst=dst, **kw)


def mld_query2(src: str, group: str = "::", **fields: Any) -> bytes:
    fields = {"mrd": 1000, "QRV": 2, "QQIC": 2, **fields}
    return v6(ICMPv6MLQuery2(mladdr=group, **fields), dst="ff02::1" if group == "::" else group, src=src)


def flip(frame: bytes, offset: int) -> bytes:
    return frame[:offset] + bytes((frame[offset] ^ 0xFF,)) + frame[offset + 1 :]


def poke(frame: bytes, offset: int, value: bytes) -> bytes:
    return frame[:offset] + value + frame[offset + len(value) :]


def chunks(items: list[T], size: int) -> list[list[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# IGMP begins after Ethernet (14) and IPv4 with Router Alert (24); MLD after Ethernet,
# IPv6 (40) and the hop-by-hop header (8). Checksums are at +2.
IGMP_AT, MLD_AT = 14 + 24, 14 + 40 + 8


def general(qs: list[Query], family: int) -> list[Query]:
    return [q for q in qs if q.general and q.family == family]


# -- querier election -------------------------------------------------------------------


def test_querier_election_with_a_lower_and_a_higher_address(lab: Lab) -> None:
    seg = segment(lab)
    own4 = seg.address
    own6 = seg.status()["queriers"]["mld"]["address"]
    # MLD queries come from the link-local address of the node's MAC (modified EUI-64).
    assert own6 == str(ipaddress.IPv6Address(link_local_from_mac(seg.mac))), own6
    seg.until(
        lambda: all(len(general(queries(seg.sent()), f)) >= 2 for f in (4, 6)),
        QI + MARGIN,
        "the startup queries",
    )

    def queriers() -> dict[str, Any]:
        return seg.status()["queriers"]

    # A router with a higher address: the node stays querier and keeps querying.
    higher4, higher6 = "169.254.1.200", "fe80::ffff:ffff:ffff:fffe"
    assert ipaddress.ip_address(higher6) > ipaddress.ip_address(own6)
    t_higher = seg.inject(query3(higher4), mld_query2(higher6))
    time.sleep(0.3)
    status = queriers()
    assert (status["igmp"]["is_querier"], status["igmp"]["querier"]) == (True, own4), status
    assert (status["mld"]["is_querier"], status["mld"]["querier"]) == (True, own6), status
    seg.until(
        lambda: all(general([q for q in queries(seg.sent()) if q.t > t_higher], f) for f in (4, 6)),
        QI + MARGIN,
        "general queries after the higher router's",
    )

    # A router with a lower address: the node yields at once, stops querying ...
    lower4, lower6 = "169.254.0.9", "fe80::1"
    assert ipaddress.ip_address(lower6) < ipaddress.ip_address(own6)
    t_lower = seg.inject(query3(lower4), mld_query2(lower6))
    seg.until(lambda: not any(s["is_querier"] for s in queriers().values()), 0.5, "the node to yield")
    status = queriers()
    assert status["igmp"]["querier"] == lower4, status
    assert status["mld"]["querier"] == lower6, status
    for family in ("igmp", "mld"):
        assert OQPI - 0.6 <= status[family]["other_querier_present_s"] <= OQPI, status
        assert status[family]["next_general_query_s"] is None

    # ... and as a non-querier leaves a host's leave to the querier: no group-specific
    # query, the group stays ...
    seg.inject(report2("239.5.5.5"), mld_report1("ff0e::5:5"))
    seg.until(lambda: seg.local("239.5.5.5") and seg.local("ff0e::5:5"), 1.0, "the reports")
    seg.inject(leave2("239.5.5.5"), mld_done("ff0e::5:5"))
    time.sleep(LMQT + 0.3)
    assert seg.local("239.5.5.5") is not None
    assert seg.local("ff0e::5:5") is not None
    assert not any(s["is_querier"] for s in queriers().values())
    # ... until the querier's group-specific query (S clear) lowers the group timer to
    # LMQT (RFC 3376 6.6.1): then it goes with the querier's LMQT.
    t_asked = seg.inject(
        query3(lower4, group="239.5.5.5", mrcode=5), mld_query2(lower6, group="ff0e::5:5", mrd=500)
    )
    t_dropped = seg.until(
        lambda: seg.local("239.5.5.5") is None and seg.local("ff0e::5:5") is None,
        LMQT + 2.0,
        "the groups to go after the querier's queries",
    )
    assert LMQT - 0.1 <= t_dropped - t_asked <= LMQT + MARGIN, t_dropped - t_asked

    # The other router goes silent: an Other Querier Present Interval after its last
    # query the node is querier again and queries at once.
    t_back = seg.until(
        lambda: all(s["is_querier"] for s in queriers().values()), OQPI + 2.0, "the node to take over again"
    )
    assert OQPI - 0.2 <= t_back - t_asked <= OQPI + MARGIN, t_back - t_asked
    status = queriers()
    assert (status["igmp"]["querier"], status["mld"]["querier"]) == (own4, own6)
    seg.until(
        lambda: all(general([q for q in queries(seg.sent()) if q.t > t_back - 0.2], f) for f in (4, 6)),
        1.0,
        "general queries once querier again",
    )
    frames = seg.sent()
    silent = [q for q in queries(frames) if t_lower + 0.05 < q.t < t_asked + OQPI - 0.1]
    assert silent == [], f"queries sent while another router was querier: {silent}"
    assert [q for q in queries(frames) if q.wire_problems() or (q.qrv, q.qqic) != (2, 2)] == []
    assert {q.src for q in queries(frames)} == {own4, own6}
    assert_dissects_cleanly(frames, lab.workdir / "election.pcap")
    assert seg.drops() == Counter()


# -- many sources ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mtu",
    [1500, 1280],
)
def test_block_of_300_sources_queries_each_lmqc_times_within_the_mtu(lab: Lab, mtu: int) -> None:
    seg = segment(lab, mtu=mtu)
    g4, g6 = "239.7.7.7", "ff0e::7:7"
    s4 = [f"10.7.{i // 250}.{i % 250 + 1}" for i in range(300)]
    s6 = [f"2001:db8:7::{i + 1:x}" for i in range(300)]
    per_frame = (mtu - 40 - 8 - 8 - 20) // 16
    seg.inject(report3((ALLOW, g4, s4)), *(mld_report2((ALLOW, g6, c)) for c in chunks(s6, per_frame)))
    for group, sources in ((g4, s4), (g6, s6)):
        seg.until_local(
            group,
            lambda local, s=sources: local is not None and len(local["sources"]) == len(s),
            2.0,
            "to include 300 sources",
        )
        local = seg.local(group)
        assert local is not None and local["mode"] == "include"
        assert set(local["sources"]) == set(sources)

    t_block = seg.inject(
        report3((BLOCK, g4, s4)), *(mld_report2((BLOCK, g6, c)) for c in chunks(s6, per_frame))
    )
    t_gone = seg.until(
        lambda: seg.local(g4) is None and seg.local(g6) is None,
        LMQT + 3.0,
        "both groups to go after the BLOCK",
    )
    assert LMQT - 0.1 <= t_gone - t_block <= LMQT + MARGIN, t_gone - t_block
    time.sleep(0.2)

    frames = seg.sent()
    asked = [q for q in queries(frames) if q.group in (g4, g6)]
    assert all(q.t >= t_block for q in asked), "queried before the BLOCK"
    for group, sources in ((g4, s4), (g6, s6)):
        counts = Counter(s for q in asked if q.group == group for s in q.sources)
        assert counts == Counter({s: LMQC for s in sources}), (
            f"{group}: sources queried other than {LMQC} times: "
            f"{Counter(counts.values())} (times: number of sources)"
        )
    assert [q for q in asked if q.wire_problems() or q.max_resp_s != 0.5 or q.s_flag] == []
    too_big = [(q.group, q.size) for q in asked if q.size > mtu]
    assert too_big == [], f"queries larger than the MTU of {mtu}: {too_big}"
    assert_dissects_cleanly(frames, lab.workdir / "sources.pcap")
    assert seg.drops() == Counter()


# -- older hosts on a v3 segment -----------------------------------------------------------


def test_v1_reports_on_a_v3_segment(lab: Lab) -> None:
    seg = segment(lab)
    g1, g3, m1 = "239.8.8.1", "239.8.8.3", "ff0e::8:1"
    t_report = seg.inject(report1(g1), report3((IS_EX, g3, [])), mld_report1(m1))
    for group in (g1, g3, m1):
        seg.until_local(group, lambda local: local is not None, 1.0, "to show up")
    assert seg.local(g1)["compat_version"] == 1  # type: ignore[index]
    assert seg.local(g3)["compat_version"] == 3  # type: ignore[index]
    assert seg.local(m1)["compat_version"] == 1  # type: ignore[index]

    # With an IGMPv1 host present: source lists of TO_EX and BLOCK records are ignored
    # (an older host wants every source), and so are leaves.
    t_last = seg.inject(
        report3((TO_EX, g1, ["10.8.8.8"]), (BLOCK, g1, ["10.8.8.9"]), src=OTHER_HOST4),
        mld_report2((TO_EX, m1, ["2001:db8::8"]), src="fe80::10"),
    )
    t_leave = seg.inject(leave2(g1), report3((TO_IN, g3, [])))
    seg.until_local(g3, lambda local: local is None, LMQT + MARGIN, "to go after its TO_IN({})")
    time.sleep(max(0.0, t_leave + LMQT + 0.3 - time.monotonic()))
    for group in (g1, m1):
        local = seg.local(group)
        assert local is not None, f"{group} dropped though its older host is still there"
        assert (local["mode"], local["sources"], local["requested"]) == ("exclude", [], []), local
        assert local["compat_version"] == 1
    asked = queries(seg.sent())
    assert [q for q in asked if q.group == g1] == [], "the node queried for a group with a v1 host"
    assert len([q for q in asked if q.group == g3]) >= LMQC

    # No leave counts: the group lives out the GMI of its last report.
    t_gone = seg.until_local(g1, lambda local: local is None, GMI + 2.0, "to expire")
    assert GMI - 0.1 <= t_gone - t_last <= GMI + MARGIN, t_gone - t_last
    assert t_last >= t_report
    assert_dissects_cleanly(seg.sent(), lab.workdir / "v1.pcap")
    assert seg.drops() == Counter()


# -- hostile frames ---------------------------------------------------------------------------

G = "239.6.6.6"
M = "ff0e::6:6"


def hostile_cases() -> list[tuple[str, bytes, str]]:
    """(what, frame, the drop reason it must be counted under)."""
    good2 = report2(G)
    good_v3 = report3((IS_EX, G, []))
    good_m1 = mld_report1(M)
    good_m2 = mld_report2((IS_EX, M, []))
    return [
        # checksums
        ("IGMP checksum", flip(good2, IGMP_AT + 2), "igmp.checksum"),
        ("IGMPv3 report checksum", flip(good_v3, IGMP_AT + 3), "igmp.checksum"),
        ("IPv4 header checksum", flip(good2, 14 + 10), "igmp.checksum"),
        ("MLDv1 checksum", flip(good_m1, MLD_AT + 2), "mld.checksum"),
        ("MLDv2 checksum", flip(good_m2, MLD_AT + 3), "mld.checksum"),
        # truncated, and counts that promise more than the frame holds
        ("IGMP of 4 bytes", v4(Raw(b"\x16\x00\xe9\xff"), dst=G, proto=2), "igmp.truncated"),
        ("IPv4 total length past the frame", poke(good2, 14 + 2, b"\x01\x00"), "igmp.truncated"),
        (
            "v3 report: 3 records announced, 1 present",
            v4(records4((IS_EX, G, []), numgrp=3), dst="224.0.0.22"),
            "igmp.truncated",
        ),
        (
            "v3 record: 65535 sources announced",
            v4(
                IGMPv3mr(records=[IGMPv3gr(rtype=ALLOW, maddr=G, numsrc=65535, srcaddrs=["10.0.0.1"])]),
                dst="224.0.0.22",
            ),
            "igmp.truncated",
        ),
        (
            "v3 record: aux data past the end",
            v4(IGMPv3mr(records=[IGMPv3gr(rtype=IS_EX, maddr=G, auxdlen=200)]), dst="224.0.0.22"),
            "igmp.truncated",
        ),
        (
            "v3 query: 65535 sources announced",
            query3("169.254.1.201", numsrc=65535, srcaddrs=["10.0.0.1"]),
            "igmp.truncated",
        ),
        (
            "query of 10 bytes",
            v4(
                Raw(b"\x11\x0a\xe4\xf5\x00\x00\x00\x00\x00\x00"),
                dst="224.0.0.1",
                src="169.254.1.201",
                proto=2,
            ),
            "igmp.truncated",
        ),
        ("MLDv1 of 12 bytes", v6(Raw(bytes([131, 0, 0, 0]) + bytes(8)), dst=M), "mld.truncated"),
        ("IPv6 payload length past the frame", poke(good_m1, 14 + 4, b"\x02\x00"), "mld.truncated"),
        (
            "MLDv2 report: 5 records announced, 1 present",
            v6(records6((IS_EX, M, []), records_number=5), dst="ff02::16"),
            "mld.truncated",
        ),
        (
            "MLDv2 record: 65535 sources announced",
            v6(
                ICMPv6MLReport2(
                    records=[
                        ICMPv6MLDMultAddrRec(
                            rtype=ALLOW, dst=M, sources_number=65535, sources=["2001:db8::1"]
                        )
                    ]
                ),
                dst="ff02::16",
            ),
            "mld.truncated",
        ),
        (
            "MLDv2 query: 65535 sources announced",
            mld_query2("fe80::ffff:ffff:ffff:fffe", sources_number=65535, sources=["2001:db8::1"]),
            "mld.truncated",
        ),
        # wrong TTL / hop limit
        ("IGMP with TTL 2", report2(G, ttl=2), "igmp.bad_ttl"),
        ("IGMP with TTL 64", report3((IS_EX, G, []), ttl=64), "igmp.bad_ttl"),
        ("MLD with hop limit 2", mld_report1(M, hlim=2), "mld.bad_ttl"),
        ("MLD with hop limit 255", mld_report2((IS_EX, M, []), hlim=255), "mld.bad_ttl"),
        # garbage types
        ("IGMP type 0x99", v4(IGMP(type=0x99, gaddr=G), dst=G), "igmp.unknown_type"),
        ("v3 record type 7", report3((7, G, [])), "igmp.unknown_type"),
        ("MLDv2 record type 9", mld_report2((9, M, [])), "mld.unknown_type"),
        # sources, destinations and groups a router must not accept
        ("IGMP from 127.0.0.1", report2(G, src="127.0.0.1"), "igmp.bad_source"),
        ("IGMP from a multicast address", report2(G, src="224.0.0.5"), "igmp.bad_source"),
        ("MLD from a global address", mld_report1(M, src="2001:db8::9"), "mld.bad_source"),
        ("MLD from ::", mld_report2((IS_EX, M, []), src="::"), "mld.bad_source"),
        ("MLD without Router Alert", mld_report1(M, alert=False), "mld.no_router_alert"),
        ("report for 224.0.0.1", report2("224.0.0.1"), "igmp.bad_group"),
        ("report for a unicast address", report2("10.1.1.1"), "igmp.bad_group"),
        ("MLD report for ff02::1", mld_report1("ff02::1"), "mld.bad_group"),
        ("MLD report for interface-local ff01::5", mld_report1("ff01::5"), "mld.bad_group"),
        ("leave to 224.0.0.1", leave2(G, dst="224.0.0.1"), "igmp.bad_destination"),
        ("leave sent to another group", leave2(G, dst="239.6.6.7"), "igmp.bad_destination"),
        ("v2 report sent to another group", report2(G, dst="239.6.6.7"), "igmp.bad_destination"),
        ("v3 report to 224.0.0.1", report3((IS_EX, G, []), dst="224.0.0.1"), "igmp.bad_destination"),
        ("MLD Done to ff02::1", mld_done(M, dst="ff02::1"), "mld.bad_destination"),
        ("MLDv2 report to ff02::1", mld_report2((IS_EX, M, []), dst="ff02::1"), "mld.bad_destination"),
        # broken IP
        ("IPv4 fragment", v4(IGMP(type=0x16, gaddr=G), dst=G, flags="MF"), "igmp.fragment"),
        ("IP version 5", poke(good2, 14, b"\x56"), "igmp.bad_header"),
        ("IHL of 16 bytes", poke(good2, 14, b"\x44"), "igmp.bad_header"),
    ]


def random_frames(count: int, seed: int) -> list[bytes]:
    """Well-formed IP headers (IPv4 with Router Alert, protocol IGMP; IPv6 with the MLD
    hop-by-hop header) around random IGMP / MLD bytes: each must be counted as one drop."""
    rng = random.Random(seed)
    frames = []
    for _ in range(count):
        body = rng.randbytes(rng.randrange(0, 160))
        if rng.random() < 0.5:
            kind = rng.choice([0x11, 0x12, 0x16, 0x17, 0x22, rng.randrange(256)])
            frames.append(v4(Raw(bytes((kind,)) + body), dst="224.0.0.22", proto=2))
        else:
            kind = rng.choice([130, 131, 132, 143])
            frames.append(v6(Raw(bytes((kind,)) + body), dst="ff02::16"))
    return frames


def test_malformed_and_hostile_frames_are_counted_and_a_join_still_works(lab: Lab) -> None:
    seg = segment(lab)
    cases = hostile_cases()
    assert {reason.split(".")[1] for _, _, reason in cases} >= {
        "checksum",
        "truncated",
        "bad_ttl",
        "unknown_type",
        "bad_source",
        "bad_destination",
        "bad_group",
        "no_router_alert",
        "fragment",
        "bad_header",
    }
    expected: Counter[str] = Counter()
    start = seg.drops()

    def injected(frame: bytes, what: str) -> Counter[str]:
        before = seg.drops()
        seg.inject(frame)
        seg.until(lambda: seg.drops() != before, 1.0, f"a drop counted for: {what}")
        time.sleep(0.05)  # anything else this frame does shows too
        after = seg.drops()
        after.subtract(before)
        return +after

    for what, frame, reason in cases:
        assert injected(frame, what) == Counter({reason: 1}), what
        expected[reason] += 1

    # Too short for an IPv4 or IPv6 header: the node's own framing check counts these.
    malformed = seg.status()["counters"].get("dropped_malformed", 0)
    seg.inject(
        raw(Ether(src=HOST_MAC, dst="01:00:5e:00:00:16", type=0x0800) / Raw(b"\x46" + bytes(12))),
        raw(Ether(src=HOST_MAC, dst="33:33:00:00:00:16", type=0x86DD) / Raw(b"\x60" + bytes(30))),
    )
    seg.until(
        lambda: seg.status()["counters"].get("dropped_malformed", 0) == malformed + 2,
        1.0,
        "two short frames counted",
    )

    # Over the limits: sources per group, then groups per segment.
    many = [f"10.6.{i // 250}.{i % 250 + 1}" for i in range(600)]
    seg.inject(report3((ALLOW, G, many[:300])))
    seg.until_local(G, lambda local: local is not None and len(local["sources"]) == 300, 1.0, "300 sources")
    assert injected(report3((ALLOW, G, many[300:])), "300 more sources") == Counter({"igmp.over_limit": 1})
    expected["igmp.over_limit"] += 1
    local = seg.local(G)
    assert local is not None and len(local["sources"]) == MAX_SOURCES
    groups = [f"239.9.0.{i}" for i in range(1, 21)]
    refused = len(groups) - (MAX_GROUPS - 1)
    assert injected(report3(*((IS_EX, g, []) for g in groups)), "20 more groups") == Counter(
        {"igmp.over_limit": refused}
    )
    expected["igmp.over_limit"] += refused
    # The kernel's own MLD groups (solicited-node) share the limit, so only a range.
    groups6 = [f"ff0e::9:{i}" for i in range(1, 21)]
    refused6 = injected(mld_report2(*((IS_EX, g, []) for g in groups6)), "20 MLD groups")
    assert set(refused6) == {"mld.over_limit"} and len(groups6) - MAX_GROUPS <= refused6["mld.over_limit"]
    expected.update(refused6)
    assert seg.alive()

    # Everything counted is everything dropped.
    total = seg.drops()
    total.subtract(start)
    assert +total == expected

    # A flood of random membership messages: each one counted, the node keeps up.
    flood = random_frames(600, seed=3)
    for batch in chunks(flood, 100):
        want = sum(seg.drops().values()) + len(batch)
        seg.inject(*batch)
        seg.until(lambda want=want: sum(seg.drops().values()) >= want, 2.0, "every random frame counted")
        assert sum(seg.drops().values()) == want
    assert seg.alive()

    # The table is full; the hosts leave (TO_IN({})) and it empties within LMQT.
    seg.inject(
        report3(*((TO_IN, g, []) for g in [G, *groups])), mld_report2(*((TO_IN, g, []) for g in groups6))
    )
    seg.until(
        lambda: not [g for g in seg.status()["groups"] if g["local"]],
        LMQT + MARGIN + 0.5,
        "the injected groups to go",
    )

    # A normal join by the kernel still works, both families, and so does its leave.
    for group in ("239.99.0.1", "ff0e::99:1"):
        t_join = seg.do("join", group)
        t_seen = seg.until_local(group, lambda local: local is not None, 2.0, "the kernel's join")
        assert t_seen - t_join <= 1.0, (group, t_seen - t_join)
        local = seg.local(group)
        assert local is not None and (local["mode"], local["sources"]) == ("exclude", [])
        t_left = seg.do("leave", group)
        t_gone = seg.until_local(group, lambda local: local is None, LMQT + 2.0, "the kernel's leave")
        assert t_gone - t_left <= LMQT + MARGIN
    assert seg.alive()
    assert_dissects_cleanly(seg.sent(), lab.workdir / "hostile.pcap")
