"""One peer link's state machine, sans-IO: open handshake, keep-alives, dead interval, close.

The link owns its byte buffers; the transport moves `tx` to the socket and feeds
received bytes to the node, which frames them (the data path lives there).
"""

from __future__ import annotations

from overlay import codec
from overlay.codec import Close, KeepAlive, Open

OPENING, UP, CLOSED = "opening", "up", "closed"


class PeerLink:
    """A TCP connection to a neighbour, from connect (or accept) to close."""

    TX_LIMIT = 4 * 1024 * 1024  # bytes queued for the socket before data is dropped

    def __init__(
        self,
        local_open: Open,
        peer: str | None,
        dialer: bool,
        keepalive_interval: float,
        dead_interval: float,
        now: float,
    ) -> None:
        self.local_open = local_open
        self.peer = peer  # known up front when dialing; learned from Open when accepting
        self.dialer = dialer
        self.keepalive_interval = keepalive_interval
        self.dead_interval = dead_interval
        self.state = OPENING
        self.tx = bytearray()
        self.rx = bytearray()
        self.seq = 0
        self.opened_at = now
        self.last_rx = now
        self.last_keepalive = now
        self.peer_timestamp = 0
        self.peer_timestamp_at = now
        self.rtt_ms: float | None = None
        self.close_code = 0
        self.close_reason = ""
        self.remote_reason = ""
        self.tx_packets = self.rx_packets = 0
        self.tx_bytes = self.rx_bytes = 0
        self.dropped_queue = 0
        self.send(codec.encode(local_open))

    @property
    def up(self) -> bool:
        return self.state == UP

    def send(self, message: bytes) -> None:
        if self.state != CLOSED:
            self.tx += message

    def close(self, code: int, reason: str, now: float) -> None:
        """Tell the peer why, and stop; the transport closes once `tx` is flushed."""
        if self.state == CLOSED:
            return
        self.send(codec.encode(Close(code, reason)))
        self.state = CLOSED
        self.close_code, self.close_reason = code, reason

    def lost(self, reason: str) -> None:
        """The transport lost the connection."""
        if self.state != CLOSED:
            self.state = CLOSED
            self.close_reason = reason

    def on_open(self, msg: Open, expected: set[str], now: float) -> str | None:
        """Check the peer's Open; return the problem, or None and go up."""
        mine = self.local_open
        problem = None
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
        self.state = UP
        return None

    def on_keepalive(self, msg: KeepAlive, now: float) -> None:
        self.peer_timestamp = msg.timestamp_ns
        self.peer_timestamp_at = now
        if msg.echo_ns:
            # NTP-style: our own timestamp came back, less the time the peer held it.
            self.rtt_ms = max(0.0, (int(now * 1e9) - msg.echo_ns - msg.held_ns) / 1e6)

    def on_close(self, msg: Close) -> None:
        self.remote_reason = msg.reason
        self.state = CLOSED
        self.close_code, self.close_reason = msg.code, f"peer closed: {msg.reason}"

    def tick(self, now: float) -> None:
        """Send a keep-alive when due; close the link when the peer has gone silent."""
        if self.state == CLOSED:
            return
        if now - self.last_rx >= self.dead_interval:
            self.close(codec.CLOSE_DEAD, f"nothing heard for {self.dead_interval:g}s", now)
        elif self.state == UP and now - self.last_keepalive >= self.keepalive_interval:
            # Sent even while data flows: keep-alives also measure the round-trip time.
            held = int((now - self.peer_timestamp_at) * 1e9) if self.peer_timestamp else 0
            ka = KeepAlive(int(now * 1e9), self.peer_timestamp, held)
            self.send(codec.encode(ka))
            self.last_keepalive = now

    def next_deadline(self) -> float:
        if self.state == UP:
            return min(
                self.last_keepalive + self.keepalive_interval, self.last_rx + self.dead_interval
            )
        return self.last_rx + self.dead_interval
