"""`mcmw decode` against tshark, field by field: on frames crafted with scapy (every IGMP
and MLD version and message, every record type, hundreds of sources, malformed frames)
written in every link type the reader supports, on peer messages, and on captures of a
real Linux host's joins and leaves through a running node (every IGMP and MLD version)."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from dpkt import pcapng
from scapy.layers.igmp import IGMP, IGMPv3_MQ, IGMPv3_MR, IGMPv3_MR_Group
from scapy.layers.inet import IP, UDP, IPOption_Router_Alert
from scapy.layers.inet6 import (
    ICMPv6MLDMultAddrRec,
    ICMPv6MLDone,
    ICMPv6MLQuery,
    ICMPv6MLQuery2,
    ICMPv6MLReport,
    ICMPv6MLReport2,
    ICMPv6ND_NS,
    IPv6,
    IPv6ExtHdrHopByHop,
    RouterAlert,
)
from scapy.layers.l2 import ARP, Ether

from igmp.messages import RECORD_NAMES
from mcmw.capture import ETHERNET, LINUX_SLL, LINUX_SLL2, RAW_IP, CaptureReader, TcpFlow, relink, write_pcap
from mcmw.cli import UsageError, main
from mcmw.decode import Decoder
from mcmw.lab import Lab, wait_for
from overlay import codec
from tests.netlab import require_tools
from tests.sites import APPS, make_sites

T0 = 1_700_000_000 * 10**9
RA = [IPOption_Router_Alert()]
MLD_TYPES = {"130", "131", "132", "143"}

FIELDS = [
    "frame.number",
    "frame.protocols",
    "_ws.malformed",
    "ip.checksum.status",
    "igmp.version",
    "igmp.type",
    "igmp.max_resp",
    "igmp.maddr",
    "igmp.s",
    "igmp.qrv",
    "igmp.qqic",
    "igmp.num_src",
    "igmp.saddr",
    "igmp.record_type",
    "igmp.checksum.status",
    "icmpv6.type",
    "icmpv6.checksum.status",
    "icmpv6.mld.maximum_response_code",
    "icmpv6.mld.maximum_response_delay",
    "icmpv6.mld.multicast_address",
    "icmpv6.mld.flag.s",
    "icmpv6.mld.flag.qrv",
    "icmpv6.mld.qqi",
    "icmpv6.mld.source_address",
    "icmpv6.mldr.mar.record_type",
    "icmpv6.mldr.mar.multicast_address",
    "icmpv6.mldr.mar.nb_sources",
    "icmpv6.mldr.mar.source_address",
    "cops.op_code",
    "cops.msg_len",
    "cops.pepid.id",
    "cops.katimer.value",
    "cops.error",
]


# -- frames -------------------------------------------------------------------------------


def v4(dst: str, payload: Any, src: str = "10.0.0.2") -> bytes:
    return bytes(Ether(src="02:00:00:00:00:02") / IP(src=src, dst=dst, ttl=1, options=RA) / payload)


def v6(dst: str, payload: Any, src: str = "fe80::2") -> bytes:
    hbh = IPv6ExtHdrHopByHop(options=[RouterAlert()])
    return bytes(Ether(src="02:00:00:00:00:02") / IPv6(src=src, dst=dst, hlim=1) / hbh / payload)


def flip(frame: bytes, offset: int) -> bytes:
    out = bytearray(frame)
    out[offset] ^= 0x01
    return bytes(out)


def crafted() -> list[bytes]:
    """Every message of every version, edge cases of each field, and frames to drop."""
    many4 = [f"10.1.{i // 250}.{i % 250 + 1}" for i in range(300)]
    many6 = [f"2001:db8::{i + 1:x}" for i in range(80)]
    records4 = [
        IGMPv3_MR_Group(rtype=t, maddr=f"239.2.2.{t}", srcaddrs=[f"192.0.2.{s + 1}" for s in range(t - 1)])
        for t in range(1, 7)
    ]
    records6 = [
        ICMPv6MLDMultAddrRec(rtype=t, dst=f"ff0e::5:{t}", sources=many6[: t - 1]) for t in range(1, 7)
    ]
    q = "10.0.0.1"
    frames = [
        v4("224.0.0.1", IGMP(type=0x11, mrcode=0, gaddr="0.0.0.0"), q),  # v1 query: code 0, 8 bytes
        v4("224.0.0.1", IGMP(type=0x11, mrcode=100, gaddr="0.0.0.0"), q),
        v4("239.1.1.1", IGMP(type=0x11, mrcode=10, gaddr="239.1.1.1"), q),
        v4("224.0.0.1", IGMPv3_MQ(mrcode=100, gaddr="0.0.0.0", qrv=2, qqic=125), q),
        v4(
            "232.1.1.1", IGMPv3_MQ(mrcode=250, gaddr="232.1.1.1", srcaddrs=many4[:2], s=1, qrv=7, qqic=200), q
        ),
        v4("224.0.0.1", IGMPv3_MQ(mrcode=10, gaddr="239.9.9.9", srcaddrs=many4, qrv=3, qqic=255), q),
        v4("239.1.1.1", IGMP(type=0x12, gaddr="239.1.1.1")),
        v4("239.1.1.1", IGMP(type=0x16, gaddr="239.1.1.1")),
        v4("224.0.0.2", IGMP(type=0x17, gaddr="239.1.1.1")),
        v4("224.0.0.22", IGMPv3_MR(records=records4)),
        v4("224.0.0.22", IGMPv3_MR(records=[IGMPv3_MR_Group(rtype=1, maddr="232.3.3.3", srcaddrs=many4)])),
        v4(
            "224.0.0.22",
            IGMPv3_MR(records=[IGMPv3_MR_Group(rtype=2, maddr="239.4.4.4", auxdlen=1) / b"AUXD"]),
        ),
        v6("ff02::1", ICMPv6MLQuery(mrd=10000, mladdr="::"), "fe80::1"),
        v6("ff0e::1", ICMPv6MLQuery(mrd=1000, mladdr="ff0e::1"), "fe80::1"),
        v6("ff02::1", ICMPv6MLQuery2(mrd=10000, mladdr="::", QRV=2, QQIC=125), "fe80::1"),
        v6(
            "ff0e::2",
            ICMPv6MLQuery2(mrd=40000, mladdr="ff0e::2", sources=many6[:3], S=1, QRV=5, QQIC=200),
            "fe80::1",
        ),
        v6("ff0e::3", ICMPv6MLReport(mladdr="ff0e::3")),
        v6("ff02::2", ICMPv6MLDone(mladdr="ff0e::3")),
        v6("ff02::16", ICMPv6MLReport2(records=records6)),
        v6(
            "ff02::16", ICMPv6MLReport2(records=[ICMPv6MLDMultAddrRec(rtype=2, dst="ff0e::6", sources=many6)])
        ),
    ]
    v3_two = v4(
        "224.0.0.22", IGMPv3_MR(records=[IGMPv3_MR_Group(rtype=1, maddr="232.3.3.3", srcaddrs=many4[:2])])
    )
    lying = IGMPv3_MR(records=[IGMPv3_MR_Group(rtype=1, maddr="232.3.3.3", numsrc=5, srcaddrs=many4[:1])])
    nine = bytes(IGMP(type=0x11, mrcode=100, gaddr="0.0.0.0")) + b"\x00"
    frames += [
        flip(v4("224.0.0.2", IGMP(type=0x17, gaddr="239.1.1.1")), -5),  # IGMP checksum
        flip(v6("ff0e::3", ICMPv6MLReport(mladdr="ff0e::3")), -1),  # ICMPv6 checksum
        v3_two[:-4],  # IP total length past the frame
        v4("224.0.0.22", lying),  # a source count past the message
        bytes(Ether() / IP(src=q, dst="224.0.0.1", ttl=1, options=RA, proto=2) / nine),  # RFC 3376 7.1
        v4("224.0.0.1", IGMP(type=0x13, gaddr="0.0.0.0")),  # DVMRP: not for an IGMP router
        flip(v4("239.1.1.1", IGMP(type=0x16, gaddr="239.1.1.1")), 24),  # IPv4 header checksum
        v4("239.1.1.1", IGMP(type=0x16, gaddr="239.1.1.1"))[:-6],  # IGMP cut short
        bytes(Ether() / IP(src="10.0.0.2", dst="239.1.1.1", ttl=8) / UDP(sport=1, dport=5004) / b"data"),
        bytes(Ether() / IPv6(src="2001:db8::2", dst="ff0e::1:2") / UDP(sport=1, dport=5004) / b"data"),
        bytes(Ether() / IPv6(src="fe80::2", dst="ff02::1:ff00:1") / ICMPv6ND_NS(tgt="fe80::1")),
        bytes(Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.0.0.2", pdst="10.0.0.1")),
    ]
    return frames


def peer_stream() -> list[bytes]:
    """Peer messages over TCP port 7000: several in a segment, one cut across segments."""
    flow = TcpFlow(("198.18.1.1", 40000), ("198.18.1.2", 7000), (b"\x02" * 6, b"\x04" * 6), (100, 900))
    group = bytes((239, 1, 1, 1))
    hello = codec.encode(codec.Open("a", 24, "modulo", dead_interval=10))
    routes = codec.encode(codec.AddRoute((codec.Route(65793, group, "include", (bytes((192, 0, 2, 1)),)),)))
    packet = bytes(IP(src="169.254.1.1", dst="239.1.1.1", ttl=15) / UDP(sport=1, dport=2) / (b"x" * 1500))
    data = codec.encode(codec.IpData(65793, 1, packet))
    frames = flow.handshake()
    frames += flow.send(True, hello + codec.encode(codec.KeepAlive(1, 0, 0)))
    frames += flow.send(False, codec.encode(codec.Open("b", 24, "modulo", dead_interval=10)))
    frames += flow.send(True, routes + data)  # the IP-Data message spans two segments
    frames += flow.send(True, codec.encode(codec.Close(codec.CLOSE_NORMAL, "bye")))
    return frames


def write(path: Path, frames: list[bytes], linktype: int = ETHERNET) -> Path:
    """A pcap (or, for a .pcapng path, a pcapng written by dpkt) of `frames` in `linktype`."""
    timed = [(T0 + i * 1000, relink(f, linktype)) for i, f in enumerate(frames)]
    if path.suffix != ".pcapng":
        write_pcap(str(path), timed, linktype)
        return path
    with path.open("wb") as out:
        writer = pcapng.Writer(out, linktype=linktype)
        for ts_ns, data in timed:
            writer.writepkt(data, ts=ts_ns / 1e9)
    return path


def decode(path: Path) -> list[dict[str, Any]]:
    decoder = Decoder()
    with CaptureReader(str(path)) as reader:
        return [decoder.frame(frame) for frame in reader.frames()]


# -- tshark ---------------------------------------------------------------------------------


def tshark(path: Path, *options: str) -> list[dict[str, list[str]]]:
    """Per frame, each field's values, as tshark dissects the file."""
    require_tools("tshark")  # CI installs it: a missing tshark fails there, never skips
    argv = ["tshark", "-r", str(path), "-o", "ip.check_checksum:TRUE", *options, "-T", "fields"]
    argv += ["-E", "occurrence=a", "-E", "aggregator=|", "-E", "separator=/t"]
    for name in FIELDS:
        argv += ["-e", name]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout
    rows = []
    for line in out.splitlines():
        cells = line.split("\t")
        rows.append({name: cell.split("|") if cell else [] for name, cell in zip(FIELDS, cells, strict=True)})
    return rows


def one(row: dict[str, list[str]], name: str) -> str | None:
    values = row[name]
    return values[0] if values else None


def split_sources(counts: list[str], sources: list[str]) -> list[list[str]]:
    out, at = [], 0
    for n in counts:
        out.append(sources[at : at + int(n)])
        at += int(n)
    return out


def disagreements(ours: dict[str, Any], row: dict[str, list[str]]) -> list[str]:
    """Where our reading of a frame and tshark's differ; empty when they agree."""
    problems: list[str] = []

    def same(what: str, mine: Any, theirs: Any) -> None:
        if mine != theirs:
            problems.append(f"{what}: ours {mine!r}, tshark {theirs!r}")

    protocols = (one(row, "frame.protocols") or "").split(":")
    flagged = bool(row["_ws.malformed"]) or "0" in (
        row["igmp.checksum.status"] + row["icmpv6.checksum.status"] + row["ip.checksum.status"]
    )
    if "igmp" in protocols:
        same("protocol", ours["protocol"], "igmp")
        igmp(ours, row, same)
    elif "icmpv6" in protocols and one(row, "icmpv6.type") in MLD_TYPES:
        same("protocol", ours["protocol"], "mld")
        mld(ours, row, same)
    else:
        if ours["protocol"] in ("igmp", "mld"):
            problems.append(f"protocol: ours {ours['protocol']}, tshark {protocols}")
        if "cops" in protocols:
            same("protocol", ours["protocol"], "cops")
            same(
                "op-codes",
                [codec.MESSAGE_NAMES[int(c)] for c in row["cops.op_code"]],
                [m["type"] for m in ours["messages"]],
            )
            same("lengths", [int(n) for n in row["cops.msg_len"]], [m["length"] for m in ours["messages"]])
            same(
                "node names",
                row["cops.pepid.id"],
                [m["node"] for m in ours["messages"] if m["type"] == "open"],
            )
        return problems
    if flagged:
        same("malformed", ours["malformed"], True)
    elif (
        ours["malformed"] and ours["reason"] not in ("unknown_type",) and "query length" not in ours["detail"]
    ):
        problems.append(f"malformed: ours {ours['reason']} {ours['detail']}, tshark fine")
    return problems


def igmp(ours: dict[str, Any], row: dict[str, list[str]], same: Any) -> None:
    kind = one(row, "igmp.type")
    if kind is None:  # a protocol inside IGMP's numbers that tshark hands on (DVMRP)
        same("reason", ours.get("reason"), "unknown_type")
        return
    if ours["malformed"] and ours["type"] is None:
        return  # nothing could be read
    same("type", ours["type"], {"0x11": "query", "0x17": "leave"}.get(kind, "report"))
    if ours["malformed"] and ours["reason"] == "truncated" and "query length" in ours["detail"]:
        return  # RFC 3376 7.1: a 9-11 byte query has no version; tshark calls it v2
    same("version", ours["version"], int(one(row, "igmp.version") or 0))
    if ours["type"] == "report" and ours["version"] == 3:
        if not ours["malformed"]:
            same(
                "record types",
                [r["type"] for r in ours["records"]],
                [RECORD_NAMES[int(t)] for t in row["igmp.record_type"]],
            )
            same("record groups", [r["group"] for r in ours["records"]], row["igmp.maddr"])
            same(
                "record sources",
                [r["sources"] for r in ours["records"]],
                split_sources(row["igmp.num_src"], row["igmp.saddr"]),
            )
        return
    same("group", ours["group"], one(row, "igmp.maddr"))
    if ours["type"] == "query" and ours["version"] > 1:
        same("max_resp", round(ours["max_resp_s"] * 10), int(one(row, "igmp.max_resp") or -1))
    if ours["type"] == "query" and ours["version"] == 3:
        same("s_flag", int(ours["s_flag"]), int(one(row, "igmp.s") or -1))
        same("qrv", ours["qrv"], int(one(row, "igmp.qrv") or -1))
        same("qqic", ours["qqic"], int(one(row, "igmp.qqic") or -1))
        same("sources", ours["sources"], row["igmp.saddr"])


def mld(ours: dict[str, Any], row: dict[str, list[str]], same: Any) -> None:
    kind = one(row, "icmpv6.type")
    same("type", ours["type"], {"130": "query", "132": "done"}.get(kind or "", "report"))
    v2 = kind == "143" or (kind == "130" and bool(row["icmpv6.mld.maximum_response_code"]))
    same("version", ours["version"], 2 if v2 else 1)
    if kind == "143":
        same(
            "record types",
            [r["type"] for r in ours["records"]],
            [RECORD_NAMES[int(t)] for t in row["icmpv6.mldr.mar.record_type"]],
        )
        same("record groups", [r["group"] for r in ours["records"]], row["icmpv6.mldr.mar.multicast_address"])
        same(
            "record sources",
            [r["sources"] for r in ours["records"]],
            split_sources(row["icmpv6.mldr.mar.nb_sources"], row["icmpv6.mldr.mar.source_address"]),
        )
        return
    same("group", ours["group"], one(row, "icmpv6.mld.multicast_address"))
    if kind != "130":
        return
    delay = one(row, "icmpv6.mld.maximum_response_code" if v2 else "icmpv6.mld.maximum_response_delay")
    same("max_resp", round(ours["max_resp_s"] * 1000), int(delay or -1))
    if v2:
        same("s_flag", int(ours["s_flag"]), int(one(row, "icmpv6.mld.flag.s") or -1))
        same("qrv", ours["qrv"], int(one(row, "icmpv6.mld.flag.qrv") or -1))
        same("qqi", ours["qqi_s"], float(one(row, "icmpv6.mld.qqi") or -1))
        same("sources", ours["sources"], row["icmpv6.mld.source_address"])


def assert_agree(path: Path, *options: str) -> list[dict[str, Any]]:
    ours = decode(path)
    theirs = tshark(path, *options)
    assert len(ours) == len(theirs)
    problems = [
        f"frame {o['frame']}: {p}" for o, t in zip(ours, theirs, strict=True) for p in disagreements(o, t)
    ]
    assert not problems, "\n".join(problems)
    return ours


# -- crafted frames ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "linktype,suffix",
    [*((link, ".pcap") for link in (ETHERNET, LINUX_SLL, LINUX_SLL2, RAW_IP)), (LINUX_SLL2, ".pcapng")],
)
def test_crafted_frames_read_as_tshark_reads_them(tmp_path: Path, linktype: int, suffix: str) -> None:
    ours = assert_agree(write(tmp_path / f"crafted{suffix}", crafted(), linktype))
    kinds = {(o["protocol"], o["version"], o["type"]) for o in ours if not o["malformed"]}
    assert kinds >= {
        ("igmp", 1, "query"),
        ("igmp", 2, "query"),
        ("igmp", 3, "query"),
        ("igmp", 1, "report"),
        ("igmp", 2, "report"),
        ("igmp", 2, "leave"),
        ("igmp", 3, "report"),
        ("mld", 1, "query"),
        ("mld", 2, "query"),
        ("mld", 1, "report"),
        ("mld", 1, "done"),
        ("mld", 2, "report"),
    }
    names = {r["type"] for o in ours for r in o["records"]}
    assert names == set(RECORD_NAMES.values())
    assert max(len(o["sources"]) for o in ours) == 300
    malformed = [(o["frame"], o["reason"]) for o in ours if o["malformed"]]
    assert [r for _, r in malformed] == [
        "checksum",
        "checksum",
        "truncated",
        "truncated",
        "truncated",
        "unknown_type",
        "checksum",
        "truncated",
    ]
    assert [o["protocol"] for o in ours[-4:]] == ["data", "data", "other", "other"]


def test_every_frame_has_the_spec_keys_and_fields_that_could_be_read(tmp_path: Path) -> None:
    ours = decode(write(tmp_path / "crafted.pcap", crafted()))
    keys = {
        "frame",
        "protocol",
        "version",
        "type",
        "group",
        "max_resp_s",
        "records",
        "sources",
        "s_flag",
        "qrv",
        "qqic",
        "malformed",
    }
    assert all(keys <= set(o) for o in ours)
    assert [o["frame"] for o in ours] == list(range(1, len(ours) + 1))
    bad_checksum = ours[20]
    assert bad_checksum["malformed"] and bad_checksum["reason"] == "checksum"
    assert (bad_checksum["type"], bad_checksum["group"]) == ("leave", "239.1.1.1")  # still shown
    bad_header = ours[26]
    assert bad_header["reason"] == "checksum" and bad_header["type"] == "report"
    general = ours[3]
    assert (general["qrv"], general["qqic"], general["qqi_s"], general["s_flag"]) == (2, 125, 125.0, False)
    assert ours[4]["max_resp_s"] == 24.8 and ours[4]["qqi_s"] == 3072.0  # the exponent forms


def test_peer_messages_read_as_tshark_cops_reads_them(tmp_path: Path) -> None:
    ours = assert_agree(write(tmp_path / "peers.pcap", peer_stream()), "-d", "tcp.port==7000,cops")
    cops = [o for o in ours if o["protocol"] == "cops"]
    assert [[m["type"] for m in o["messages"]] for o in cops] == [
        ["open", "keepalive"],
        ["open"],
        ["add-route"],
        ["ip-data"],
        ["close"],
    ]
    assert cops[2]["pending"] > 0  # the start of the IP-Data waits for the next segment
    assert cops[2]["messages"][0]["routes"] == [
        {"overlay_address": 65793, "group": "239.1.1.1", "mode": "include", "sources": ["192.0.2.1"]}
    ]
    assert cops[3]["messages"][0]["src"] == "169.254.1.1" and cops[3]["group"] == "239.1.1.1"
    assert not any(o["malformed"] for o in ours)


def test_a_peer_stream_that_stops_framing_is_malformed_and_a_datagram_stands_alone(tmp_path: Path) -> None:
    flow = TcpFlow(("198.18.1.1", 40000), ("198.18.1.2", 9999), (b"\x02" * 6, b"\x04" * 6), (1, 2))
    hello = codec.encode(codec.Open("a", 24, "modulo"))
    frames = flow.send(True, hello + b"\x10\x03\x8c\xa5\xff\xff\xff\xff")  # impossible length
    keepalive = codec.encode(codec.KeepAlive(5, 0, 0))
    frames.append(
        bytes(Ether() / IP(src="198.18.1.1", dst="198.18.1.2") / UDP(sport=7001, dport=7001) / keepalive)
    )
    ours = decode(write(tmp_path / "bad.pcap", frames))
    assert ours[0]["protocol"] == "cops" and ours[0]["malformed"] and "out of range" in ours[0]["detail"]
    assert ours[0]["messages"][0]["node"] == "a"
    assert ours[1]["protocol"] == "cops" and ours[1]["type"] == "keepalive" and not ours[1]["malformed"]


def test_decoding_never_fails_on_damaged_frames(tmp_path: Path) -> None:
    """Every frame cut at every length, and with bytes flipped: a line each, no exception."""
    import random

    rng = random.Random(5)
    frames = crafted() + peer_stream()
    damaged = [f[:n] for f in frames[::3] for n in range(0, len(f), 7)]
    for f in frames:
        for _ in range(20):
            mutated = bytearray(f)
            mutated[rng.randrange(len(f))] = rng.randrange(256)
            damaged.append(bytes(mutated))
    for linktype in (ETHERNET, RAW_IP):
        ours = decode(write(tmp_path / "damaged.pcap", damaged, linktype))
        assert len(ours) == len(damaged)


def test_cli_prints_one_line_or_object_per_frame(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "crafted.pcap", crafted())
    assert main(["decode", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(crafted())
    assert "v3 report" in lines[9] and "CHANGE_TO_EXCLUDE_MODE 239.2.2.4" in lines[9]
    assert "MALFORMED checksum" in lines[20]
    assert main(["decode", str(path), "--json"]) == 0
    objects = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert objects == json.loads(json.dumps(decode(path)))


def test_a_damaged_capture_is_decoded_up_to_the_damage_then_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "crafted.pcap", crafted())
    whole = path.read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(whole[: len(whole) - 30])  # the last frame's data is cut short
    assert main(["decode", str(cut)]) == 2
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == len(crafted()) - 1
    assert err.strip() == f"mcmw decode: {cut}: frame {len(crafted())}: truncated packet data: 12 of 42 bytes"
    garbage = tmp_path / "garbage.pcap"
    garbage.write_bytes(b"this is not a capture")
    assert main(["decode", str(garbage)]) == 2
    assert "not a pcap or pcapng file" in capsys.readouterr().err


# -- a real host ---------------------------------------------------------------------------


class Capture:
    """tcpdump or dumpcap in a namespace, writing a file until stopped."""

    def __init__(self, lab: Lab, ns: str, path: Path, argv: list[str], ready: str) -> None:
        require_tools(argv[0])
        self.path = path
        self.proc = lab.popen(ns, argv)
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()  # raw reads: a buffered reader would hide lines from select
        deadline = time.monotonic() + 10
        seen = b""
        while ready.encode() not in seen:
            assert time.monotonic() < deadline, f"{argv[0]} did not start: {seen!r}"
            if select.select([fd], [], [], 0.5)[0]:
                seen += os.read(fd, 4096)

    def stop(self) -> Path:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)
        return self.path


def member_commands(lab: Lab, ns: str, script: list[str]) -> None:
    """Run mc_member.py's commands in `ns`, each line a command or 'sysctl KEY=VALUE' or 'sleep S'."""
    proc = lab.popen(
        ns, [sys.executable, str(APPS / "mc_member.py"), "mcmw0"], text=True, stdin=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    assert json.loads(proc.stdout.readline()).get("ready")
    for line in script:
        word, _, rest = line.partition(" ")
        if word == "sysctl":
            lab.exec(ns, ["sysctl", "-qw", rest])
        elif word == "sleep":
            time.sleep(float(rest))
        else:
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
            reply = json.loads(proc.stdout.readline())
            assert reply.get("ok"), reply
    proc.stdin.write("quit\n")
    proc.stdin.flush()
    proc.wait(timeout=5)


@pytest.mark.privileged
def test_a_linux_host_through_a_node_reads_as_tshark_reads_it(lab: Lab) -> None:
    """The kernel joins and leaves as IGMPv1, v2, v3 and MLDv1, v2 host on the TAP of a
    running node (which queries every 2 s); four captures of it, in each link type and
    file format tools make, must decode as tshark dissects them."""
    timers = {"query_interval": "2s", "query_response_interval": "1s"}
    sites = make_sites(lab, ["a"], [], node_options={"a": {"igmp": timers, "mld": timers}})
    ns, work = sites.ns["a"], lab.workdir
    captures = [
        Capture(
            lab,
            ns,
            work / "eth.pcap",
            ["tcpdump", "-i", "mcmw0", "-U", "-w", str(work / "eth.pcap")],
            "listening on",
        ),
        Capture(
            lab,
            ns,
            work / "sll.pcap",
            ["tcpdump", "-i", "any", "-y", "LINUX_SLL", "-U", "-w", str(work / "sll.pcap")],
            "listening on",
        ),
        Capture(
            lab,
            ns,
            work / "sll2.pcap",
            ["tcpdump", "-i", "any", "-y", "LINUX_SLL2", "-U", "-w", str(work / "sll2.pcap")],
            "listening on",
        ),
        Capture(
            lab,
            ns,
            work / "ng.pcapng",
            ["dumpcap", "-i", "mcmw0", "-w", str(work / "ng.pcapng")],
            "Capturing on",
        ),
    ]
    igmp_version = "net.ipv4.conf.mcmw0.force_igmp_version"
    mld_version = "net.ipv6.conf.mcmw0.force_mld_version"
    member_commands(
        lab,
        ns,
        [
            f"sysctl {igmp_version}=1",
            "join 239.10.1.1",
            "sleep 0.3",
            f"sysctl {igmp_version}=2",
            "join 239.10.2.1",
            "sleep 0.3",
            "leave 239.10.2.1",
            f"sysctl {igmp_version}=0",
            "join 239.10.3.1",
            "source-join 232.10.3.2 192.0.2.1",
            "block 239.10.3.1 192.0.2.7",
            "sleep 0.3",
            "leave 239.10.3.1",
            "source-leave 232.10.3.2 192.0.2.1",
            f"sysctl {mld_version}=1",
            "join ff0e::10:1",
            "sleep 0.3",
            "leave ff0e::10:1",
            f"sysctl {mld_version}=0",
            "join ff0e::10:2",
            "source-join ff0e::10:3 2001:db8::1",
            "sleep 0.3",
            "leave ff0e::10:2",
        ],
    )

    def queried() -> bool:
        """A general query of each family, sent after the last command, is in the capture."""
        try:
            seen = decode(captures[0].path)
        except UsageError:  # CaptureError: tcpdump is in the middle of a record
            return False
        return all(
            any(o["protocol"] == p and o["type"] == "query" and o["time"] >= last for o in seen)
            for p in ("igmp", "mld")
        )

    # The node queries every 2 s: wait for the next general queries (and the answers).
    last = decode(captures[0].path)[-1]["time"]
    wait_for(queried, 5, "general queries after the last command")
    kinds: set[tuple[str, int, str]] = set()
    for capture in captures:
        ours = assert_agree(capture.stop())
        kinds |= {(o["protocol"], o["version"], o["type"]) for o in ours if o["protocol"] in ("igmp", "mld")}
    assert kinds >= {
        ("igmp", 1, "report"),
        ("igmp", 2, "report"),
        ("igmp", 2, "leave"),
        ("igmp", 3, "report"),
        ("igmp", 3, "query"),
        ("mld", 1, "report"),
        ("mld", 1, "done"),
        ("mld", 2, "report"),
        ("mld", 2, "query"),
    }
    assert wait_for(lambda: sites.status("a"), 2, "status")  # the node is still serving
    assert os.path.getsize(captures[0].path) > 0
