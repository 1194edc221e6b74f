"""Reading and writing captures: pcap (both byte orders, micro- and nanoseconds), pcapng
(several interfaces and sections, timestamp resolutions, simple packet blocks), the link
types (Ethernet with VLAN tags, Linux cooked v1/v2, raw IP), damage reported with the
frame number, the made-up TCP flows of `replay --out`, and the progress bar."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pytest
from dpkt import pcapng
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Dot1Q, Ether

from mcmw.capture import (
    ETHERNET,
    LINUX_SLL,
    LINUX_SLL2,
    RAW_IP,
    CaptureError,
    CaptureReader,
    Frame,
    Progress,
    TcpFlow,
    ethernet_frame,
    link_layer,
    relink,
    write_pcap,
)

T0 = 1_700_000_000_123_456_789
FRAME = bytes(
    Ether(src="02:00:00:00:00:07", dst="01:00:5e:01:01:01") / IP(src="10.0.0.7", dst="239.1.1.1") / UDP()
)


def read(path: Path) -> list[Frame]:
    with CaptureReader(str(path)) as reader:
        return list(reader.frames())


def damage(path: Path) -> tuple[list[Frame], str]:
    frames: list[Frame] = []
    with CaptureReader(str(path)) as reader, pytest.raises(CaptureError) as caught:
        for frame in reader.frames():
            frames.append(frame)
    return frames, str(caught.value)


# -- pcap ---------------------------------------------------------------------------------


def test_written_frames_read_back_exactly(tmp_path: Path) -> None:
    path = tmp_path / "a.pcap"
    frames = [(T0 + i * 1_000_000_001, FRAME + bytes(i)) for i in range(5)]
    assert write_pcap(str(path), frames) == 5
    got = read(path)
    assert [(f.number, f.ts_ns, f.data, f.linktype) for f in got] == [
        (i + 1, ts, data, ETHERNET) for i, (ts, data) in enumerate(frames)
    ]
    assert got[0].time == pytest.approx(T0 / 1e9) and not got[0].snapped


def test_big_endian_microsecond_pcap_and_cut_frames(tmp_path: Path) -> None:
    path = tmp_path / "be.pcap"
    head = struct.pack(">IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 64, ETHERNET)
    record = struct.pack(">IIII", 1_700_000_000, 250_000, 64, 1500) + FRAME.ljust(64, b"\0")
    path.write_bytes(head + record)
    (frame,) = read(path)
    assert frame.ts_ns == 1_700_000_000_250_000_000
    assert frame.orig_len == 1500 and frame.snapped


# -- pcapng -------------------------------------------------------------------------------


def block(kind: int, body: bytes) -> bytes:
    length = 12 + len(body)
    return struct.pack("<II", kind, length) + body + struct.pack("<I", length)


def option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value.ljust(-(-len(value) // 4) * 4, b"\0")


def shb() -> bytes:
    return block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))


def idb(linktype: int, options: bytes = b"") -> bytes:
    end = option(0, b"") if options else b""
    return block(1, struct.pack("<HHI", linktype, 0, 0) + options + end)


def epb(interface: int, ticks: int, data: bytes) -> bytes:
    head = struct.pack("<IIIII", interface, ticks >> 32, ticks & 0xFFFFFFFF, len(data), len(data))
    return block(6, head + data.ljust(-(-len(data) // 4) * 4, b"\0"))


def test_pcapng_interfaces_resolutions_sections_and_simple_blocks(tmp_path: Path) -> None:
    path = tmp_path / "a.pcapng"
    nanos = option(9, b"\x09")  # if_tsresol: 10^-9
    binary = option(9, b"\x8a") + option(14, struct.pack("<q", 100))  # 2^-10 s, offset 100 s
    raw = FRAME[14:]
    path.write_bytes(
        shb()
        + idb(ETHERNET, nanos)
        + idb(RAW_IP, binary)
        + epb(0, T0, FRAME)
        + block(0x0BAD, b"\0" * 8)  # a block type we skip
        + epb(1, 2048, raw)
        + block(3, struct.pack("<I", len(FRAME)) + FRAME.ljust(-(-len(FRAME) // 4) * 4, b"\0"))
        + shb()
        + idb(LINUX_SLL)  # a new section: interfaces start again, microseconds by default
        + epb(0, 1_700_000_000_000_001, relink(FRAME, LINUX_SLL))
    )
    frames = read(path)
    assert [(f.linktype, f.ts_ns) for f in frames] == [
        (ETHERNET, T0),
        (RAW_IP, (100 + 2) * 10**9),
        (ETHERNET, (100 + 2) * 10**9),  # a simple packet block has no time: the last one's
        (LINUX_SLL, 1_700_000_000_000_001_000),
    ]
    assert frames[1].data == raw and frames[2].data == FRAME


def test_pcapng_written_by_dpkt(tmp_path: Path) -> None:
    path = tmp_path / "dpkt.pcapng"
    with open(path, "wb") as out:
        writer = pcapng.Writer(out, linktype=ETHERNET)
        writer.writepkt(FRAME, ts=1_700_000_000.5)
    (frame,) = read(path)
    assert frame.data == FRAME and frame.ts_ns == 1_700_000_000_500_000_000


# -- damage -------------------------------------------------------------------------------


def test_damage_is_reported_with_the_frame_number_after_the_frames_before_it(tmp_path: Path) -> None:
    path = tmp_path / "a.pcap"
    write_pcap(str(path), [(T0, FRAME), (T0 + 1, FRAME), (T0 + 2, FRAME)])
    whole = path.read_bytes()
    cases = {
        whole[:-5]: f"{path}: frame 3: truncated packet data: {len(FRAME) - 5} of {len(FRAME)} bytes",
        whole[: 24 + 2 * (16 + len(FRAME)) + 7]: f"{path}: frame 3: truncated record header: 7 of 16 bytes",
        whole[: 24 + 16 + len(FRAME)] + struct.pack("<IIII", 0, 0, 10**9, 10**9): (
            f"{path}: frame 2: record length 1000000000 is impossible (snaplen 262144)"
        ),
    }
    for content, message in cases.items():
        path.write_bytes(content)
        frames, error = damage(path)
        assert error == message
        assert len(frames) == int(message.split("frame ")[1].split(":")[0]) - 1


def test_pcapng_damage(tmp_path: Path) -> None:
    path = tmp_path / "a.pcapng"
    good = shb() + idb(ETHERNET) + epb(0, 1, FRAME)
    bad_trailer = bytearray(epb(0, 2, FRAME))
    bad_trailer[-4:] = struct.pack("<I", 4096)
    cases = {
        good + epb(0, 2, FRAME)[:-9]: "frame 2: truncated block of",
        good + bytes(bad_trailer): "frame 2: block type 0x6 does not parse: length fields do not match",
        good + epb(3, 2, FRAME): "frame 2: packet on interface 3, which is not described",
        good + struct.pack("<II", 6, 7): "frame 2: block length 7 is impossible",
        shb() + idb(105) + epb(0, 1, FRAME): "frame 1: link type 105 is not supported",
    }
    for content, message in cases.items():
        path.write_bytes(content)
        _, error = damage(path)
        assert message in error


def test_files_that_are_not_captures(tmp_path: Path) -> None:
    for content, message in (
        (b"", "not a capture: 0 bytes long"),
        (b"GIF89a and more", "not a pcap or pcapng file (starts with 47494638)"),
        (b"\xd4\xc3\xb2\xa1\x02\x00", "truncated pcap file header"),
    ):
        path = tmp_path / "x.pcap"
        path.write_bytes(content)
        assert damage(path)[1] == f"{path}: {message}"
    with pytest.raises(CaptureError, match="cannot read: No such file"):
        CaptureReader(str(tmp_path / "missing.pcap"))


# -- link layers --------------------------------------------------------------------------


@pytest.mark.parametrize("linktype", [ETHERNET, LINUX_SLL, LINUX_SLL2, RAW_IP])
def test_link_types_give_the_packet_and_an_ethernet_frame_for_the_tap(linktype: int) -> None:
    frame = Frame(1, T0, linktype, relink(FRAME, linktype), len(FRAME))
    link = link_layer(frame)
    assert link is not None and link.ethertype == 0x0800 and link.payload == FRAME[14:]
    assert link.src == (None if linktype == RAW_IP else FRAME[6:12])
    assert link.outgoing == (True if linktype in (LINUX_SLL, LINUX_SLL2) else None)
    rebuilt = ethernet_frame(frame)
    assert rebuilt is not None and rebuilt[12:] == FRAME[12:]
    assert rebuilt[:6] == bytes.fromhex("01005e010101")  # the group's MAC, made up when not kept


def test_vlan_tags_are_looked_through_and_short_frames_are_none() -> None:
    tagged = bytes(Ether() / Dot1Q(vlan=7) / Dot1Q(vlan=8) / IP(dst="239.1.1.1") / UDP())
    link = link_layer(Frame(1, 0, ETHERNET, tagged, len(tagged)))
    assert link is not None and link.ethertype == 0x0800 and link.payload == tagged[22:]
    assert link_layer(Frame(1, 0, ETHERNET, tagged[:10], 10)) is None
    assert link_layer(Frame(1, 0, LINUX_SLL2, b"\0" * 12, 12)) is None
    assert (
        ethernet_frame(Frame(1, 0, LINUX_SLL, relink(bytes(Ether(type=0x0806) / b"arp"), LINUX_SLL), 0))
        is None
    )


# -- writing a TCP flow -------------------------------------------------------------------


@pytest.mark.parametrize("hosts", [("198.18.1.1", "198.18.1.2"), ("2001:db8::1", "2001:db8::2")])
def test_made_up_tcp_flows_have_consistent_numbers_and_checksums(hosts: tuple[str, str]) -> None:
    flow = TcpFlow((hosts[0], 40000), (hosts[1], 7000), (b"\x02" * 6, b"\x04" * 6), (0xFFFFFFF0, 1000))
    frames = flow.handshake() + flow.send(True, b"a" * 3000) + flow.send(False, b"b" * 10)
    segments = [Ether(f)[TCP] for f in frames]
    assert [str(s.flags) for s in segments] == ["S", "SA", "A", "PA", "PA", "PA", "PA"]
    assert [len(s.payload) for s in segments[3:]] == [1400, 1400, 200, 10]
    assert segments[4].seq == (segments[3].seq + 1400) & 0xFFFFFFFF  # wraps around 2^32
    assert segments[6].ack == (segments[5].seq + 200) & 0xFFFFFFFF
    for frame in frames:
        packet = Ether(frame)
        checksum = packet[TCP].chksum
        del packet[TCP].chksum
        assert Ether(bytes(packet))[TCP].chksum == checksum


# -- progress -----------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_drawn_on_a_terminal_only() -> None:
    pipe = io.StringIO()
    bar = Progress("decode", 100, pipe)
    bar.update(50)
    bar.close()
    assert pipe.getvalue() == ""
    term = Terminal()
    bar = Progress("decode", 100, term)
    bar.update(50, "frame 7")
    bar.close()
    assert "decode [###############               ]  50% frame 7" in term.getvalue()
    assert term.getvalue().endswith("\r\x1b[K")
