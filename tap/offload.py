"""TAP writes with UDP segmentation offload: runs of like datagrams as one write.

The TAP is opened with a virtio-net header (IFF_VNET_HDR) in front of every frame. A
frame written with the header's GSO type UDP_L4 (Linux >= 6.2 takes it from a TAP) is a
train: one Ethernet/IP/UDP header and the payloads of several datagrams back to back,
which the kernel splits into datagrams of `gso_size` bytes where it needs them (at the
receiving socket, or before a device that cannot take the train). One write then carries
what took one write per datagram: a constant-bitrate stream (video, one sender, one size)
arrives at a node in runs of exactly such datagrams.

Only datagrams the split gives back unchanged are coalesced: one flow (addresses, ports,
TOS or traffic class, TTL or hop limit, DF), one size, no IP options or extension
headers, not fragments, and for IPv4 identifications that count up one by one as the
split numbers them; a datagram with DF set is atomic and its identification is not
looked at (RFC 6864 4.1), as the kernel itself sends such datagrams with identification
0. Everything else is written as it came, one frame per write. Sans-IO: `tap_writes`
turns frames into the buffers of each write; the device does the writing.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from tap.ethernet import ETH_HEADER_LEN

# struct virtio_net_hdr (linux/virtio_net.h): flags, gso_type, hdr_len, gso_size,
# csum_start, csum_offset, in the host's byte order (a TAP without TUNSETVNETLE/BE).
VNET_HEADER = struct.Struct("=BBHHHH")
VNET_HEADER_LEN = VNET_HEADER.size  # 10
PLAIN = bytes(VNET_HEADER_LEN)  # GSO_NONE: the frame is one packet, checksums done
NEEDS_CSUM, GSO_UDP_L4 = 1, 5
# UDP_MAX_SEGMENTS before Linux 6.9 (later 128); the kernel refuses a train of more.
MAX_SEGMENTS = 64
MAX_IP_LEN = 65535  # the train is one IP packet before it is split

V4_UDP = ETH_HEADER_LEN + 20 + 8  # payload offset: no IP options
V6_UDP = ETH_HEADER_LEN + 40 + 8  # no extension headers
_HEADS = struct.Struct("!HH")  # UDP length, checksum


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _sum16(data: bytes) -> int:
    return sum(struct.unpack(f"!{len(data) // 2}H", data))


def tap_writes(frames: Sequence[bytes], trains: bool = True) -> list[tuple[int, int, list[bytes]]]:
    """The TAP writes for `frames`, in order: (first frame, end, the write's buffers);
    without `trains`, one write per frame."""
    writes: list[tuple[int, int, list[bytes]]] = []
    index, count = 0, len(frames)
    while index < count:
        first = frames[index]
        end = index + 1
        if trains and count - end:
            kind = first[12:14]
            if kind == b"\x08\x00":
                end = _v4_run(frames, index)
            elif kind == b"\x86\xdd":
                end = _v6_run(frames, index)
        if end - index > 1:
            writes.append((index, end, _train(frames, index, end)))
        else:
            writes.append((index, end, [PLAIN, first]))
        index = end
    return writes


def _v4_run(frames: Sequence[bytes], index: int) -> int:
    """The end of the run of coalescible IPv4/UDP datagrams from `index` (index + 1: none)."""
    first = frames[index]
    size = len(first)
    if (
        size <= V4_UDP
        or first[14] != 0x45  # version 4, no options
        or first[23] != 17
        or first[20] & 0x3F  # MF or a fragment offset
        or first[21]
        or (first[16] << 8) | first[17] != size - ETH_HEADER_LEN
        or (first[38] << 8) | first[39] != size - ETH_HEADER_LEN - 20
    ):
        return index + 1
    limit = min(len(frames), index + MAX_SEGMENTS, index + (MAX_IP_LEN - 28) // (size - V4_UDP))
    df = first[20] & 0x40  # DF: atomic (RFC 6864), the identification is not looked at
    ident = (first[18] << 8) | first[19]
    whole, head, middle, tail = first[:40], first[:18], first[20:24], first[26:40]
    end = index + 1
    for frame in frames[end:limit]:
        if len(frame) != size:
            break
        if frame[:40] == whole:  # the kernel's own DF datagrams: identical headers
            if not df:
                break  # without DF an equal identification is not the next one
        elif (
            frame[:18] != head
            or frame[20:24] != middle
            or frame[26:40] != tail
            or (not df and (frame[18] << 8) | frame[19] != (ident + end - index) & 0xFFFF)
        ):
            break
        end += 1
    return end


def _v6_run(frames: Sequence[bytes], index: int) -> int:
    """The end of the run of coalescible IPv6/UDP datagrams from `index`."""
    first = frames[index]
    size = len(first)
    if (
        size <= V6_UDP
        or first[14] >> 4 != 6
        or first[20] != 17  # UDP right after the fixed header
        or (first[18] << 8) | first[19] != size - ETH_HEADER_LEN - 40
        or (first[58] << 8) | first[59] != size - ETH_HEADER_LEN - 40
    ):
        return index + 1
    limit = min(len(frames), index + MAX_SEGMENTS, index + (MAX_IP_LEN - 8) // (size - V6_UDP))
    key = first[:60]  # Ethernet, the IPv6 header, ports and UDP length
    end = index + 1
    while end < limit:
        frame = frames[end]
        if frame[:60] != key or len(frame) != size:
            break
        end += 1
    return end


def _train(frames: Sequence[bytes], index: int, end: int) -> list[bytes]:
    """One write of frames[index:end]: their headers once, then every payload."""
    first = frames[index]
    v4 = first[12] == 0x08
    start = V4_UDP if v4 else V6_UDP
    segment = len(first) - start
    udp_len = 8 + segment * (end - index)
    if v4:
        # Total length changes: the header checksum follows (RFC 1624 eqn. 3).
        old_total = (first[16] << 8) | first[17]
        new_total = 20 + udp_len
        checksum = (first[24] << 8) | first[25]
        checksum = ~_fold((~checksum & 0xFFFF) + (~old_total & 0xFFFF) + new_total) & 0xFFFF
        ip = (
            first[14:16]
            + new_total.to_bytes(2, "big")
            + first[18:24]
            + checksum.to_bytes(2, "big")
            + first[26:34]
        )
        pseudo = _sum16(first[26:34]) + 17 + udp_len
    else:
        ip = first[14:18] + udp_len.to_bytes(2, "big") + first[20:54]
        pseudo = _sum16(first[22:54]) + 17 + udp_len
    # CHECKSUM_PARTIAL: the pseudo-header sum, not complemented; the kernel adjusts it to
    # each datagram's length and completes it over the datagram.
    udp = first[start - 8 : start - 4] + _HEADS.pack(udp_len, _fold(pseudo))
    vnet = VNET_HEADER.pack(NEEDS_CSUM, GSO_UDP_L4, start, segment, start - 8, 6)
    # Copies of the payloads: cheaper in Python than views of them, and the write copies
    # them once more in any case.
    return [vnet, first[:ETH_HEADER_LEN] + ip + udp, *[frame[start:] for frame in frames[index:end]]]
