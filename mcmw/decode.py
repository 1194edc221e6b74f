"""`mcmw decode`: how mcmw reads each frame of a capture, as a line or a JSON object per frame.

IGMP and MLD are parsed by the querier's own parsers (igmp/), peer messages by the
overlay codec; dpkt only finds the IP and TCP/UDP layers around them. A frame goes to
the membership parsers by the same test the node applies (mcmw/node.py), so what this
prints is what the node would have made of it.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import dpkt

from igmp import codec_igmp, codec_mld
from igmp.errors import Malformed
from igmp.messages import Message
from mcmw.capture import CaptureError, Frame, frames_with_progress, link_layer
from mcmw.node import PROTO_IGMP, carried, is_mld
from overlay import codec
from overlay.auth import IntegrityError, split_integrity
from tap.ethernet import ETHERTYPE_IPV4, ETHERTYPE_IPV6

ETHERTYPE_NAMES = {0x0806: "arp", 0x88CC: "lldp", 0x8035: "rarp", 0x8100: "vlan"}
L4_NAMES = {1: "icmp", 2: "igmp", 6: "tcp", 17: "udp", 58: "icmpv6", 103: "pim", 132: "sctp"}
SEQ_MOD = 1 << 32
DATA_PROTOCOLS = frozenset((6, 17, 33, 132))  # TCP, UDP, DCCP, SCTP
FlowKey = tuple[bytes, int, bytes, int]  # source address and port, destination address and port


def text(addr: bytes) -> str:
    return str(ipaddress.ip_address(addr))


def ip_endpoints(packet: bytes) -> tuple[bytes, bytes] | None:
    """(source, destination) of an IPv4 or IPv6 packet, when its header is there."""
    if len(packet) >= 20 and packet[0] >> 4 == 4:
        return packet[12:16], packet[16:20]
    if len(packet) >= 40 and packet[0] >> 4 == 6:
        return packet[8:24], packet[24:40]
    return None


def is_multicast(addr: bytes) -> bool:
    return addr[0] >> 4 == 0xE if len(addr) == 4 else addr[0] == 0xFF


def blank(frame: Frame, start_ns: int) -> dict[str, Any]:
    """Every key the SPEC promises, present in every object whatever the frame is."""
    return {
        "frame": frame.number,
        "time": round((frame.ts_ns - start_ns) / 1e9, 9),
        "length": frame.orig_len,
        "protocol": "other",
        "version": None,
        "type": None,
        "group": None,
        "max_resp_s": None,
        "records": [],
        "sources": [],
        "s_flag": None,
        "qrv": None,
        "qqic": None,
        "malformed": False,
    }


# -- IGMP and MLD ------------------------------------------------------------------


def membership(packet: bytes, family: int) -> dict[str, Any]:
    """The fields of an IGMP (family 4) or MLD (6) packet, by igmp/'s parser; what could be
    read of a malformed one, with the parser's reason."""
    parser = codec_igmp if family == 4 else codec_mld
    out: dict[str, Any] = {"protocol": "igmp" if family == 4 else "mld"}
    problem: Malformed | None = None
    msg: Message | None
    try:
        msg = parser.parse(packet)
    except Malformed as err:
        problem, msg = err, err.message
    if msg is None and problem is not None:
        msg = salvage(packet, family)
        if msg is not None:
            out.update(message_fields(msg), router_alert=None)  # the option was not looked at
    elif msg is not None:
        out.update(message_fields(msg))
    if msg is None and (ends := ip_endpoints(packet)) is not None:
        out.update(src=text(ends[0]), dst=text(ends[1]))
    if problem is not None:
        out.update(malformed=True, reason=problem.reason, detail=problem.detail)
    else:
        assert msg is not None
        out["drop"] = parser.validate(msg)  # checks beyond syntax; None when a router accepts
    return out


def salvage(packet: bytes, family: int) -> Message | None:
    """What can be read of a message whose IP header the parser refused (a bad header
    checksum, a length past the captured bytes): the message parsed as far as it goes."""
    try:
        if family == 4:
            ihl = (packet[0] & 0x0F) * 4
            total = int.from_bytes(packet[2:4], "big")
            if ihl < 20 or len(packet) < ihl:
                return None
            body = bytes(packet[ihl : min(max(total, ihl), len(packet))])
            return codec_igmp.parse_igmp(body, bytes(packet[12:16]), bytes(packet[16:20]), packet[8], False)
        # The IPv6 parser walks the extension headers; let it, over the bytes there are.
        if len(packet) < 40:
            return None
        fitted = bytes(packet[:4]) + (len(packet) - 40).to_bytes(2, "big") + bytes(packet[6:])
        return codec_mld.parse(fitted)
    except Malformed as err:
        return err.message if isinstance(err.message, Message) else None
    except (IndexError, ValueError):
        return None


def message_fields(msg: Message) -> dict[str, Any]:
    return {
        "version": msg.version or None,
        "type": msg.type,
        "raw_type": msg.raw_type,
        "src": text(msg.src),
        "dst": text(msg.dst),
        "ttl": msg.ttl,
        "router_alert": msg.router_alert,
        "group": text(msg.group) if msg.group is not None else None,
        "max_resp_s": msg.max_resp_s,
        "records": [
            {"type": r.name, "group": text(r.group), "sources": [text(s) for s in r.sources]}
            for r in msg.records
        ],
        "sources": [text(s) for s in msg.sources],
        "s_flag": msg.s_flag,
        "qrv": msg.qrv,
        "qqic": msg.qqic,
        "qqi_s": msg.qqi_s,
    }


def is_membership(packet: bytes, family: int) -> bool:
    """The node's own test (Node.tap_frames): IGMP by IP protocol, MLD by is_mld."""
    if family == 4:
        return len(packet) >= 20 and packet[9] == PROTO_IGMP
    return len(packet) >= 40 and is_mld(packet, 0)


# -- peer messages -----------------------------------------------------------------


def describe_message(data: bytes) -> dict[str, Any]:
    """One whole COPS message (its header already checked) as a dict, by the overlay codec."""
    name = codec.MESSAGE_NAMES.get(data[1], f"op-code {data[1]}")
    out: dict[str, Any] = {"type": name, "length": len(data)}
    data, integrity = strip_integrity(data)
    if integrity is not None:
        out["integrity"] = integrity
    try:
        msg = codec.decode(data)
    except codec.CodecError as exc:
        out.update(malformed=True, reason="bad_message", detail=str(exc))
        return out
    if isinstance(msg, codec.Open):
        out.update(
            node=msg.node,
            protocol_version=msg.version,
            address_bits=msg.address_bits,
            mapping=msg.mapping,
            ttl_mode=msg.ttl_mode,
            udp_port=msg.udp_port,
            dead_interval=msg.dead_interval,
        )
    elif isinstance(msg, codec.KeepAlive):
        out.update(timestamp_ns=msg.timestamp_ns, echo_ns=msg.echo_ns, held_ns=msg.held_ns)
    elif isinstance(msg, codec.AddRoute | codec.RemoveRoute):
        out["routes"] = [
            {
                "overlay_address": r.overlay_address,
                "group": text(r.group),
                "mode": r.mode,
                "sources": [text(s) for s in r.sources],
            }
            for r in msg.routes
        ]
    elif isinstance(msg, codec.IpData):
        out.update(overlay_address=msg.overlay_address, seq=msg.seq)
        ends = ip_endpoints(msg.packet)
        if ends is not None:
            out.update(src=text(ends[0]), group=text(ends[1]), packet_length=len(msg.packet))
    elif isinstance(msg, codec.Close):
        out.update(code=msg.code, text=msg.reason)
    return out


def strip_integrity(message: bytes) -> tuple[bytes, dict[str, int] | None]:
    """A message without its Integrity object (not verified: decode has no keys), and the
    object's key id and sequence number; the message as is when it has none."""
    try:
        inner, key_id, seq, _ = split_integrity(message)
    except IntegrityError:
        return message, None
    return inner, {"key_id": key_id, "seq": seq}


def split_messages(buf: bytes | bytearray) -> tuple[list[bytes], int, str | None]:
    """Whole messages at the start of a byte stream: (messages, bytes used, framing error)."""
    messages: list[bytes] = []
    offset = 0
    while len(buf) - offset >= codec.HEADER_LEN:
        try:
            _, length = codec.check_header(buf, offset)
        except codec.CodecError as exc:
            return messages, offset, str(exc)
        if len(buf) - offset < length:
            break
        messages.append(bytes(buf[offset : offset + length]))
        offset += length
    return messages, offset, None


def starts_cops(payload: bytes) -> bool:
    if len(payload) < codec.HEADER_LEN:
        return False
    try:
        codec.check_header(payload, 0)
    except codec.CodecError:
        return False
    return True


@dataclass
class Stream:
    """One direction of a TCP connection that carries peer messages."""

    next_seq: int
    buf: bytearray = field(default_factory=bytearray)


@dataclass
class Segment:
    """The peer messages one TCP segment or UDP datagram completes."""

    messages: list[bytes]
    pending: int = 0  # bytes of a message that a later segment completes
    error: str | None = None  # the stream does not frame as COPS from here on
    note: str | None = None  # "retransmission": bytes already seen


class CopsStreams:
    """Reassembles peer messages over TCP, so a message cut across segments is reported in
    the segment that completes it. A stream is recognised by a segment that starts with a
    valid mcmw COPS header, on any port."""

    def __init__(self) -> None:
        self.streams: dict[FlowKey, Stream] = {}

    def tcp(self, key: FlowKey, seq: int, syn: bool, payload: bytes) -> Segment | None:
        if syn:
            self.streams.pop(key, None)  # a new connection
        if not payload:
            return None
        stream = self.streams.get(key)
        end = (seq + len(payload)) % SEQ_MOD
        if stream is not None and seq == stream.next_seq:
            stream.buf += payload
        elif stream is not None and (stream.next_seq - end) % SEQ_MOD < SEQ_MOD // 2:
            return Segment([], note="retransmission")
        elif starts_cops(payload):
            stream = self.streams[key] = Stream(end, bytearray(payload))
        else:
            self.streams.pop(key, None)  # lost track (a gap): wait for a message start
            return None
        stream.next_seq = end
        messages, used, error = split_messages(stream.buf)
        del stream.buf[:used]
        if error is not None:
            del self.streams[key]
        return Segment(messages, len(stream.buf), error)

    @staticmethod
    def udp(payload: bytes) -> Segment | None:
        if not starts_cops(payload):
            return None
        messages, used, error = split_messages(payload)
        if error is None and used < len(payload):
            error = f"{len(payload) - used} bytes after the last whole message"
        return Segment(messages, 0, error)

    def segment(self, packet: bytes, family: int) -> tuple[Any, FlowKey | None, Segment | None]:
        """dpkt's reading of an IP packet, and the peer messages it completes if any."""
        ip: Any = dpkt.ip.IP(packet) if family == 4 else dpkt.ip6.IP6(packet)
        l4 = ip.data
        if isinstance(l4, dpkt.tcp.TCP):
            key = (bytes(ip.src), l4.sport, bytes(ip.dst), l4.dport)
            return ip, key, self.tcp(key, l4.seq, bool(l4.flags & dpkt.tcp.TH_SYN), bytes(l4.data))
        if isinstance(l4, dpkt.udp.UDP):
            return ip, (bytes(ip.src), l4.sport, bytes(ip.dst), l4.dport), self.udp(bytes(l4.data))
        return ip, None, None


def segment_fields(seg: Segment) -> dict[str, Any]:
    """The decode keys of a segment of peer messages."""
    messages = [describe_message(m) for m in seg.messages]
    out: dict[str, Any] = {"protocol": "cops", "version": codec.COPS_VERSION, "messages": messages}
    out["type"] = messages[0]["type"] if messages else seg.note or "continuation"
    first = messages[0] if messages else {}
    routes = first.get("routes") or [{}]
    out["group"] = first.get("group") or routes[0].get("group")
    out["sources"] = routes[0].get("sources", [])
    if seg.pending:
        out["pending"] = seg.pending
    bad = next((m for m in messages if m.get("malformed")), None)
    if seg.error is not None:
        out.update(malformed=True, reason="bad_message", detail=seg.error)
    elif bad is not None:
        out.update(malformed=True, reason="bad_message", detail=f"{bad['type']}: {bad['detail']}")
    return out


# -- frames ------------------------------------------------------------------------


class Decoder:
    """Decodes the frames of one capture in order (peer streams carry state between them)."""

    def __init__(self) -> None:
        self.start_ns: int | None = None
        self.cops = CopsStreams()

    def frame(self, frame: Frame) -> dict[str, Any]:
        if self.start_ns is None:
            self.start_ns = frame.ts_ns
        out = blank(frame, self.start_ns)
        if frame.snapped:
            out["captured"] = len(frame.data)  # the capture kept only this much
        link = link_layer(frame)
        if link is None:
            out.update(malformed=True, reason="truncated", detail="shorter than its link header")
            return out
        if link.ethertype == ETHERTYPE_IPV4 or link.ethertype == ETHERTYPE_IPV6:
            out.update(self.ip(link.payload, 4 if link.ethertype == ETHERTYPE_IPV4 else 6))
        else:
            out["type"] = ETHERTYPE_NAMES.get(link.ethertype, f"ethertype 0x{link.ethertype:04x}")
        return out

    def ip(self, packet: bytes, family: int) -> dict[str, Any]:
        if len(packet) < (20 if family == 4 else 40) or packet[0] >> 4 != family:
            return {
                "version": family,
                "malformed": True,
                "reason": "truncated" if packet else "bad_header",
                "detail": f"not a whole IPv{family} header",
            }
        if is_membership(packet, family):
            return membership(packet, family)
        return self.other_ip(packet, family)

    def other_ip(self, packet: bytes, family: int) -> dict[str, Any]:
        """Data, peer messages, or anything else IP, as dpkt reads it."""
        try:
            ip, _, seg = self.cops.segment(packet, family)
        except Exception as exc:  # dpkt on arbitrary bytes: whatever it raises, the frame is cut
            detail = f"IPv{family}: {exc or type(exc).__name__}"
            return {"version": family, "malformed": True, "reason": "truncated", "detail": detail}
        src, dst = ip_endpoints(packet) or (b"", b"")
        out: dict[str, Any] = {
            "version": family,
            "src": text(src),
            "dst": text(dst),
            "ttl": ip.ttl if family == 4 else ip.hlim,
        }
        l4 = ip.data
        if isinstance(l4, dpkt.tcp.TCP | dpkt.udp.UDP):
            out.update(sport=l4.sport, dport=l4.dport)
        if seg is not None:
            out.update(segment_fields(seg))
            return out
        proto = getattr(ip, "p", None) if family == 4 else getattr(ip, "p", ip.nxt)  # IP6 may lack it
        out["type"] = L4_NAMES.get(proto, f"ip protocol {proto}")
        # Data: what applications send to groups; routing and neighbour discovery on the
        # link-local groups are not that.
        if is_multicast(dst) and (carried(dst) or proto in DATA_PROTOCOLS):
            out.update(protocol="data", group=text(dst), carried=carried(dst))
            problem = data_problem(packet, family)
            if problem is not None:
                out.update(malformed=True, reason=problem[0], detail=problem[1])
        return out


def data_problem(packet: bytes, family: int) -> tuple[str, str] | None:
    """Why the node would drop this data packet as malformed (Node._carry)."""
    if family == 4:
        ihl = (packet[0] & 0x0F) * 4
        total = int.from_bytes(packet[2:4], "big")
        if ihl < 20 or total < ihl:
            return "bad_header", f"IHL {ihl}, total length {total}"
        if total > len(packet):
            return "truncated", f"total length {total}, have {len(packet)}"
        return None
    total = 40 + int.from_bytes(packet[4:6], "big")
    if total > len(packet):
        return "truncated", f"payload length {total - 40}, have {len(packet) - 40}"
    return None


# -- lines for people ----------------------------------------------------------------


def format_line(rec: dict[str, Any]) -> str:
    proto = rec["protocol"]
    head = f"{rec['frame']:>6} {rec['time']:>12.6f}  {proto:<5} "
    if proto in ("igmp", "mld"):
        body = membership_text(rec)
    elif proto == "cops":
        messages = rec.get("messages") or []
        body = f"{endpoint(rec['src'], rec['sport'])} > {endpoint(rec['dst'], rec['dport'])} "
        body += "; ".join(message_text(m) for m in messages) if messages else rec["type"]
    elif proto == "data":
        body = f"{rec['src']} > {rec['group']} {rec['type']} ttl {rec['ttl']} len {rec['length']}"
        if not rec.get("carried"):
            body += " (link-local, not carried)"
    else:
        parts = [p for p in (f"ipv{rec['version']}" if rec.get("version") else None, rec.get("type")) if p]
        if rec.get("sport") is not None:
            parts.append(f"{endpoint(rec['src'], rec['sport'])} > {endpoint(rec['dst'], rec['dport'])}")
        elif rec.get("src"):
            parts.append(f"{rec['src']} > {rec['dst']}")
        body = " ".join(parts) or "?"
    if rec.get("malformed"):
        body += f"  MALFORMED {rec['reason']}" + (f": {rec['detail']}" if rec.get("detail") else "")
    elif rec.get("drop"):
        body += f"  (a router drops it: {rec['drop']})"
    if rec.get("pending"):
        body += f"  (+{rec['pending']} bytes of a message continued later)"
    return head + body


def membership_text(rec: dict[str, Any]) -> str:
    words = [f"v{rec['version']}" if rec["version"] else "v?", rec["type"] or "?"]
    if rec.get("src"):
        words.append(f"{rec['src']} > {rec['dst']}")
    if rec["group"] is not None:
        words.append(f"group {rec['group']}")
    if rec["max_resp_s"] is not None:
        words.append(f"max_resp {rec['max_resp_s']:g}s")
    if rec["qrv"] is not None:
        flags = f"s_flag {int(bool(rec['s_flag']))} qrv {rec['qrv']}"
        words.append(f"{flags} qqic {rec['qqic']} ({rec['qqi_s']:g}s)")
        words.append(f"sources [{', '.join(rec['sources'])}]")
    for record in rec["records"]:
        words.append(f"{record['type']} {record['group']} [{', '.join(record['sources'])}];")
    return " ".join(words).rstrip(";")


def endpoint(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def message_text(msg: dict[str, Any]) -> str:
    name = msg["type"]
    if msg.get("malformed"):
        return f"{name} MALFORMED {msg['detail']}"
    if name == "open":
        return (
            f"open node {msg['node']} v{msg['protocol_version']} {msg['mapping']}/{msg['address_bits']} "
            f"ttl {msg['ttl_mode']} udp {msg['udp_port']} dead {msg['dead_interval']}s"
        )
    if name == "keepalive":
        return f"keepalive ts {msg['timestamp_ns']} echo {msg['echo_ns']} held {msg['held_ns']}"
    if name in ("add-route", "remove-route"):
        routes = ", ".join(
            f"{r['group']} {r['mode']} [{' '.join(r['sources'])}] -> {r['overlay_address']}"
            for r in msg["routes"]
        )
        return f"{name} {routes}"
    if name == "ip-data":
        return f"ip-data {msg.get('src')} > {msg.get('group')} addr {msg['overlay_address']} seq {msg['seq']}"
    if name == "close":
        return f"close code {msg['code']} {msg['text']!r}"
    return name


# -- the command ----------------------------------------------------------------------


def pipe_closed() -> None:
    """The reader of our output went away (| head): not an error of ours. Point stdout at
    /dev/null so that the interpreter's final flush does not complain either."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def decode_main(args: argparse.Namespace) -> int:
    """`mcmw decode FILE [--json]`; a damaged capture is decoded up to the damage, then exit 2."""
    decoder = Decoder()
    frames = frames_with_progress(args.file, "decode")
    try:
        for frame in frames:
            rec = decoder.frame(frame)
            print(json.dumps(rec) if args.json else format_line(rec))
    except BrokenPipeError:
        pipe_closed()
        return 0
    except CaptureError:
        sys.stdout.flush()
        raise
    finally:
        frames.close()  # the bar is taken down before any error line is printed
    return 0
