"""TAP writes in UDP trains (tap/offload.py): which frames are coalesced, that the kernel's
split gives back exactly the datagrams that went in, and the same on a real kernel, both
at a local socket and on a LAN behind a bridge, with checksums a capture verifies."""

from __future__ import annotations

import ipaddress
import json
import os
import platform
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcmw.lab import Lab
from tap.offload import GSO_UDP_L4, MAX_SEGMENTS, NEEDS_CSUM, PLAIN, VNET_HEADER, tap_writes
from tests.netlab import require_tools

REPO = Path(__file__).resolve().parent.parent
MAC = bytes.fromhex("01005e090909") + bytes.fromhex("020000000001")


def fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def udp_checksum(pseudo: bytes, udp: bytes) -> int:
    value = ~fold(sum16(pseudo) + sum16(udp)) & 0xFFFF
    return value or 0xFFFF


def v4_frame(
    payload: bytes,
    ident: int = 0,
    df: bool = True,
    ttl: int = 16,
    sport: int = 40000,
    src: str = "10.77.0.2",
    options: bytes = b"",
    proto: int = 17,
    frag: int = 0,
) -> bytes:
    """An IPv4/UDP multicast frame to 239.9.9.9:5001 with correct checksums."""
    s, d = socket.inet_aton(src), socket.inet_aton("239.9.9.9")
    udp_len = 8 + len(payload)
    udp = struct.pack("!HHHH", sport, 5001, udp_len, 0) + payload
    check = udp_checksum(s + d + struct.pack("!BBH", 0, 17, udp_len), udp)
    udp = udp[:6] + struct.pack("!H", check) + udp[8:]
    ihl = 5 + len(options) // 4
    head = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0x20,
        ihl * 4 + udp_len,
        ident & 0xFFFF,
        (0x4000 if df else 0) | frag,
        ttl,
        proto,
        0,
        s,
        d,
    )
    head += options
    head = head[:10] + struct.pack("!H", ~fold(sum16(head)) & 0xFFFF) + head[12:]
    return MAC + b"\x08\x00" + head + udp


def v6_frame(payload: bytes, hop_limit: int = 16, next_header: int = 17) -> bytes:
    """An IPv6/UDP multicast frame to ff15::9:5001 with a correct checksum."""
    s, d = socket.inet_pton(socket.AF_INET6, "fd00::2"), socket.inet_pton(socket.AF_INET6, "ff15::9")
    udp_len = 8 + len(payload)
    udp = struct.pack("!HHHH", 40000, 5001, udp_len, 0) + payload
    check = udp_checksum(s + d + struct.pack("!IxxxB", udp_len, 17), udp)
    udp = udp[:6] + struct.pack("!H", check) + udp[8:]
    head = struct.pack("!IHBB16s16s", 0x60012345, udp_len, next_header, hop_limit, s, d)
    return bytes.fromhex("333300000009020000000001") + b"\x86\xdd" + head + udp


def split(buffers: list[bytes]) -> list[bytes]:
    """What the kernel makes of one TAP write (skb_gso_segment of a UDP_L4 train, with
    the checksum completed as a device or skb_checksum_help would)."""
    vnet = VNET_HEADER.unpack(buffers[0])
    if buffers[0] == PLAIN:
        assert len(buffers) == 2
        return [bytes(buffers[1])]
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = vnet
    assert (flags, gso_type, csum_offset) == (NEEDS_CSUM, GSO_UDP_L4, 6)
    head, payload = bytes(buffers[1]), b"".join(bytes(b) for b in buffers[2:])
    assert len(head) == hdr_len and csum_start == hdr_len - 8
    v4 = head[12:14] == b"\x08\x00"
    ip = head[14 : hdr_len - 8]
    udp = head[hdr_len - 8 :]
    # The train must be a well-formed packet of its own: IP length and header checksum.
    if v4:
        assert struct.unpack("!H", ip[2:4])[0] == len(ip) + 8 + len(payload)
        assert fold(sum16(ip)) == 0xFFFF
    else:
        assert struct.unpack("!H", ip[4:6])[0] == 8 + len(payload)
    super_len, partial = struct.unpack("!HH", udp[4:8])
    assert super_len == 8 + len(payload)
    frames = []
    for index, start in enumerate(range(0, len(payload), gso_size)):
        piece = payload[start : start + gso_size]
        new_len = 8 + len(piece)
        # __udp_gso_segment: check = csum16_add(csum16_sub(uh->check, uh->len), newlen)
        check = fold(partial + (~super_len & 0xFFFF) + new_len)
        final = ~fold(check + sum16(udp[:4] + struct.pack("!HH", new_len, 0) + piece)) & 0xFFFF
        seg_udp = udp[:4] + struct.pack("!HH", new_len, final or 0xFFFF)
        if v4:
            ident = (struct.unpack("!H", ip[4:6])[0] + index) & 0xFFFF
            seg_ip = ip[:2] + struct.pack("!HH", 20 + new_len, ident) + ip[6:10] + b"\0\0" + ip[12:]
            seg_ip = seg_ip[:10] + struct.pack("!H", ~fold(sum16(seg_ip)) & 0xFFFF) + seg_ip[12:]
        else:
            seg_ip = ip[:4] + struct.pack("!H", new_len) + ip[6:]
        frames.append(head[:14] + seg_ip + seg_udp + piece)
    return frames


def without_ident(frame: bytes) -> bytes:
    """A DF datagram with its identification (and so its header checksum) set aside."""
    if len(frame) >= 34 and frame[12:14] == b"\x08\x00" and frame[20] & 0x40:
        return frame[:18] + frame[20:24] + frame[26:]
    return frame


def written(frames: list[bytes]) -> list[bytes]:
    """The datagrams the kernel delivers for tap_writes(frames), checking that the writes
    cover the frames in order."""
    out, position = [], 0
    for start, end, buffers in tap_writes(frames):
        assert start == position and end > start
        pieces = split(buffers)
        assert len(pieces) == end - start
        out += pieces
        position = end
    assert position == len(frames)
    return out


def payloads(count: int, size: int = 1316) -> list[bytes]:
    return [struct.pack("!I", i) * (size // 4) + bytes(size % 4) for i in range(count)]


def test_a_constant_bitrate_run_is_one_write_and_splits_back_into_its_datagrams() -> None:
    frames = [v4_frame(p) for p in payloads(48)]  # DF, identification 0: as Linux sends them
    writes = tap_writes(frames)
    assert [(s, e) for s, e, _ in writes] == [(0, 48)]
    vnet = VNET_HEADER.unpack(writes[0][2][0])
    assert vnet == (NEEDS_CSUM, GSO_UDP_L4, 42, 1316, 34, 6)
    assert [without_ident(f) for f in written(frames)] == [without_ident(f) for f in frames]


def test_identifications_counting_up_come_back_exactly() -> None:
    frames = [v4_frame(p, ident=65530 + i, df=False) for i, p in enumerate(payloads(20))]
    assert len(tap_writes(frames)) == 1
    assert written(frames) == frames


def test_ipv6_run_is_one_write_and_splits_back_exactly() -> None:
    frames = [v6_frame(p) for p in payloads(30, 1200)]
    writes = tap_writes(frames)
    assert [(s, e) for s, e, _ in writes] == [(0, 30)]
    assert VNET_HEADER.unpack(writes[0][2][0])[2:5] == (62, 1200, 54)
    assert written(frames) == frames


def test_datagrams_the_split_would_change_are_written_as_they_came() -> None:
    base = payloads(2)
    cases = {
        "sizes differ": [v4_frame(base[0]), v4_frame(base[1][:-4])],
        "identifications not counting up": [v4_frame(base[0], 7, df=False), v4_frame(base[1], 9, df=False)],
        "TTL differs": [v4_frame(base[0]), v4_frame(base[1], ttl=15)],
        "another source port": [v4_frame(base[0]), v4_frame(base[1], sport=40001)],
        "another source": [v4_frame(base[0]), v4_frame(base[1], src="10.77.0.3")],
        "a fragment": [v4_frame(base[0], df=False, frag=0x2000), v4_frame(base[1], 1, df=False, frag=0x2000)],
        "IP options": [
            v4_frame(base[0], options=b"\x94\x04\0\0"),
            v4_frame(base[1], options=b"\x94\x04\0\0"),
        ],
        "not UDP": [v4_frame(base[0], proto=6), v4_frame(base[1], proto=6)],
        "IPv6 extension header": [v6_frame(base[0], next_header=0), v6_frame(base[1], next_header=0)],
        "IPv6 hop limit differs": [v6_frame(base[0]), v6_frame(base[1], hop_limit=3)],
        "not IP": [MAC + b"\x08\x06" + bytes(28), MAC + b"\x08\x06" + bytes(28)],
        "runt": [MAC + b"\x08\x00\x45", MAC + b"\x08\x00\x45"],
    }
    for why, frames in cases.items():
        writes = tap_writes(frames)
        assert [(s, e) for s, e, _ in writes] == [(0, 1), (1, 2)], why
        assert [b for _, _, (vnet, b) in writes] == frames and writes[0][2][0] == PLAIN, why


def test_trains_stop_at_the_kernels_segment_and_size_limits() -> None:
    frames = [v4_frame(p) for p in payloads(150, 100)]
    assert [(s, e) for s, e, _ in tap_writes(frames)] == [(0, MAX_SEGMENTS), (64, 128), (128, 150)]
    big = [v4_frame(p) for p in payloads(20, 8000)]  # 8 fit one 64 KiB IP packet
    assert [(s, e) for s, e, _ in tap_writes(big)] == [(0, 8), (8, 16), (16, 20)]
    assert [without_ident(f) for f in written(big)] == [without_ident(f) for f in big]


flows = st.sampled_from(
    [
        lambda p, i: v4_frame(p),
        lambda p, i: v4_frame(p, ttl=2),
        lambda p, i: v4_frame(p, ident=i, df=False),
        lambda p, i: v4_frame(p, sport=1),
        lambda p, i: v6_frame(p),
        lambda p, i: MAC + b"\x08\x00" + p,
    ]
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(flows, st.sampled_from([1, 2, 40, 1316])), max_size=90))
def test_any_mix_of_frames_comes_back_in_order(spec: list) -> None:  # type: ignore[type-arg]
    frames = [make(bytes([i % 256]) * size, i) for i, (make, size) in enumerate(spec)]
    assert [without_ident(f) for f in written(frames)] == [without_ident(f) for f in frames]


# -- on a real kernel ---------------------------------------------------------------

WRITER = r"""
import ipaddress, json, socket, struct, sys, time
from tap.device import TapDevice
from tests.test_tap_offload import payloads, v4_frame, v6_frame
count = int(sys.argv[1])
tap = TapDevice("t0", ipaddress.IPv4Interface("10.77.0.1/24"), ipv6_scopes=[5], bridge="br0")
tap.open()
r4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
r4.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
r4.bind(("239.9.9.9", 5001))
join4 = socket.inet_aton("239.9.9.9") + socket.inet_aton("10.77.0.1")
r4.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, join4)
r6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
r6.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
r6.bind(("ff15::9", 5001))
index = socket.if_nametoindex("br0")
join6 = socket.inet_pton(socket.AF_INET6, "ff15::9") + struct.pack("@I", index)
r6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, join6)
for s in (r4, r6):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.settimeout(3)
print(json.dumps({"ready": True}), flush=True)
sys.stdin.readline()  # the capture on the LAN is running
frames = [v4_frame(p, src="10.77.0.2") for p in payloads(count)]
frames += [v6_frame(p) for p in payloads(count, 1200)]
dropped = tap.write_frames(frames)
got = {}
for name, s in (("v4", r4), ("v6", r6)):
    got[name] = []
    try:
        while len(got[name]) < count:
            got[name].append(s.recv(4096).hex())
    except TimeoutError:
        pass
print(json.dumps({"dropped": dropped, "trains": tap.trains, "got": got}), flush=True)
tap.close()
"""

CAPTURE = r"""
import json, socket, sys, time
expect = int(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((sys.argv[1], 0))
s.settimeout(0.2)
print(json.dumps({"ready": True}), flush=True)
frames, deadline = [], time.monotonic() + 5
while len(frames) < expect and time.monotonic() < deadline:
    try:
        frame = s.recv(65536)
    except TimeoutError:
        continue
    if frame[12:14] == b"\x08\x00" and frame[23] == 17 or frame[12:14] == b"\x86\xdd" and frame[20] == 17:
        frames.append(frame.hex())
print(json.dumps({"frames": frames}), flush=True)
"""


def test_trains_reach_local_sockets_and_a_lan_as_the_datagrams_written(lab: Lab) -> None:
    """Namespace w: bridge br0 (no snooping: everything floods) with the node's TAP and a
    veth to namespace p, whose end in w does neither checksums nor segmentation, so that
    what p captures is what a plain NIC would put on the wire."""
    require_tools("ethtool")
    w, p = lab.ns("w"), lab.ns("p")
    lab.exec(w, ["ip", "link", "add", "br0", "type", "bridge", "mcast_snooping", "0"])
    lab.exec(w, ["ip", "link", "set", "br0", "up"])
    lab.sysctl(w, **{"net.ipv6.conf.br0.accept_dad": 0})
    lan, far = lab.veth(w, "10.78.0.1/24", p, "10.78.0.2/24")
    lab.exec(w, ["ip", "addr", "flush", "dev", lan])
    lab.exec(w, ["ip", "link", "set", lan, "master", "br0"])
    lab.exec(w, ["ethtool", "-K", lan, "tx", "off", "tx-udp-segmentation", "off"])
    count = 40
    capture = lab.start_ready(p, [sys.executable, "-c", CAPTURE, far, str(2 * count)])
    writer = lab.python(w, WRITER, str(count), text=True, stdin=subprocess.PIPE, cwd=REPO)
    assert writer.stdout is not None and writer.stdin is not None
    assert json.loads(writer.stdout.readline()).get("ready"), writer.stderr.read() if writer.stderr else ""
    writer.stdin.write("go\n")
    writer.stdin.flush()
    result = json.loads(writer.stdout.readline() or "{}")
    captured = json.loads(capture.communicate(timeout=15)[0].strip().splitlines()[-1])["frames"]

    # Linux takes UDP trains from a TAP since 6.2; before, the node writes frame by frame.
    release = re.match(r"(\d+)\.(\d+)", platform.release())
    assert release is not None
    assert result["trains"] is ((int(release[1]), int(release[2])) >= (6, 2))
    assert result["dropped"] == 0
    # Local sockets: every datagram, in order, with its payload.
    assert [bytes.fromhex(d) for d in result["got"]["v4"]] == payloads(count)
    assert [bytes.fromhex(d) for d in result["got"]["v6"]] == payloads(count, 1200)
    # The LAN: datagrams as written (a DF datagram's identification aside), checksums valid.
    frames = [bytes.fromhex(f) for f in captured]
    sent = [v4_frame(q, src="10.77.0.2") for q in payloads(count)] + [
        v6_frame(q) for q in payloads(count, 1200)
    ]
    assert [without_ident(f) for f in frames] == [without_ident(f) for f in sent]
    for frame in frames[:count]:
        assert fold(sum16(frame[14:34])) == 0xFFFF  # IPv4 header checksum


def test_a_kernel_that_refuses_trains_gets_every_frame_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before Linux 6.2 a TAP refuses a UDP_L4 frame with EINVAL: the device then writes
    that train's frames, and every later one, frame by frame, and loses none."""
    import errno

    from tap.device import TapDevice

    writes: list[list[bytes]] = []

    def writev(fd: int, buffers: list[bytes]) -> int:
        if buffers[0] != PLAIN:
            raise OSError(errno.EINVAL, "Invalid argument")
        writes.append([bytes(b) for b in buffers])
        return sum(len(b) for b in buffers)

    monkeypatch.setattr(os, "writev", writev)
    tap = TapDevice("t0", ipaddress.IPv4Interface("10.77.0.1/24"))
    frames = [v4_frame(p) for p in payloads(5)]
    assert tap.write_frames(frames) == 0
    assert not tap.trains
    assert tap.write_frames(frames) == 0
    assert writes == [[PLAIN, f] for f in frames + frames]


def test_a_refusing_kernel_loses_no_frame_of_later_trains_in_the_same_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two trains in one call: the first refusal turns trains off, and the second train,
    already built, goes in frame by frame too instead of being counted as dropped."""
    import errno

    from tap.device import TapDevice

    written: list[bytes] = []

    def writev(fd: int, buffers: list[bytes]) -> int:
        if buffers[0] != PLAIN:
            raise OSError(errno.EINVAL, "Invalid argument")
        written.append(bytes(buffers[1]))
        return sum(len(b) for b in buffers)

    monkeypatch.setattr(os, "writev", writev)
    tap = TapDevice("t0", ipaddress.IPv4Interface("10.77.0.1/24"))
    frames = [v4_frame(p) for p in payloads(4)] + [v4_frame(p, sport=40001) for p in payloads(4)]
    assert tap.write_frames(frames) == 0
    assert written == frames
