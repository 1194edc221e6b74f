"""Packet captures: read pcap and pcapng (with dpkt's header and block classes), write pcap.

Frames come out with their number, time in integer nanoseconds and link type. Damage
(a cut-off record, an impossible length, a block that does not parse) ends the reading
with a CaptureError naming the frame, after every frame before it has been yielded, so a
caller can show what was readable and still exit 2.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, TextIO

import dpkt
from dpkt import pcap, pcapng

from mcmw.cli import UsageError
from tap.ethernet import ETHERTYPE_IPV4, ETHERTYPE_IPV6, multicast_mac

# Link types (LINKTYPE_* of the pcap and pcapng formats).
ETHERNET = 1
RAW_IP = 101
LINUX_SLL = 113
LINUX_SLL2 = 276
# Other numbers that mean raw IP: DLT_RAW on Linux and OpenBSD, LINKTYPE_IPV4/IPV6.
RAW_ALIASES = frozenset((12, 14, 228, 229))
LINKTYPE_NAMES = {
    ETHERNET: "Ethernet",
    RAW_IP: "raw IP",
    LINUX_SLL: "Linux cooked v1",
    LINUX_SLL2: "Linux cooked v2",
}

SLL_HEADER = struct.Struct("!HHH8sH")  # packet type, ARPHRD, address length, address, protocol
SLL2_HEADER = struct.Struct("!HHIHBB8s")  # protocol, reserved, ifindex, ARPHRD, type, alen, addr
ARPHRD_ETHER = 1
PACKET_OUTGOING = 4  # SLL packet type: sent by the capturing host

MAX_RECORD = 64 * 1024 * 1024  # larger than any snaplen; a bigger length is damage
NS = 1_000_000_000
PCAP_NANO_MAGICS = frozenset((pcap.TCPDUMP_MAGIC_NANO, pcap.PMUDPCT_MAGIC_NANO))
PCAP_MAGICS = {
    pcap.TCPDUMP_MAGIC: (pcap.FileHdr, pcap.PktHdr),
    pcap.TCPDUMP_MAGIC_NANO: (pcap.FileHdr, pcap.PktHdr),
    pcap.PMUDPCT_MAGIC: (pcap.LEFileHdr, pcap.LEPktHdr),
    pcap.PMUDPCT_MAGIC_NANO: (pcap.LEFileHdr, pcap.LEPktHdr),
}


class CaptureError(UsageError):
    """An unreadable or damaged capture: 'FILE: frame N: what is wrong', exit 2."""


@dataclass(frozen=True)
class Frame:
    number: int  # 1-based, in file order
    ts_ns: int  # capture time, nanoseconds since the epoch
    linktype: int
    data: bytes
    orig_len: int  # length on the wire; more than len(data) when the capture cut it

    @property
    def time(self) -> float:
        return self.ts_ns / NS

    @property
    def snapped(self) -> bool:
        return self.orig_len > len(self.data)


@dataclass(frozen=True)
class Link:
    """The link layer of a frame: what it carries and, when known, its MAC addresses."""

    ethertype: int
    payload: bytes  # the network-layer packet
    src: bytes | None = None
    dst: bytes | None = None
    outgoing: bool | None = None  # Linux cooked captures: sent by the capturing host


def supported(linktype: int) -> bool:
    return linktype in LINKTYPE_NAMES or linktype in RAW_ALIASES


def linktype_name(linktype: int) -> str:
    if linktype in RAW_ALIASES:
        return "raw IP"
    return LINKTYPE_NAMES.get(linktype, f"link type {linktype}")


class CaptureReader:
    """Frames of one pcap or pcapng file; `position` and `size` measure progress."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed by close()
            self.size = os.fstat(self._file.fileno()).st_size
        except OSError as exc:
            raise CaptureError(f"{path}: cannot read: {exc.strerror or exc}") from None
        self.count = 0  # frames yielded so far

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> CaptureReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def position(self) -> int:
        return self._file.tell() if not self._file.closed else self.size

    def damage(self, what: str) -> CaptureError:
        return CaptureError(f"{self.path}: frame {self.count + 1}: {what}")

    def frames(self) -> Iterator[Frame]:
        head = self._file.read(4)
        if len(head) < 4:
            raise CaptureError(f"{self.path}: not a capture: {len(head)} bytes long")
        self._file.seek(0)
        if struct.unpack("<I", head)[0] == pcapng.PCAPNG_BT_SHB:
            yield from self._pcapng()
        else:
            yield from self._pcap(head)

    def _read(self, n: int, what: str) -> bytes:
        data = self._file.read(n)
        if len(data) < n:
            raise self.damage(f"truncated {what}: {len(data)} of {n} bytes")
        return data

    def _frame(self, ts_ns: int, linktype: int, data: bytes, orig_len: int) -> Frame:
        if not supported(linktype):
            raise self.damage(
                f"{linktype_name(linktype)} is not supported (Ethernet, Linux cooked v1/v2, raw IP)"
            )
        self.count += 1
        return Frame(self.count, ts_ns, linktype, data, max(orig_len, len(data)))

    # -- pcap ---------------------------------------------------------------------

    def _pcap(self, head: bytes) -> Iterator[Frame]:
        magic = struct.unpack(">I", head)[0]
        if magic not in PCAP_MAGICS:
            raise CaptureError(f"{self.path}: not a pcap or pcapng file (starts with {head.hex()})")
        file_cls, record_cls = PCAP_MAGICS[magic]
        raw = self._file.read(file_cls.__hdr_len__)
        if len(raw) < file_cls.__hdr_len__:
            raise CaptureError(f"{self.path}: truncated pcap file header")
        header = file_cls(raw)
        linktype = header.linktype & 0x0FFFFFFF  # the top bits may hold FCS flags
        nano = magic in PCAP_NANO_MAGICS
        limit = max(header.snaplen, 262144)
        record_len = record_cls.__hdr_len__
        while True:
            raw = self._file.read(record_len)
            if not raw:
                return
            if len(raw) < record_len:
                raise self.damage(f"truncated record header: {len(raw)} of {record_len} bytes")
            record = record_cls(raw)
            if record.caplen > limit or record.caplen > MAX_RECORD:
                raise self.damage(f"record length {record.caplen} is impossible (snaplen {header.snaplen})")
            if record.tv_usec >= (NS if nano else 1_000_000):
                raise self.damage(f"timestamp fraction {record.tv_usec} out of range")
            data = self._read(record.caplen, "packet data")
            fraction = record.tv_usec if nano else record.tv_usec * 1000
            yield self._frame(record.tv_sec * NS + fraction, linktype, data, record.len)

    # -- pcapng -------------------------------------------------------------------

    def _pcapng(self) -> Iterator[Frame]:
        order = "<"
        interfaces: list[tuple[int, int, int, int]] = []  # linktype, snaplen, units/s, offset
        last_ts = 0
        while True:
            head = self._file.read(8)
            if not head:
                return
            if len(head) < 8:
                raise self.damage(f"truncated block header: {len(head)} of 8 bytes")
            block_type = struct.unpack(order + "I", head[:4])[0]
            if block_type == pcapng.PCAPNG_BT_SHB:
                bom = self._read(4, "section header")
                order = "<" if struct.unpack("<I", bom)[0] == pcapng.BYTE_ORDER_MAGIC else ">"
                if struct.unpack(order + "I", bom)[0] != pcapng.BYTE_ORDER_MAGIC:
                    raise self.damage("section header with an unknown byte-order magic")
                head += bom
            length = struct.unpack(order + "I", head[4:8])[0]
            if length < 12 or length % 4 or length > MAX_RECORD:
                raise self.damage(f"block length {length} is impossible")
            block = head + self._read(length - len(head), f"block of {length} bytes")
            le = order == "<"
            try:
                if block_type == pcapng.PCAPNG_BT_SHB:
                    shb = (pcapng.SectionHeaderBlockLE if le else pcapng.SectionHeaderBlock)(block)
                    if shb.v_major != pcapng.PCAPNG_VERSION_MAJOR:
                        raise self.damage(f"pcapng version {shb.v_major}.{shb.v_minor}")
                    interfaces = []
                elif block_type == pcapng.PCAPNG_BT_IDB:
                    idb = (pcapng.InterfaceDescriptionBlockLE if le else pcapng.InterfaceDescriptionBlock)(
                        block
                    )
                    interfaces.append(_interface(idb, order))
                elif block_type in (pcapng.PCAPNG_BT_EPB, pcapng.PCAPNG_BT_PB):
                    if block_type == pcapng.PCAPNG_BT_EPB:
                        cls = pcapng.EnhancedPacketBlockLE if le else pcapng.EnhancedPacketBlock
                    else:
                        cls = pcapng.PacketBlockLE if le else pcapng.PacketBlock
                    epb = cls(block)
                    if len(epb.pkt_data) < epb.caplen:
                        raise self.damage(f"packet of {epb.caplen} bytes in a block of {length}")
                    iface = epb.iface_id
                    if iface >= len(interfaces):
                        raise self.damage(f"packet on interface {iface}, which is not described")
                    linktype, _, units, offset = interfaces[iface]
                    ticks = (epb.ts_high << 32) | epb.ts_low
                    last_ts = offset * NS + ticks * NS // units
                    yield self._frame(last_ts, linktype, bytes(epb.pkt_data), epb.pkt_len)
                elif block_type == pcapng.PCAPNG_BT_SPB:
                    if not interfaces:
                        raise self.damage("simple packet block before any interface")
                    linktype, snaplen, _, _ = interfaces[0]
                    (orig,) = struct.unpack_from(order + "I", block, 8)
                    caplen = min(orig, snaplen or orig, length - 16)
                    yield self._frame(last_ts, linktype, bytes(block[12 : 12 + caplen]), orig)
                elif struct.unpack(order + "I", block[-4:])[0] != length:
                    raise self.damage(f"block type {block_type:#x}: its two length fields differ")
            except (dpkt.Error, struct.error, IndexError, ValueError) as exc:
                why = str(exc) or type(exc).__name__
                raise self.damage(f"block type {block_type:#x} does not parse: {why}") from None


def _interface(idb: pcapng.InterfaceDescriptionBlock, order: str) -> tuple[int, int, int, int]:
    units, offset = 1_000_000, 0  # microseconds unless if_tsresol says otherwise
    for opt in idb.opts:
        if opt.code == pcapng.PCAPNG_OPT_IF_TSRESOL and opt.data:
            value = opt.data[0]
            units = 2 ** (value & 0x7F) if value & 0x80 else 10 ** (value & 0x7F)
        elif opt.code == pcapng.PCAPNG_OPT_IF_TSOFFSET and len(opt.data) >= 8:
            offset = struct.unpack(order + "q", opt.data[:8])[0]
    return idb.linktype, idb.snaplen, units, offset


# -- link layers -------------------------------------------------------------------


def link_layer(frame: Frame) -> Link | None:
    """The network-layer packet inside a frame, or None when the link header is cut short."""
    data, linktype = frame.data, frame.linktype
    if linktype == ETHERNET:
        if len(data) < 14:
            return None
        ethertype, offset = struct.unpack_from("!H", data, 12)[0], 14
        while ethertype in (0x8100, 0x88A8, 0x9100) and len(data) >= offset + 4:  # VLAN tags
            ethertype = struct.unpack_from("!H", data, offset + 2)[0]
            offset += 4
        return Link(ethertype, data[offset:], data[6:12], data[0:6])
    if linktype == LINUX_SLL:
        if len(data) < SLL_HEADER.size:
            return None
        kind, hatype, alen, addr, ethertype = SLL_HEADER.unpack_from(data)
        src = addr[:6] if hatype == ARPHRD_ETHER and alen == 6 else None
        return Link(ethertype, data[SLL_HEADER.size :], src, None, kind == PACKET_OUTGOING)
    if linktype == LINUX_SLL2:
        if len(data) < SLL2_HEADER.size:
            return None
        ethertype, _, _, hatype, kind, alen, addr = SLL2_HEADER.unpack_from(data)
        src = addr[:6] if hatype == ARPHRD_ETHER and alen == 6 else None
        return Link(ethertype, data[SLL2_HEADER.size :], src, None, kind == PACKET_OUTGOING)
    if not data:
        return None
    version = data[0] >> 4
    ethertype = ETHERTYPE_IPV4 if version == 4 else ETHERTYPE_IPV6 if version == 6 else 0
    return Link(ethertype, data)


def ethernet_frame(frame: Frame) -> bytes | None:
    """The frame as the TAP would carry it: Ethernet as is; cooked and raw IP captures get
    an Ethernet header made up from what they kept (None for what is not IP)."""
    if frame.linktype == ETHERNET:
        return frame.data if len(frame.data) >= 14 else None
    link = link_layer(frame)
    if link is None or link.ethertype not in (ETHERTYPE_IPV4, ETHERTYPE_IPV6):
        return None
    packet = link.payload
    group = packet[16:20] if link.ethertype == ETHERTYPE_IPV4 else packet[24:40]
    multicast = len(group) == 4 and group[0] >> 4 == 0xE or len(group) == 16 and group[0] == 0xFF
    dst = multicast_mac(group) if multicast else b"\xff" * 6
    src = link.src or b"\x02\x00\x00\x00\x00\x00"
    return dst + src + struct.pack("!H", link.ethertype) + packet


def relink(ethernet: bytes, linktype: int) -> bytes:
    """An Ethernet frame as another link type would have captured it (for tools and tests):
    Linux cooked v1/v2 keep the source MAC and say "sent by us"; raw IP keeps the packet."""
    if linktype == ETHERNET:
        return ethernet
    ethertype = struct.unpack_from("!H", ethernet, 12)[0] if len(ethernet) >= 14 else 0
    packet, src = ethernet[14:], ethernet[6:12].ljust(6, b"\0")
    if linktype == LINUX_SLL:
        return SLL_HEADER.pack(PACKET_OUTGOING, ARPHRD_ETHER, 6, src, ethertype) + packet
    if linktype == LINUX_SLL2:
        return SLL2_HEADER.pack(ethertype, 0, 1, ARPHRD_ETHER, PACKET_OUTGOING, 6, src) + packet
    if linktype == RAW_IP:
        return packet
    raise ValueError(f"cannot write {linktype_name(linktype)}")


# -- writing -----------------------------------------------------------------------


def write_pcap(path: str, frames: Iterable[tuple[int, bytes]], linktype: int = ETHERNET) -> int:
    """Write (time in ns, frame) pairs as a little-endian nanosecond pcap; returns the count.

    Always the same bytes for the same frames: no clock, no host byte order.
    """
    count = 0
    with open(path, "wb") as out:
        out.write(bytes(pcap.LEFileHdr(magic=pcap.TCPDUMP_MAGIC_NANO, snaplen=262144, linktype=linktype)))
        for ts_ns, data in frames:
            sec, nsec = divmod(ts_ns, NS)
            out.write(bytes(pcap.LEPktHdr(tv_sec=sec, tv_usec=nsec, caplen=len(data), len=len(data))))
            out.write(data)
            count += 1
    return count


class TcpFlow:
    """A made-up TCP connection to show a byte stream in a capture: a handshake, then
    segments of at most MSS bytes with the right sequence and acknowledgement numbers.
    dpkt builds the headers and their checksums."""

    MSS = 1400

    def __init__(
        self,
        client: tuple[str, int],
        server: tuple[str, int],
        macs: tuple[bytes, bytes],
        isn: tuple[int, int],
    ) -> None:
        self.ends = (client, server)
        self.macs = macs
        self.next_seq = [isn[0], isn[1]]  # client's, server's

    def handshake(self) -> list[bytes]:
        syn, ack = dpkt.tcp.TH_SYN, dpkt.tcp.TH_ACK
        frames = [self._segment(0, syn, b""), self._segment(1, syn | ack, b"")]
        self.next_seq = [(s + 1) & 0xFFFFFFFF for s in self.next_seq]  # SYN counts as one
        frames.append(self._segment(0, ack, b""))
        return frames

    def send(self, from_client: bool, data: bytes) -> list[bytes]:
        side = 0 if from_client else 1
        frames = []
        for start in range(0, len(data), self.MSS):
            chunk = data[start : start + self.MSS]
            frames.append(self._segment(side, dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH, chunk))
            self.next_seq[side] = (self.next_seq[side] + len(chunk)) & 0xFFFFFFFF
        return frames

    def _segment(self, side: int, flags: int, payload: bytes) -> bytes:
        (src, sport), (dst, dport) = self.ends[side], self.ends[1 - side]
        ack = self.next_seq[1 - side] if flags & dpkt.tcp.TH_ACK else 0
        tcp = dpkt.tcp.TCP(
            sport=sport, dport=dport, seq=self.next_seq[side], ack=ack, flags=flags, win=65535, data=payload
        )
        return ip_frame(src, dst, tcp, (self.macs[side], self.macs[1 - side]))


def udp_frame(src: tuple[str, int], dst: tuple[str, int], macs: tuple[bytes, bytes], payload: bytes) -> bytes:
    """One made-up UDP datagram from `src` to `dst` (address, port), in Ethernet."""
    udp = dpkt.udp.UDP(sport=src[1], dport=dst[1], data=payload)
    udp.ulen = len(udp)
    return ip_frame(src[0], dst[0], udp, macs)


def ip_frame(src: str, dst: str, l4: dpkt.Packet, macs: tuple[bytes, bytes]) -> bytes:
    """TCP or UDP in IPv4 or IPv6 in Ethernet; dpkt fills in lengths and checksums."""
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    proto = 6 if isinstance(l4, dpkt.tcp.TCP) else 17
    ip: dpkt.Packet
    if a.version == 4:
        ip = dpkt.ip.IP(src=a.packed, dst=b.packed, p=proto, ttl=64, data=l4)
        ethertype = ETHERTYPE_IPV4
    else:
        ip = dpkt.ip6.IP6(src=a.packed, dst=b.packed, nxt=proto, hlim=64, data=l4, plen=len(l4))
        ethertype = ETHERTYPE_IPV6
    return bytes(dpkt.ethernet.Ethernet(src=macs[0], dst=macs[1], type=ethertype, data=ip))


# -- reading with progress -----------------------------------------------------------


def frames_with_progress(path: str, label: str) -> Iterator[Frame]:
    """The frames of `path`, drawing a progress bar labelled `label` on a terminal (by
    bytes read) while the caller works through them; damage raises CaptureError after
    the frames before it. The one reading loop of decode, replay and replay --live."""
    with CaptureReader(path) as reader:
        progress = Progress(label, reader.size)
        try:
            for frame in reader.frames():
                yield frame
                progress.update(reader.position, f"frame {frame.number}")
        finally:
            progress.close()


# -- progress ----------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    WIDTH = 30

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = total > 0 and self.stream.isatty()
        self.label = label
        self.total = total
        self._next = 0.0
        self._drawn = False

    def update(self, done: int, note: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + 0.1
        share = min(1.0, done / self.total)
        bar = "#" * int(share * self.WIDTH)
        self.stream.write(f"\r{self.label} [{bar:<{self.WIDTH}}] {share:4.0%} {note}\x1b[K")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False
