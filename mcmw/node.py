"""The node's core, sans-IO: frames and peer bytes in, frames and peer bytes out.

The runtime (mcmw/runtime.py) and the replay tool drive the same object; it never
touches a socket or a clock. Outputs are left in `tap_out` (frames for the TAP) and in
each link's `tx` buffer, for the caller to move after each batch.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from igmp.actions import MembershipChange, SendQuery
from igmp.querier import Querier
from mcmw.config import TreeConfig
from mcmw.mapping import make_mapper
from mcmw.routes import GroupRoute
from overlay import codec
from overlay.auth import INTEGRITY_LEN, IntegrityError, load_keys
from overlay.codec import (
    IP_DATA_FIELDS,
    IP_DATA_HEAD_LEN,
    SEQ,
    AddRoute,
    Close,
    IpData,
    KeepAlive,
    Open,
    RemoveRoute,
    Route,
    ip_data_prefix,
)
from overlay.interest import Filter, Interest, Update
from overlay.link import CLOSED, CONFIRMING, OPENING, UP, PeerLink
from tap.ethernet import (
    ETHERTYPE_IPV4,
    ETHERTYPE_IPV6,
    ethernet_header,
    frame_for_ip,
    link_local_from_mac,
    multicast_mac,
    router_mac,
)

log = logging.getLogger("mcmw.node")

ETH_IPV4 = b"\x08\x00"
ETH_IPV6 = b"\x86\xdd"
PROTO_IGMP = 2
NH_HOP_BY_HOP = 0
NH_ICMPV6 = 58
MLD_TYPES = frozenset((130, 131, 132, 143))
LINK_LOCAL_V4 = b"\xe0\x00\x00"
# Remote addresses whose failed connections the status keeps: bounded, because anyone who
# can reach the listen port can make connections fail.
MAX_CONNECTION_ERRORS = 64
MAX_PEER_GROUPS = 65536
MAX_PEER_SOURCES = 4096
V4_LEAD = struct.Struct("!8sBBH")  # IPv4 bytes 0-11: TTL, protocol, checksum rewritten
V6_LEAD = struct.Struct("!7sB")  # IPv6 bytes 0-7: the hop limit rewritten
PADDING = (b"", bytes(3), bytes(2), bytes(1))  # after a packet of size % 4 (IP-Data is 4-aligned)
FRAGMENT_OVERHEAD = codec.HEADER_LEN + codec.OBJECT_HEADER_LEN + 8 + codec.OBJECT_HEADER_LEN + 12


@dataclass
class FailedConnection:
    """The last connection from (or to) one remote address that closed before its link came
    up: refused Opens, failed Integrity, garbage, silence, a peer that closed first."""

    node: str | None  # the neighbour dialed, or the name the peer's Open gave (None: no Open)
    role: str  # "dial" or "accept"
    reason: str
    count: int  # connections from that address that failed so far
    at: float  # when the last one failed


def is_mld(buf: bytes, ip_offset: int = 14) -> bool:
    """Whether the IPv6 packet at `ip_offset` of `buf` (a frame by default) carries MLD:
    ICMPv6 of an MLD type, directly or after a hop-by-hop header (where MLD's Router
    Alert lives)."""
    next_header, offset = buf[ip_offset + 6], ip_offset + 40
    if next_header == NH_HOP_BY_HOP and len(buf) >= offset + 2:
        next_header, offset = buf[offset], offset + (buf[offset + 1] + 1) * 8
    return next_header == NH_ICMPV6 and len(buf) > offset and buf[offset] in MLD_TYPES


def carried(group: bytes) -> bool:
    """Whether the overlay carries a group: never the link-local ones (224.0.0/24, ff0X::
    of scope 0-2), which belong to one segment."""
    if len(group) == 4:
        return group[:3] != LINK_LOCAL_V4
    return group[1] & 0x0F > 2


def checksum_after_ttl_decrement(checksum: int) -> int:
    """The IPv4 header checksum once TTL drops by one (RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'),
    where ~m + m' is the constant 0xFEFF since only the TTL byte of m goes down by one)."""
    x = (~checksum & 0xFFFF) + 0xFEFF
    return ~((x & 0xFFFF) + (x >> 16)) & 0xFFFF


class Node:
    """One mcmw node: querier for its segment, router for the overlay."""

    def __init__(self, tree: TreeConfig, name: str, now: float) -> None:
        self.tree = tree
        self.name = name
        self.config = tree.nodes[name]
        self.started = now
        self.mac = router_mac(name)
        self.igmp = Querier(4, self.config.igmp, self.config.tap.address.ip.packed, now)
        self.mld = Querier(6, self.config.mld, link_local_from_mac(self.mac), now)
        # Queries (and their source lists) are split to fit the segment's MTU.
        self.igmp.mtu = self.mld.mtu = self.config.tap.mtu
        overlay = tree.overlay
        self.hop_ttl = overlay.ttl == "hop"
        self.map_group = make_mapper(overlay.mapping, overlay.address_bits)
        self.local_open = Open(
            node=name,
            address_bits=overlay.address_bits,
            mapping=overlay.mapping,
            ttl_mode=overlay.ttl,
            udp_port=self.config.udp or 0,
            dead_interval=max(1, round(overlay.dead_interval)),
        )
        self.neighbours = dict(tree.neighbours(name))  # peer -> True when we dial it
        self.interest = Interest()
        self.links: dict[str, PeerLink] = {}  # up links by peer
        self.pending: list[PeerLink] = []  # links not yet up
        self.routes: dict[bytes, GroupRoute] = {}
        self.tap_out: list[bytes] = []
        self.tap_rx = self.tap_tx = 0
        # Per-packet counts are plain attributes (cheap on the data path); the rest,
        # rarer events by reason, are in `counters`.
        self.delivered = self.forwarded = 0
        self.counters: Counter[str] = Counter(dropped_ttl=0, dropped_malformed=0)
        self.last_errors: dict[str, str] = {}  # neighbour -> why its link last closed
        # remote address -> its last connection that failed before up, oldest first
        self.connection_errors: dict[str, FailedConnection] = {}
        self.keys = load_keys(overlay.secret_file) if overlay.secret_file else None
        self.udp_peers: dict[tuple[str, int], PeerLink] = {}  # (address, port) -> up link
        self.udp_limit = overlay.udp_max_message
        # What one neighbour may ask for: far above what the segments behind it can want
        # (each querier keeps at most max_groups groups of max_sources sources), far
        # below what would exhaust memory. Beyond: ignored and counted.
        self.max_peer_groups = MAX_PEER_GROUPS
        self.max_peer_sources = MAX_PEER_SOURCES

    # -- lifecycle -----------------------------------------------------------------

    def start(self, now: float) -> None:
        self._membership(self.igmp.start(now), now)
        self._membership(self.mld.start(now), now)

    def shutdown(self, now: float) -> None:
        """Tell every peer we are leaving."""
        for link in [*self.links.values(), *self.pending]:
            link.close(codec.CLOSE_NORMAL, "node shutting down", now)
        self._membership(self.igmp.stop(now), now)
        self._membership(self.mld.stop(now), now)

    def new_link(
        self, peer: str | None, now: float, address: str | None = None, nonce: bytes | None = None
    ) -> PeerLink:
        """A TCP connection was made: to `peer` when we dialed, from someone when None.
        `address` is the peer's IP address, where its UDP data channel is; `nonce` fixes
        the Open's nonce (replays must be deterministic), random when None."""
        overlay = self.tree.overlay
        link = PeerLink(
            self.local_open,
            peer,
            dialer=peer is not None,
            keepalive_interval=overlay.keepalive_interval,
            dead_interval=overlay.dead_interval,
            now=now,
            keys=self.keys,
            address=address,
            nonce=nonce,
        )
        self.pending.append(link)
        return link

    def reconfigure(self, tree: TreeConfig, now: float) -> list[str]:
        """Adopt a re-read tree file: links to new neighbours are allowed, links to removed
        ones are closed; everything else runs on untouched. Returns what was not applied
        (settings that need a restart); raises ValueError when the file cannot apply."""
        if tree.overlay != self.tree.overlay:
            raise ValueError("overlay settings changed; restart every node to apply them")
        if self.name not in tree.nodes:
            raise ValueError(f"node {self.name!r} is no longer in the tree")
        # The key file is re-read, so keys roll without a restart (add the new key second,
        # then move it first, then drop the old one, with a reload on every node each
        # time). New connections use the new keys; up links keep their session keys.
        keys = load_keys(tree.overlay.secret_file) if tree.overlay.secret_file else None
        ignored = []
        if tree.nodes[self.name] != self.config:
            ignored.append(f"settings of node {self.name} (restart to apply)")
        new_neighbours = dict(tree.neighbours(self.name))
        for peer in [p for p in self.neighbours if new_neighbours.get(p) != self.neighbours[p]]:
            # The link if up, and a connection to it still in its Open exchange, which
            # would otherwise come up as a link the tree no longer has.
            doomed = [x for x in self.pending if x.peer == peer]
            if peer in self.links:
                doomed.append(self.links[peer])
            for link in doomed:
                link.close(codec.CLOSE_NORMAL, "link removed from the tree", now)
                self._forget(link, now)
        self.tree = tree
        self.neighbours = new_neighbours
        if keys is not None and keys != self.keys:
            log.info("keys reloaded: ids %s, key %d signs", ", ".join(map(str, keys)), next(iter(keys)))
        self.keys = keys
        return ignored

    def link_lost(self, link: PeerLink, reason: str, now: float) -> None:
        """The transport lost or closed `link`."""
        link.lost(reason)
        self._forget(link, now)

    def _forget(self, link: PeerLink, now: float) -> None:
        if link.forgotten:
            return  # e.g. the transport reports the loss of a link the node closed already
        link.forgotten = True
        if link in self.pending:
            self.pending.remove(link)
        if link.peer is not None and self.links.get(link.peer) is link:
            del self.links[link.peer]
            self.udp_peers.pop((link.address or "", link.udp_port), None)
            self.last_errors[link.peer] = link.close_reason
            log.warning("link to %s down: %s", link.peer, link.close_reason)
            self._apply(self.interest.peer_down(link.peer), now)
            for route in self.routes.values():
                self._rebuild(route)
            self._prune()
        else:
            self._connection_failed(link, now)

    def dial_failed(self, peer: str, address: str, reason: str) -> None:
        """A dial that reached no one (refused, unreachable, timed out) is the
        neighbour's last_error when nothing else is: why a link went down says more than
        the redials after it (those are logged)."""
        if peer in self.neighbours and peer not in self.links and peer not in self.last_errors:
            self.last_errors[peer] = f"cannot connect to {address}: {reason}"

    def _connection_failed(self, link: PeerLink, now: float) -> None:
        """A connection closed before its link came up. Its reason goes to the status by
        remote address (the only name an unknown or unauthenticated peer has), and, for a
        neighbour without a working link, to that neighbour's last_error."""
        reason = link.close_reason or "closed before the link came up"
        name = link.peer or link.open_name
        address = link.address or "unknown"
        self.counters["connection_errors"] += 1
        previous = self.connection_errors.pop(address, None)  # re-inserted as the newest
        self.connection_errors[address] = FailedConnection(
            name,
            "dial" if link.dialer else "accept",
            reason,
            (previous.count if previous else 0) + 1,
            now,
        )
        while len(self.connection_errors) > MAX_CONNECTION_ERRORS:
            del self.connection_errors[next(iter(self.connection_errors))]
        if name in self.neighbours and name not in self.links:
            self.last_errors[name] = reason
        if not link.logged:
            direction = "to" if link.dialer else "from"
            who = "an unnamed peer" if name is None else repr(name)
            log.warning("link %s %s at %s not established: %s", direction, who, address, reason)

    def expire(self, now: float) -> None:
        """Run every timer that is due."""
        self._membership(self.igmp.expire(now), now)
        self._membership(self.mld.expire(now), now)
        for link in [*self.links.values(), *self.pending]:
            link.tick(now)
            link.reassembly.expire(now)
            if link.state == CLOSED:
                self._forget(link, now)

    def next_deadline(self) -> float | None:
        deadlines = [d for d in (self.igmp.next_deadline(), self.mld.next_deadline()) if d is not None]
        deadlines.extend(link.next_deadline() for link in self.links.values())
        return min(deadlines, default=None)

    # -- from the TAP ------------------------------------------------------------

    def tap_frames(self, frames: list[bytes], now: float) -> None:
        """Frames the kernel sent on the segment: membership reports, or data to carry."""
        routes = self.routes
        self.tap_rx += len(frames)
        pending: list[tuple[GroupRoute, bytes]] = []  # data to carry, in order
        for frame in frames:
            ethertype = frame[12:14]
            if ethertype == ETH_IPV4:
                if len(frame) < 34:
                    self.counters["dropped_malformed"] += 1
                    continue
                if frame[23] == PROTO_IGMP:
                    self._carry_pending(pending, None)  # what came before the report first
                    self._membership(self.igmp.handle(frame[14:], now), now)
                    continue
                # Only carried groups have routes: no need to test for link-local ones.
                route = routes.get(frame[30:34])
            elif ethertype == ETH_IPV6:
                if len(frame) < 54:
                    self.counters["dropped_malformed"] += 1
                    continue
                if is_mld(frame):
                    self._carry_pending(pending, None)
                    self._membership(self.mld.handle(frame[14:], now), now)
                    continue
                route = routes.get(frame[38:54])
            else:
                continue
            if route is not None:
                pending.append((route, frame))
        self._carry_pending(pending, None)

    # -- the data path -------------------------------------------------------------

    def _carry_pending(self, pending: list[tuple[GroupRoute, bytes]], ingress: PeerLink | None) -> None:
        """Carry the frames of `pending` ((route, frame), in order), and empty it. A
        stream's frames come in runs of one group: one `_carry` per run, not per frame."""
        if not pending:
            return
        run_route, run = pending[0][0], []
        for route, frame in pending:
            if route is not run_route:
                self._carry(run_route, run, ingress)
                run_route, run = route, []
            run.append(frame)
        self._carry(run_route, run, ingress)
        pending.clear()

    def _carry(self, route: GroupRoute, frames: list[bytes], ingress: PeerLink | None) -> None:
        """Carry the packets of `frames` (Ethernet frames of `route`'s group, in order)
        from the segment (`ingress` None) or from a peer: to the segment when it wants
        them (a peer's), and to the links that do, one overlay hop taken off the TTL or
        hop limit in `hop` mode (none left: dropped)."""
        counters, hop = self.counters, self.hop_ttl
        v4 = len(route.group) == 4
        # Where the source address is, and where the header bytes after the TTL (IPv4)
        # or hop limit (IPv6) start: the packet leaves as a rewritten lead and the rest.
        source_at, source_len, rest_at = (26, 4, 26) if v4 else (22, 16, 22)
        # Without filtered links, every packet of the run goes to the same links (and,
        # from a peer, into the segment when it wants every source): decided once.
        local = route.local
        if ingress is None:
            uniform, deliver = not route.links_some, False
        else:
            uniform = (
                not route.links_some and ingress not in route.links_any and (local is None or route.local_any)
            )
            deliver = uniform and local is not None
        outputs = route.links_any
        # Packets for the same links (the same list: _outputs returns the route's own
        # list unless it had to filter) are queued together.
        pieces: list[tuple[bytes, bytes, int]] = []
        pieces_to = outputs
        for frame in frames:
            if v4:
                vihl = frame[14]
                size = (frame[16] << 8) | frame[17]
                malformed = not 0x45 <= vihl <= 0x4F or size < (vihl & 0x0F) * 4
            else:
                size = 40 + ((frame[18] << 8) | frame[19])
                malformed = frame[14] >> 4 != 6
            if malformed or 14 + size > len(frame):
                counters["dropped_malformed"] += 1
                continue
            if not uniform:
                outputs = self._outputs(route, frame, source_at, source_len, ingress)
            elif deliver:
                self.tap_out.append(frame)
                self.delivered += 1
            if not outputs:
                continue
            if not hop:
                lead = frame[14:rest_at]
            elif frame[22 if v4 else 21] <= 1:
                counters["dropped_ttl"] += 1
                continue
            elif v4:  # TTL, protocol, and the checksum updated for the TTL
                checksum = checksum_after_ttl_decrement((frame[24] << 8) | frame[25])
                lead = V4_LEAD.pack(frame[14:22], frame[22] - 1, frame[23], checksum)
            else:
                lead = V6_LEAD.pack(frame[14:21], frame[21] - 1)
            if outputs is not pieces_to:
                if pieces:
                    self._send_data(route, pieces, pieces_to)
                    pieces = []
                pieces_to = outputs
            pieces.append((lead, frame[rest_at : 14 + size], size))
        if pieces:
            self._send_data(route, pieces, pieces_to)

    def _outputs(
        self, route: GroupRoute, buf: bytes, source_at: int, source_len: int, ingress: PeerLink | None
    ) -> list[PeerLink]:
        """Deliver a peer's packet (`buf`: the frame it is on this segment) into the
        segment if it wants the source address at `source_at`; return the links the
        packet goes on to (never back where it came from). The lists returned are only
        read: most packets copy nothing here."""
        outputs = route.links_any
        if ingress is not None:
            local = route.local
            if local is not None and (
                route.local_any or local.admits(buf[source_at : source_at + source_len])
            ):
                self.tap_out.append(buf)
                self.delivered += 1
            if ingress in outputs:
                outputs = [link for link in outputs if link is not ingress]
        if route.links_some:
            source = buf[source_at : source_at + source_len]
            outputs = outputs + [
                link for link, want in route.links_some if link is not ingress and want.admits(source)
            ]
        return outputs

    def _send_data(
        self, route: GroupRoute, pieces: list[tuple[bytes, bytes, int]], outputs: list[PeerLink]
    ) -> None:
        """Queue on each output link one IP-Data message per packet of `pieces`: (its
        first bytes as they leave, the others, its size). The pieces wait in the links'
        queues and are joined when they leave; a datagram, or a message to seal, is
        joined now. A link whose queue is at its bound drops the packet and counts it."""
        address, udp_limit = route.overlay_address, self.udp_limit
        sent = dropped = 0
        for link in outputs:
            udp, auth = link.udp_port, link.auth
            stream, datagrams, stream_bytes = link.data, link.datagrams, link.data_bytes
            # The UDP limit is on the datagram as sent, Integrity object included.
            room = udp_limit - (INTEGRITY_LEN if auth else 0)
            seq, link_sent, last = link.seq, 0, -1
            limit = link.DATAGRAM_LIMIT if udp else link.DATA_LIMIT
            for lead, rest, size in pieces:
                if size != last:  # the head, padding and length of a packet this size
                    prefixes = route.prefixes
                    if prefixes[0] != size:
                        route.prefixes = prefixes = (
                            size,
                            ip_data_prefix(address, size),
                            ip_data_prefix(address, size, INTEGRITY_LEN),
                        )
                    prefix = prefixes[2] if auth else prefixes[1]  # sealed: counts the object
                    padding = PADDING[size & 3]
                    total = IP_DATA_HEAD_LEN + size + len(padding)
                    last = size
                if len(datagrams) >= limit if udp else stream_bytes > limit:
                    continue  # the link's queue is full: dropped
                seq = (seq + 1) & 0xFFFFFFFF
                link_sent += 1
                if udp and total > room:
                    link.seq = seq  # the fragments take sequence numbers from here on
                    self._send_fragments(link, address, lead + rest, size)
                    seq = link.seq
                    continue
                parts = (prefix, SEQ.pack(seq), lead, rest, padding)
                if udp:
                    datagrams.append(auth.seal_parts(parts, seq) if auth else b"".join(parts))
                else:
                    if auth:  # the message's pieces, sealed in one join when taken
                        stream.append(parts)
                    else:  # joined with the rest of the queue when taken
                        stream += parts
                    stream_bytes += total
            link.seq, link.data_bytes = seq, stream_bytes
            link.tx_packets += link_sent
            link.dropped_queue += len(pieces) - link_sent
            sent += link_sent
            dropped += len(pieces) - link_sent
        self.forwarded += sent
        if dropped:
            self.counters["dropped_queue"] += dropped

    def _send_fragments(self, link: PeerLink, address: int, packet: bytes | bytearray, size: int) -> None:
        """A packet too big for one datagram, in IP-Data fragments that each fit."""
        # Header 8, the piece's ClientSI head 12 (object header, address, sequence), the
        # fragment ClientSI 16; and the Integrity object when sealed.
        overhead = FRAGMENT_OVERHEAD + (INTEGRITY_LEN if link.auth else 0)
        step = (self.udp_limit - overhead) & ~7
        link.fragment_id = packet_id = (link.fragment_id + 1) & 0xFFFFFFFF
        for offset in range(0, size, step):
            if offset:
                link.seq = (link.seq + 1) & 0xFFFFFFFF
            chunk = bytes(packet[offset : min(offset + step, size)])
            message = codec.encode_fragment(address, link.seq, packet_id, offset, size, chunk)
            link.datagrams.append(link.auth.seal_datagram(message, link.seq) if link.auth else message)

    # -- from a peer ---------------------------------------------------------------

    def link_data(self, link: PeerLink, data: bytes | memoryview, now: float) -> None:
        """Bytes received on a peer's stream: frame them and act on each message. `data`
        may be a view of the runtime's receive buffer: nothing here keeps a reference."""
        link.last_rx = now
        link.rx_bytes += len(data)
        if link.rx:
            # First the message an earlier read left unfinished, completed on its own; the
            # rest of `data` is then framed where it lies, not copied after that tail.
            rx = link.rx
            if len(rx) < codec.HEADER_LEN:
                take = codec.HEADER_LEN - len(rx)
                rx += data[:take]
                data = data[take:]
            if len(rx) >= codec.HEADER_LEN:
                take = max(0, int.from_bytes(rx[4:8], "big") - len(rx))
                rx += data[:take]
                data = data[take:]
            link.rx = bytearray()
            self._frame_stream(link, rx, now)  # keeps it again if still unfinished
        if data and link.state != CLOSED:
            self._frame_stream(link, data, now)

    def _frame_stream(self, link: PeerLink, buf: bytes | bytearray | memoryview, now: float) -> None:
        """Act on each whole message in `buf`; keep what is left of a last one in `link.rx`."""
        offset, end = 0, len(buf)
        unpack_header = codec.COMMON_HEADER.unpack_from
        pending: list[tuple[GroupRoute, bytes]] = []  # data to carry, in order
        try:
            while end - offset >= codec.HEADER_LEN:
                flags, opcode, client_type, length = unpack_header(buf, offset)
                if (
                    flags != codec.VERSION_FLAGS
                    or client_type != codec.CLIENT_TYPE
                    or not codec.HEADER_LEN <= length <= codec.MAX_MESSAGE_LEN
                    or length & 3
                ):
                    codec.check_header(buf, offset)  # raises, naming what is wrong
                if end - offset < length:
                    break
                if opcode == codec.OP_IP_DATA and link.state == UP:
                    if link.auth is None:
                        self._ip_data(link, buf, offset, length, now, pending)
                    else:  # checked where it lies, and read without its Integrity object
                        link.auth.verify(buf[offset : offset + length])
                        self._ip_data(link, buf, offset, length - INTEGRITY_LEN, now, pending)
                else:
                    self._carry_pending(pending, link)  # data before this message first
                    message = bytes(buf[offset : offset + length])
                    if link.auth is not None:
                        message = self._unseal(link, message, now)  # may confirm the session
                    if opcode == codec.OP_IP_DATA and link.state == UP:
                        self._ip_data(link, message, 0, len(message), now, pending)
                    else:
                        self._control(link, codec.decode(message), now)
                offset += length
                if link.state == CLOSED:
                    break
        except codec.CodecError as exc:
            self._carry_pending(pending, link)  # what came before the bad message
            if isinstance(exc, IntegrityError):
                link.dropped_auth += 1
                self.counters["dropped_auth"] += 1
            else:
                self.counters["dropped_malformed"] += 1
            who = link.peer or link.open_name
            log.warning("bad message from %s at %s: %s", who or "a peer", link.address, exc)
            link.logged = True
            link.close(codec.CLOSE_BAD_MESSAGE, str(exc), now)
            self._forget(link, now)
            link.rx = bytearray()
            return
        self._carry_pending(pending, link)
        link.rx = bytearray(buf[offset:]) if offset < end else bytearray()

    def _unseal(self, link: PeerLink, message: bytes, now: float) -> bytes:
        """`message` verified and without its Integrity object; IntegrityError otherwise."""
        auth = link.auth
        assert auth is not None
        if link.state == OPENING:
            inner, key_id = auth.unseal_open(message)
            link.peer_key_id = key_id
            return inner
        if link.state == CLOSED:
            return auth.unseal_open(message)[0] if auth.session_key is None else auth.unseal(message)
        try:
            inner = auth.unseal(message)
        except IntegrityError:
            # A peer that refused our Open never started the session: its Close comes
            # sealed with the pre-shared key. Take it, so its reason is heard, not lost
            # behind a "bad HMAC" of our own.
            if link.state != CONFIRMING or message[1] != codec.OP_CLOSE:
                raise
            try:
                return auth.unseal_open(message)[0]
            except IntegrityError:
                raise IntegrityError("integrity: bad HMAC") from None
        if link.state == CONFIRMING:
            self._link_up(link, now)
        return inner

    def link_datagram(self, link: PeerLink, data: bytes | memoryview, now: float) -> None:
        """A datagram from the peer's UDP data channel: one IP-Data message."""
        self.link_datagrams(link, (data,), now)

    def link_datagrams(self, link: PeerLink, datagrams: Iterable[bytes | memoryview], now: float) -> None:
        """Datagrams from the peer's UDP data channel, in the order received. They may be
        views of the runtime's receive buffer: nothing here keeps a reference."""
        pending: list[tuple[GroupRoute, bytes]] = []  # data to carry, in order
        for data in datagrams:
            link.rx_bytes += len(data)
            try:
                opcode, length = codec.check_header(data, 0)
                if opcode != codec.OP_IP_DATA or length != len(data):
                    raise codec.CodecError("the UDP channel carries one ip-data message per datagram")
                if link.auth is not None:
                    link.auth.verify_datagram(data)
                    length -= INTEGRITY_LEN  # read without its Integrity object
                link.last_rx = now
                self._ip_data(link, data, 0, length, now, pending)
            except IntegrityError:
                link.dropped_auth += 1
                self.counters["dropped_auth"] += 1
            except codec.CodecError:
                self.counters["dropped_malformed"] += 1
        self._carry_pending(pending, link)

    def _ip_data(
        self,
        link: PeerLink,
        buf: bytes | bytearray | memoryview,
        offset: int,
        length: int,
        now: float,
        pending: list[tuple[GroupRoute, bytes]],
    ) -> None:
        """An IP-Data message from an up link, at `offset` in `buf`: the data fast path.
        A packet with a route goes into `pending` as the frame it would be on this
        segment (one copy, which the segment and further links share)."""
        if length < codec.IP_DATA_HEAD_LEN:
            raise codec.CodecError(f"ip-data message of {length} bytes has no object")
        objlen, cnum, ctype, seq = IP_DATA_FIELDS.unpack_from(buf, offset)
        if seq != link.rx_next:
            link.count_seq(seq)
        else:
            link.rx_next = (seq + 1) & 0xFFFFFFFF
        if (
            cnum != codec.CNUM_CLIENT_SI
            or ctype != 1
            or not codec.IP_DATA_MIN_OBJECT <= objlen <= length - 8
            or ((objlen + 3) & ~3) != length - 8
        ):
            # Not a whole packet: a fragment, or else a malformed message. The length in
            # its header counts an Integrity object that `length` leaves out.
            raw = bytearray(buf[offset : offset + length])
            raw[4:8] = length.to_bytes(4, "big")
            message = codec.decode(bytes(raw))
            assert isinstance(message, codec.IpData)
            if message.fragment is None:
                raise codec.CodecError("ip-data object does not fit its message")
            whole = link.reassembly.add(*message.fragment, message.packet, now)
            if whole is None:
                return
            buf, start, end = whole, 0, len(whole)
        else:
            start, end = offset + 20, offset + 8 + objlen
        link.rx_packets += 1
        # Only carried groups have routes, so a route found means a valid group.
        version = buf[start] >> 4
        if version == 4:
            group = bytes(buf[start + 16 : start + 20])
        elif version == 6 and end - start >= 40:
            group = bytes(buf[start + 24 : start + 40])
        else:
            self.counters["dropped_malformed"] += 1
            return
        route = self.routes.get(group)
        if route is None:
            self.counters["unwanted"] += 1
            return
        pending.append((route, route.eth_header + buf[start:end]))

    def _control(self, link: PeerLink, msg: codec.Message, now: float) -> None:
        if isinstance(msg, Open):
            expected = {peer for peer, dials in self.neighbours.items() if not dials}
            problem = link.on_open(msg, expected, now, link.peer_key_id)
            if problem is not None:
                log.warning("refused link from %r at %s: %s", msg.node, link.address, problem)
                link.logged = True
                self._forget(link, now)
            elif link.state == UP:
                self._link_up(link, now)
        elif link.state != UP:
            if isinstance(msg, Close):
                link.on_close(msg)
                self._forget(link, now)
            else:
                link.close(codec.CLOSE_BAD_MESSAGE, "message before open", now)
                self._forget(link, now)
        elif isinstance(msg, KeepAlive):
            link.on_keepalive(msg, now)
        elif isinstance(msg, AddRoute | RemoveRoute):
            peer = link.peer
            assert peer is not None
            updates: list[Update] = []
            touched: list[GroupRoute] = []
            asks = self.interest.requested.get(peer, {})
            over_limit = 0
            for route in msg.routes:
                if not self.carries(route.group):
                    self.counters["ignored_boundary"] += 1
                    continue
                if isinstance(msg, AddRoute) and (
                    len(route.sources) > self.max_peer_sources
                    or (route.group not in asks and len(asks) >= self.max_peer_groups)
                ):
                    over_limit += 1  # a flood: memory, not the tree's need
                    continue
                want = Filter(route.mode, frozenset(route.sources)) if isinstance(msg, AddRoute) else None
                updates += self.interest.set_requested(peer, route.group, want)
                touched.append(self._route(route.group))
            if over_limit:
                self.counters["ignored_route_limit"] += over_limit
                log.warning(
                    "%s asked for more than %d groups or %d sources a group: %d routes ignored",
                    peer,
                    self.max_peer_groups,
                    self.max_peer_sources,
                    over_limit,
                )
            # One pass per message, however many routes it carries.
            self._apply(updates, now)
            for group_route in touched:
                self._rebuild(group_route)
            self._prune(touched)
        elif isinstance(msg, Close):
            link.on_close(msg)
            self._forget(link, now)
        elif isinstance(msg, IpData):  # pragma: no cover - handled on the fast path
            pass

    def carries(self, group: bytes) -> bool:
        """Whether this node carries `group` across its links: never a link-local group,
        nor one inside a configured boundary."""
        if not carried(group):
            return False
        if self.config.boundaries:
            address = ipaddress.ip_address(group)
            return not any(address in prefix for prefix in self.config.boundaries)
        return True

    def _link_up(self, link: PeerLink, now: float) -> None:
        peer = link.peer
        assert peer is not None
        if link in self.pending:
            self.pending.remove(link)
        link.state = UP
        old = self.links.get(peer)
        if old is not None and old is not link:
            old.close(codec.CLOSE_REPLACED, "replaced by a new connection", now)
            self._forget(old, now)
        self.links[peer] = link
        if link.udp_port and link.address is not None:
            self.udp_peers[(link.address, link.udp_port)] = link
        self.last_errors.pop(peer, None)
        log.info("link to %s up (%s)", peer, link.transport)
        self._apply(self.interest.peer_up(peer), now)

    # -- membership and interest ---------------------------------------------------

    def _membership(self, actions: list[Any], now: float) -> None:
        for action in actions:
            if isinstance(action, SendQuery):
                self.tap_out.append(frame_for_ip(action.packet, self.mac))
            elif isinstance(action, MembershipChange) and self.carries(action.group):
                want = Filter(action.mode, frozenset(action.sources))
                if want.empty:
                    want = None
                self._apply(self.interest.set_local(action.group, want), now)
                route = self._route(action.group)
                self._rebuild(route)
                self._prune([route])

    def _apply(self, updates: list[Update], now: float) -> None:
        """Tell neighbours what changed in what we want from them."""
        adds: dict[str, list[Route]] = {}
        removes: dict[str, list[Route]] = {}
        for peer, group, want in updates:
            address = self.map_group(group)
            if want is None:
                removes.setdefault(peer, []).append(Route(address, group))
            elif len(want.sources) > codec.max_route_sources(len(group)):
                # More sources than one route object can list (the union of several
                # neighbours' and the segment's asks): ask for every source instead. More
                # comes across the link than is needed; each site still delivers only
                # what its own receivers want.
                self.counters["widened_routes"] += 1
                log.warning(
                    "asking %s for every source of %s: %d sources do not fit one route",
                    peer,
                    ipaddress.ip_address(group),
                    len(want.sources),
                )
                adds.setdefault(peer, []).append(Route(address, group))
            else:
                route = Route(address, group, want.mode, tuple(sorted(want.sources)))
                adds.setdefault(peer, []).append(route)
        for table, add in ((adds, True), (removes, False)):
            for peer, routes in table.items():
                link = self.links.get(peer)
                if link is None:
                    continue
                for message in codec.encode_routes(add, routes):
                    link.send(message)

    def _route(self, group: bytes) -> GroupRoute:
        route = self.routes.get(group)
        if route is None:
            ethertype = ETHERTYPE_IPV4 if len(group) == 4 else ETHERTYPE_IPV6
            route = GroupRoute(
                group,
                self.map_group(group),
                ethernet_header(multicast_mac(group), self.mac, ethertype),
            )
            self.routes[group] = route
        return route

    def _rebuild(self, route: GroupRoute) -> None:
        """Recompute which links want `route.group`, from what each neighbour asked."""
        route.links_any = []
        route.links_some = []
        for peer, asks in self.interest.requested.items():
            want = asks.get(route.group)
            link = self.links.get(peer)
            if want is None or link is None:
                continue
            if want.any_source:
                route.links_any.append(link)
            else:
                route.links_some.append((link, want))
        route.local = self.interest.local.get(route.group)
        route.local_any = route.local is not None and route.local.any_source

    def _prune(self, routes: Iterable[GroupRoute] | None = None) -> None:
        """Drop idle routes: those given, or all of them."""
        candidates = list(self.routes.values()) if routes is None else routes
        for route in candidates:
            if route.idle and self.routes.get(route.group) is route:
                del self.routes[route.group]

    # -- status --------------------------------------------------------------------

    def status(self, now: float) -> dict[str, Any]:
        from mcmw.status import node_status

        return node_status(self, now)
