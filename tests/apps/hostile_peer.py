"""A hostile or broken overlay peer, for tests: one action against a node, then a JSON report.

hostile_peer.py ACTION HOST PORT [options]

TCP actions (connect to the node's listen address; the report says what the node sent
back, decoded, and whether and when it closed the connection):

    garbage          random bytes
    oversize         a valid common header whose length is 2^31 - 4
    stall            a header announcing a 128 KiB message, 100 bytes of it, then silence
    before-open      a Keep-Alive (unsealed) as the first message
    bad-hmac-open    an Open sealed with a wrong key under the right key id
    unknown-key      an Open sealed under a key id the node does not have
    replay           a valid session, a Keep-Alive, then the same sealed bytes again
    bad-hmac         a valid session, then a Keep-Alive whose HMAC is wrong
    short-ip-data    a valid session, then an IP-Data of 8 bytes (a header, no object)
    open-replay      a valid session recorded; then, on a new connection, its Open and its
                     first sealed message replayed as they were (no key needed to do so)
    flood            a valid session, then --groups Add-Routes, --per-message per message;
                     keep-alives while holding the link --hold seconds; then Close
    open             an Open (with --name, --version, --bits, --mapping as given), then read
    slow             a valid session with a tiny receive window, an Add-Route for --group,
                     then keep-alives for --hold seconds (or until SIGTERM) and nothing read:
                     a peer that is alive but cannot keep up

UDP actions (the node's UDP data channel at HOST PORT):

    udp-garbage      --count datagrams of random bytes from this host (an unknown sender)
    udp-capture      capture one datagram going out of --dev to HOST PORT (a real peer's,
                     since this runs in that peer's namespace), then send it --count times
                     (replays), then --count times each: with its HMAC changed, with its
                     Integrity object cut off, cut to 8 and to 4 bytes, and as a bare
                     8-byte IP-Data header (length 8); all from the real peer's address
                     and port, on the wire through --dev; --only picks some of these

Options: --name (node name in Open), --version (protocol version in Open), --keys (key
file), --bits/--mapping (overlay), --dead.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

from overlay import codec
from overlay.auth import INTEGRITY_LEN, Authenticator, load_keys
from overlay.codec import AddRoute, Close, KeepAlive, Open, Route

ETH_P_ALL = 0x0003  # outgoing frames reach only ETH_P_ALL taps
PACKET_OUTGOING = 4


def strip_integrity(message: bytes) -> bytes:
    """The message without a trailing Integrity object (C-Num 16), its length fixed."""
    if len(message) >= 8 + INTEGRITY_LEN and message[-INTEGRITY_LEN + 2] == 16:
        inner = bytearray(message[:-INTEGRITY_LEN])
        struct.pack_into("!I", inner, 4, len(inner))
        return bytes(inner)
    return message


class Peer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if args.action == "slow":
            # Set before connecting, so the window the node sees is small from the start.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(5)
        self.sock.connect((args.host, args.port))
        self.buf = b""
        self.received: list[dict[str, Any]] = []
        self.raw_received: list[bytes] = []
        self.closed_after: float | None = None
        self.started = time.monotonic()
        keys = load_keys(Path(args.keys)) if args.keys else None
        self.auth = Authenticator(keys, os.urandom(16)) if keys else None

    def open_message(self, nonce: bytes | None = None) -> bytes:
        a = self.args
        nonce = nonce if nonce is not None else (self.auth.nonce if self.auth else bytes(16))
        return codec.encode(
            Open(a.name, a.bits, a.mapping, "hop", 0, int(a.dead), version=a.version, nonce=nonce)
        )

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            self.note_closed(str(exc))

    def note_closed(self, why: str) -> None:
        if self.closed_after is None:
            self.closed_after = time.monotonic() - self.started
            self.received.append({"type": "eof", "why": why})

    def read(self, until: float, want: str | None = None) -> None:
        """Read and decode until EOF, `until` seconds from now, or a message of type `want`."""
        deadline = time.monotonic() + until
        while self.closed_after is None and time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                break
            except OSError as exc:
                self.note_closed(str(exc))
                break
            if not data:
                self.note_closed("eof")
                break
            self.buf += data
            while len(self.buf) >= 8:
                length = struct.unpack_from("!I", self.buf, 4)[0]
                if len(self.buf) < length:
                    break
                message, self.buf = self.buf[:length], self.buf[length:]
                self.raw_received.append(message)
                self.received.append(describe(strip_integrity(message)))
                if want is not None and self.received[-1]["type"] == want:
                    return

    def session(self) -> None:
        """A valid Open exchange and the first sealed Keep-Alive: the link is up."""
        self.send(self.auth.seal_open(self.open_message()) if self.auth else self.open_message())
        self.read(5, want="open")
        opened = next((m for m in self.received if m["type"] == "open"), None)
        assert opened is not None, f"no Open from the node: {self.received}"
        if self.auth:
            self.auth.start_session(self.auth.signing_id, self.auth.nonce, bytes.fromhex(opened["nonce"]))
        self.send(self.sealed(codec.encode(KeepAlive(time.monotonic_ns(), 0, 0))))

    def sealed(self, message: bytes) -> bytes:
        return self.auth.seal(message) if self.auth else message

    def report(self, **extra: Any) -> dict[str, Any]:
        return {
            "received": self.received,
            "closed_after_s": self.closed_after,
            **extra,
        }


def describe(message: bytes) -> dict[str, Any]:
    try:
        msg = codec.decode(message)
    except codec.CodecError as exc:
        return {"type": "undecodable", "error": str(exc), "length": len(message)}
    if isinstance(msg, Open):
        return {"type": "open", "node": msg.node, "nonce": msg.nonce.hex()}
    if isinstance(msg, Close):
        return {"type": "close", "code": msg.code, "reason": msg.reason}
    return {"type": codec.MESSAGE_NAMES[message[1]]}


def tcp_action(args: argparse.Namespace) -> dict[str, Any]:
    action = args.action
    rng = random.Random(args.seed)
    peer = Peer(args)
    extra: dict[str, Any] = {}
    if action == "garbage":
        peer.send(rng.randbytes(4096))
    elif action == "oversize":
        peer.send(struct.pack("!BBHI", 0x10, codec.OP_ADD_ROUTE, codec.CLIENT_TYPE, 0x7FFFFFFC) + bytes(64))
    elif action == "stall":
        peer.send(struct.pack("!BBHI", 0x10, codec.OP_ADD_ROUTE, codec.CLIENT_TYPE, codec.MAX_MESSAGE_LEN))
        peer.send(bytes(92))
    elif action == "before-open":
        peer.send(codec.encode(KeepAlive(1, 0, 0)))
    elif action in ("bad-hmac-open", "unknown-key"):
        assert peer.auth is not None
        signing = peer.auth.signing_id
        if action == "bad-hmac-open":
            peer.auth.keys = {signing: b"not-the-shared-secret-at-all"}
        else:
            peer.auth.keys = {999: peer.auth.keys[signing]}
            peer.auth.signing_id = 999
        peer.send(peer.auth.seal_open(peer.open_message()))
    elif action == "replay":
        peer.session()
        message = peer.sealed(codec.encode(KeepAlive(time.monotonic_ns(), 0, 0)))
        peer.send(message)
        peer.send(message)
    elif action == "bad-hmac":
        peer.session()
        message = bytearray(peer.sealed(codec.encode(KeepAlive(time.monotonic_ns(), 0, 0))))
        message[-1] ^= 0xFF
        peer.send(bytes(message))
    elif action == "short-ip-data":
        peer.session()
        peer.read(0.5)
        header_only = struct.pack("!BBHI", 0x10, codec.OP_IP_DATA, codec.CLIENT_TYPE, 8)
        peer.send(peer.sealed(header_only))
    elif action == "flood":
        peer.session()
        peer.read(1)
        started = time.monotonic()
        routes = [
            Route(0, socket.inet_aton(f"239.{200 + i // 65536}.{i // 256 % 256}.{i % 256}"))
            for i in range(args.groups)
        ]
        for start in range(0, len(routes), args.per_message):
            peer.send(peer.sealed(codec.encode(AddRoute(tuple(routes[start : start + args.per_message])))))
            if peer.closed_after is not None:
                break
        extra["sent_s"] = round(time.monotonic() - started, 3)
        # A keep-alive after the flood: when the node echoes it, it has read everything.
        stamp = time.monotonic_ns()
        peer.send(peer.sealed(codec.encode(KeepAlive(stamp, 0, 0))))
        peer.raw_received.clear()
        deadline = time.monotonic() + args.hold
        echoed = None
        while time.monotonic() < deadline and peer.closed_after is None:
            peer.read(0.5)
            for raw in peer.raw_received:
                inner = strip_integrity(raw)
                if echoed is None and inner[1] == codec.OP_KEEPALIVE:
                    ka = codec.decode(inner)
                    if isinstance(ka, KeepAlive) and ka.echo_ns >= stamp:
                        echoed = time.monotonic() - started
            peer.raw_received.clear()
            peer.send(peer.sealed(codec.encode(KeepAlive(time.monotonic_ns(), 0, 0))))
        extra["echoed_after_s"] = None if echoed is None else round(echoed, 3)
        peer.send(peer.sealed(codec.encode(Close(codec.CLOSE_NORMAL, "flood done"))))
    elif action == "open":
        peer.send(peer.auth.seal_open(peer.open_message()) if peer.auth else peer.open_message())
    elif action == "slow":
        peer.session()
        peer.read(0.5)
        route = Route(0, socket.inet_aton(args.group))
        peer.send(peer.sealed(codec.encode(AddRoute((route,)))))
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
        print(json.dumps({"asked": args.group}), flush=True)
        deadline = time.monotonic() + args.hold
        while time.monotonic() < deadline and not stop and peer.closed_after is None:
            # Alive (the node hears from it) but reading nothing.
            peer.send(peer.sealed(codec.encode(KeepAlive(time.monotonic_ns(), 0, 0))))
            time.sleep(0.3)
        extra["held_s"] = round(time.monotonic() - peer.started, 3)
        return peer.report(**extra)
    else:
        raise SystemExit(f"unknown action {action}")
    peer.read(args.wait)
    # Keep only what tells the story: drop the node's routine Keep-Alives and Add-Routes.
    peer.received = [m for m in peer.received if m["type"] not in ("keepalive", "add-route", "remove-route")]
    return peer.report(**extra)


def open_replay(args: argparse.Namespace) -> dict[str, Any]:
    """Record a real session's first two messages, then replay them on a new connection."""
    first = Peer(args)
    assert first.auth is not None
    sealed_open = first.auth.seal_open(first.open_message())
    first.send(sealed_open)
    first.read(5, want="open")
    opened = next(m for m in first.received if m["type"] == "open")
    first.auth.start_session(first.auth.signing_id, first.auth.nonce, bytes.fromhex(opened["nonce"]))
    sealed_ka = first.auth.seal(codec.encode(KeepAlive(time.monotonic_ns(), 0, 0)))
    first.send(sealed_ka)
    first.read(1)
    first.sock.close()
    # An eavesdropper without the key replays both, byte for byte.
    second = Peer(args)
    second.auth = None
    second.send(sealed_open)
    second.read(1, want="open")
    second.send(sealed_ka)
    second.read(args.wait)
    second.received = [m for m in second.received if m["type"] not in ("keepalive", "add-route")]
    return second.report()


# -- UDP ------------------------------------------------------------------------------------


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def reframe(frame: bytes, payload: bytes) -> bytes:
    """`frame` (Ethernet, IPv4, UDP) with its UDP payload replaced; lengths and the IP
    checksum fixed, the UDP checksum set to 0 (none)."""
    ihl = (frame[14] & 0x0F) * 4
    ip = bytearray(frame[14 : 14 + ihl])
    struct.pack_into("!H", ip, 2, ihl + 8 + len(payload))
    struct.pack_into("!H", ip, 10, 0)
    struct.pack_into("!H", ip, 10, checksum(bytes(ip)))
    udp = bytearray(frame[14 + ihl : 14 + ihl + 8])
    struct.pack_into("!HH", udp, 4, 8 + len(payload), 0)
    return frame[:14] + bytes(ip) + bytes(udp) + payload


def udp_action(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    if args.action == "udp-garbage":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(args.count):
            sock.sendto(rng.randbytes(rng.randrange(1, 1400)), (args.host, args.port))
        return {"sent": args.count}
    # udp-capture: take one real datagram to the node's port off the wire.
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    raw.bind((args.dev, ETH_P_ALL))
    raw.settimeout(5)
    target = socket.inet_aton(args.host)
    deadline = time.monotonic() + 5
    frame = b""
    while time.monotonic() < deadline:
        data, address = raw.recvfrom(65536)
        if len(data) < 42:
            continue
        ihl = (data[14] & 0x0F) * 4
        if (
            address[2] == PACKET_OUTGOING
            and data[12:14] == b"\x08\x00"
            and data[23] == socket.IPPROTO_UDP
            and data[30:34] == target
            and struct.unpack_from("!H", data, 14 + ihl + 2)[0] == args.port
        ):
            frame = data
            break
    if not frame:
        raise SystemExit("no datagram to capture")
    ihl = (frame[14] & 0x0F) * 4
    total = struct.unpack_from("!H", frame, 16)[0]
    payload = frame[14 + ihl + 8 : 14 + total]
    seq = struct.unpack_from("!I", payload, 16)[0]
    header_only = bytearray(payload[:8])
    struct.pack_into("!I", header_only, 4, 8)
    bad_hmac = bytearray(payload)
    bad_hmac[-1] ^= 0x55
    unsealed = strip_integrity(payload)
    sent: dict[str, int] = {}
    for name, body in (
        ("replay", payload),
        ("bad_hmac", bytes(bad_hmac)),
        ("no_integrity", unsealed),
        ("cut_to_8", payload[:8]),
        ("cut_to_4", payload[:4]),
        ("header_only", bytes(header_only)),
    ):
        if args.only and name not in args.only.split(","):
            continue
        # Rebuilt even for the replay: a frame taken on its way out may carry a partial
        # UDP checksum (offload), which the receiving kernel would reject.
        wire = reframe(frame, body)
        for _ in range(args.count):
            raw.send(wire)
        sent[name] = args.count
    return {"captured_seq": seq, "captured_len": len(payload), "sent": sent}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("action")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--name", default="h")
    parser.add_argument("--version", type=int, default=codec.PROTOCOL_VERSION)
    parser.add_argument("--group", default="239.1.1.1")
    parser.add_argument("--keys")
    parser.add_argument("--bits", type=int, default=24)
    parser.add_argument("--mapping", default="modulo")
    parser.add_argument("--dead", type=float, default=3)
    parser.add_argument("--wait", type=float, default=5, help="seconds to read the node's answer")
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--groups", type=int, default=1000)
    parser.add_argument("--per-message", type=int, default=1)
    parser.add_argument("--hold", type=float, default=3)
    parser.add_argument("--dev", default="")
    parser.add_argument("--only", default="", help="udp-capture: which forgeries, comma-separated")
    args = parser.parse_args()
    if args.action.startswith("udp-"):
        result = udp_action(args)
    elif args.action == "open-replay":
        result = open_replay(args)
    else:
        result = tcp_action(args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
