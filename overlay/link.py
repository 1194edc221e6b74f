"""One peer link's state machine, sans-IO: open handshake, keep-alives, dead interval, close.

The link owns its output queues: control messages (`ctrl`) always leave before
data (`data` on the TCP stream, `datagrams` on the UDP channel), and data beyond a
bound is dropped and counted, so a slow peer never holds up the others. The node
frames received bytes itself (the data path lives there) and asks the link to
verify integrity when a key is configured.
"""

from __future__ import annotations

import secrets
from dataclasses import replace

from overlay import codec
from overlay.auth import Authenticator
from overlay.codec import Close, KeepAlive, Open
from overlay.reassembly import Reassembler

OPENING, CONFIRMING, UP, CLOSED = "opening", "confirming", "up", "closed"
SEQ_MASK = 0xFFFFFFFF  # sequence numbers are 32-bit fields on the wire
# An authenticated link is closed (and redialed, with a new session key) this far before
# its sequence numbers would wrap: after a wrap the replay checks would refuse everything,
# and a recorded message would look new again.
SEQ_LIMIT = 2**32 - 2**24


class PeerLink:
    """A TCP connection to a neighbour, from connect (or accept) to close."""

    DATA_LIMIT = 2 * 1024 * 1024  # data bytes queued for the socket before data is dropped
    DATAGRAM_LIMIT = 4096  # datagrams queued for the UDP socket before data is dropped

    def __init__(
        self,
        local_open: Open,
        peer: str | None,
        dialer: bool,
        keepalive_interval: float,
        dead_interval: float,
        now: float,
        keys: dict[int, bytes] | None = None,
        address: str | None = None,
        nonce: bytes | None = None,
    ) -> None:
        self.peer = peer  # known up front when dialing; learned from Open when accepting
        self.dialer = dialer
        self.address = address  # the peer's IP address, for the UDP channel
        self.keepalive_interval = keepalive_interval
        self.dead_interval = dead_interval
        self.auth = Authenticator(keys, nonce or secrets.token_bytes(16)) if keys else None
        self.local_open = replace(local_open, nonce=self.auth.nonce) if self.auth else local_open
        self.state = OPENING
        self.sealed = bytearray()  # ready for the stream: Opens, and Closes before a session
        self.ctrl: list[bytes] = []  # control messages, sealed when taken
        # IP-Data for the stream, joined when taken: on a link without authentication the
        # pieces of the messages one after another, with it each message's pieces
        # (sealed as they are joined; its header counts the Integrity object already).
        self.data: list[bytes | tuple[bytes, ...]] = []
        self.data_bytes = 0
        self.datagrams: list[bytes] = []  # IP-Data for the UDP channel, sealed already
        self.rx = bytearray()
        self.udp_port = 0  # the peer's UDP data port, when both ends have one
        self.seq = 0
        self.rx_next = 0
        self.rx_started = False
        self.opened_at = now
        self.last_rx = now
        self.last_keepalive = now
        self.peer_timestamp = 0
        self.peer_timestamp_at = now
        self.rtt_ms: float | None = None
        self.close_code = 0
        self.close_reason = ""
        self.tx_packets = self.rx_packets = 0
        self.rx_bytes = 0
        self.rx_lost = self.rx_reordered = 0
        self.dropped_queue = 0
        self.dropped_auth = 0
        self.peer_key_id = 0  # the pre-shared key the peer's Open was sealed with
        self.session_key_id = 0  # the pre-shared key this connection's session derives from
        self.open_name: str | None = None  # the name the peer's Open gave, even if refused
        self.logged = False  # the node already logged why this connection failed
        self.forgotten = False  # the node has taken the link out of its tables
        self.fragment_id = 0
        self.reassembly = Reassembler()
        encoded = codec.encode(self.local_open)
        self.sealed += self.auth.seal_open(encoded) if self.auth else encoded

    @property
    def up(self) -> bool:
        return self.state == UP

    @property
    def transport(self) -> str:
        return "udp" if self.udp_port else "tcp"

    def send(self, message: bytes) -> None:
        """Queue a control message."""
        if self.state != CLOSED:
            self.ctrl.append(message)

    @property
    def has_output(self) -> bool:
        return bool(self.sealed or self.ctrl or self.data)

    def take_output(self) -> bytes:
        """Everything queued for the stream, control first, sealed in the order it leaves
        (so sequence numbers rise on the wire); the queues are emptied."""
        if self.auth is None:
            messages = self.ctrl + self.data
        else:  # control messages get their Integrity object; data was built counting it
            seal, seal_parts = self.auth.seal, self.auth.seal_parts
            messages = [seal(m) for m in self.ctrl] + [seal_parts(m) for m in self.data]
        if self.sealed:
            messages.insert(0, bytes(self.sealed))
            self.sealed.clear()
        out = b"".join(messages)
        self.ctrl.clear()
        self.data.clear()
        self.data_bytes = 0
        return out

    def close(self, code: int, reason: str, now: float) -> None:
        """Tell the peer why, and stop; the transport closes once the output is flushed."""
        if self.state == CLOSED:
            return
        message = codec.encode(Close(code, reason))
        if self.auth is not None and self.auth.session_key is None:
            self.sealed += self.auth.seal_open(message)  # no session yet: the pre-shared key
        else:
            self.send(message)
        self.data.clear()
        self.data_bytes = 0
        self.datagrams.clear()
        self.state = CLOSED
        self.close_code, self.close_reason = code, reason

    def lost(self, reason: str) -> None:
        """The transport lost the connection."""
        if self.state != CLOSED:
            self.state = CLOSED
            self.close_reason = reason

    def on_open(self, msg: Open, expected: set[str], now: float, peer_key_id: int = 0) -> str | None:
        """Check the peer's Open; return the problem (the link is then closed), or None."""
        mine = self.local_open
        problem = None
        if self.open_name is None:
            self.open_name = msg.node
        if self.state != OPENING:
            problem = "second open on one link"
        elif msg.version != mine.version:
            problem = f"protocol version {msg.version}, expected {mine.version}"
        elif self.peer is not None and msg.node != self.peer:
            problem = f"node {msg.node!r} answered, expected {self.peer!r}"
        elif self.peer is None and msg.node not in expected:
            problem = f"node {msg.node!r} is not a neighbour that dials {mine.node!r}"
        elif (msg.address_bits, msg.mapping) != (mine.address_bits, mine.mapping):
            problem = (
                f"overlay {msg.mapping}/{msg.address_bits} bits, "
                f"expected {mine.mapping}/{mine.address_bits} bits"
            )
        elif msg.ttl_mode != mine.ttl_mode:
            problem = f"ttl mode {msg.ttl_mode}, expected {mine.ttl_mode}"
        if problem is not None:
            self.close(codec.CLOSE_MISMATCH, problem, now)
            return problem
        self.peer = msg.node
        if mine.udp_port and msg.udp_port and self.address is not None:
            self.udp_port = msg.udp_port
        if self.auth is not None:
            # The session key derives from the dialer's pre-shared key.
            self.session_key_id = self.auth.signing_id if self.dialer else peer_key_id
            if self.dialer:
                self.auth.start_session(self.auth.signing_id, self.auth.nonce, msg.nonce)
            else:
                self.auth.start_session(peer_key_id, msg.nonce, self.auth.nonce)
            # Up only once the peer proves the session key: a recorded Open replayed
            # by someone without the key never replaces a working link.
            self.state = CONFIRMING
        else:
            self.state = UP
        self.keepalive(now)  # at once: it confirms the session and starts the RTT
        return None

    def keepalive(self, now: float) -> None:
        held = int((now - self.peer_timestamp_at) * 1e9) if self.peer_timestamp else 0
        self.send(codec.encode(KeepAlive(int(now * 1e9), self.peer_timestamp, held)))
        self.last_keepalive = now

    def on_keepalive(self, msg: KeepAlive, now: float) -> None:
        self.peer_timestamp = msg.timestamp_ns
        self.peer_timestamp_at = now
        if msg.echo_ns:
            # NTP-style: our own timestamp came back, less the time the peer held it.
            self.rtt_ms = max(0.0, (int(now * 1e9) - msg.echo_ns - msg.held_ns) / 1e6)

    def on_close(self, msg: Close) -> None:
        self.state = CLOSED
        self.close_code, self.close_reason = msg.code, f"peer closed: {msg.reason}"

    def count_seq(self, seq: int) -> None:
        """Loss and reordering of the peer's data, from its per-link sequence numbers, in
        serial-number arithmetic (RFC 1982): they wrap after 2^32 messages."""
        if not self.rx_started:
            self.rx_started = True
            self.rx_next = (seq + 1) & SEQ_MASK
            return
        ahead = (seq - self.rx_next) & SEQ_MASK
        if ahead < 2**31:
            self.rx_lost += ahead
            self.rx_next = (seq + 1) & SEQ_MASK
        else:
            self.rx_reordered += 1
            self.rx_lost = max(0, self.rx_lost - 1)

    def tick(self, now: float) -> None:
        """Send a keep-alive when due; close the link when the peer has gone silent."""
        if self.state == CLOSED:
            return
        if now - self.last_rx >= self.dead_interval:
            self.close(codec.CLOSE_DEAD, f"nothing heard for {self.dead_interval:g}s", now)
        elif self.auth is not None and max(self.auth.tx_seq, self.seq) >= SEQ_LIMIT:
            reason = "sequence numbers nearly used up: reconnect for a new session key"
            self.close(codec.CLOSE_NORMAL, reason, now)
        elif self.state == UP and now - self.last_keepalive >= self.keepalive_interval:
            # Sent even while data flows: keep-alives also measure the round-trip time.
            self.keepalive(now)

    def next_deadline(self) -> float:
        if self.state == UP:
            return min(self.last_keepalive + self.keepalive_interval, self.last_rx + self.dead_interval)
        return self.last_rx + self.dead_interval
