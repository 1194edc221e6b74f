"""The node's data path without I/O: microseconds of Python per packet.

    .venv/bin/python tools/bench/core.py [--batch 1,4,64] [--seconds 1] [--udp] [--auth]
                                         [--src CHECKOUT]

Builds the two-node tree of the benchmark in memory (no TAP, no sockets, no root):
node a and node b exchange Open through their link buffers, b's segment joins 239.1.1.1
with an IGMPv2 report, and then it times

- a: `Node.tap_frames` on 1316-byte datagrams (parse, route, TTL, IP-Data encode, with
  `--auth` the HMAC), plus taking the link's output as the runtime does before a send
- b: `Node.link_data` on the IP-Data bytes a produced (frame, verify, route, Ethernet
  frame), or with `--udp` `Node.link_datagrams` on the datagrams a produced

per packet, for several batch sizes (frames per TAP read / messages per recv). The
figures are CPU time of this process, so they are the Python part of `fwd us/pkt` in
`run.py`'s table; the rest is syscalls and the event loop. Use it before and after a
change to the hot path.
"""

from __future__ import annotations

import argparse
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from topology import GROUP, SIZE, TAP_A, TAP_B, VETH_A, VETH_B, mcmw_tree

HERE = Path(__file__).resolve().parent


def checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(src: str, dst: str, proto: int, ttl: int, payload: bytes, options: bytes = b"") -> bytes:
    ihl = (20 + len(options)) // 4
    head = (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | ihl,
            0,
            ihl * 4 + len(payload),
            0,
            0x4000,
            ttl,
            proto,
            0,
            bytes(map(int, src.split("."))),
            bytes(map(int, dst.split("."))),
        )
        + options
    )
    head = head[:10] + struct.pack("!H", checksum(head)) + head[12:]
    return head + payload


def ethernet(dst_group: str, packet: bytes) -> bytes:
    g = bytes(map(int, dst_group.split(".")))
    return bytes([1, 0, 0x5E, g[1] & 0x7F, g[2], g[3]]) + bytes([2, 0, 0, 0, 0, 1]) + b"\x08\x00" + packet


def data_frame(seq: int) -> bytes:
    """A 1316-byte datagram to GROUP:5001 from A's TAP address, TTL 16, as the TAP reads it."""
    payload = struct.pack("!IIQ", 0x4D434D57, 1, seq) + bytes(SIZE - 16)
    udp = struct.pack("!HHHH", 40000, 5001, 8 + SIZE, 0) + payload
    return ethernet(GROUP, ipv4(TAP_A, GROUP, 17, 16, udp))


def igmpv2_report() -> bytes:
    """What the kernel sends when a socket on B's segment joins GROUP (with Router Alert)."""
    group = bytes(map(int, GROUP.split(".")))
    body = struct.pack("!BBH4s", 0x16, 0, 0, group)
    body = body[:2] + struct.pack("!H", checksum(body)) + body[4:]
    return ethernet(GROUP, ipv4(TAP_B, GROUP, 2, 1, body, options=b"\x94\x04\x00\x00"))


def drain(link: Any) -> bytes:
    """Everything the node queued for a peer's stream (the runtime's send path)."""
    if hasattr(link, "take_output"):
        return link.take_output() if link.has_output else b""
    data = bytes(link.tx)  # older nodes kept one tx bytearray per link
    link.tx.clear()
    return data


Timer = Callable[[int, int], tuple[float, float]]


def build(transport: str, auth: bool) -> Timer:
    """Two connected nodes with a route for GROUP from a to b's segment; returns a timer
    of both sides: (a's, b's) microseconds per packet for `rounds` batches of `batch`."""
    from mcmw.config import load_tree
    from mcmw.node import Node

    udp = transport == "udp"
    now = 1000.0
    with tempfile.TemporaryDirectory() as tmp:
        tree_file = Path(tmp) / "tree.yaml"
        if auth:
            (Path(tmp) / "psk.key").write_text("1 " + "k" * 32 + "\n")
            (Path(tmp) / "psk.key").chmod(0o600)
        tree_file.write_text(mcmw_tree(transport, "psk.key" if auth else None))
        tree = load_tree(tree_file)
        a, b = Node(tree, "a", now), Node(tree, "b", now)  # keys are read here
    if udp:  # the UDP channel is at the address the TCP link reaches the peer at
        la, lb = a.new_link("b", now, VETH_B), b.new_link(None, now, VETH_A)
    else:
        la, lb = a.new_link("b", now), b.new_link(None, now)

    def pump() -> None:
        for _ in range(4):
            for src, dst, link in ((la, b, lb), (lb, a, la)):
                data = drain(src)
                if data:
                    dst.link_data(link, data, now)

    pump()
    b.tap_frames([igmpv2_report()], now)
    pump()
    group = bytes(map(int, GROUP.split(".")))
    if group not in a.routes or not la.up:
        raise SystemExit(f"core: node a has no route for {GROUP} towards b; cannot measure")
    if udp and not la.udp_port:
        raise SystemExit("core: the link did not take the UDP channel; cannot measure")

    frames = [data_frame(i) for i in range(256)]

    def take() -> Any:
        """What a queued for b in one batch: stream bytes, or the list of datagrams."""
        if udp:
            datagrams = list(la.datagrams)
            la.datagrams.clear()
            return datagrams
        return drain(la)

    def deliver(output: Any) -> None:
        if udp and hasattr(b, "link_datagrams"):  # a receive's datagrams, as the runtime gives them
            b.link_datagrams(lb, output, now)
        elif udp:  # older nodes took them one by one
            for datagram in output:
                b.link_datagram(lb, datagram, now)
        else:
            b.link_data(lb, output, now)
        b.tap_out.clear()

    def timer(batch: int, rounds: int) -> tuple[float, float]:
        # b gets what a sent in this very run: authenticated messages carry rising
        # sequence numbers, and a replayed one would be refused, not forwarded.
        batch_frames, outputs = frames[:batch], []
        t0 = time.process_time()
        for _ in range(rounds):
            a.tap_frames(batch_frames, now)
            outputs.append(take())
        t1 = time.process_time()
        delivered = b.delivered
        for output in outputs:
            deliver(output)
        t2 = time.process_time()
        if b.delivered - delivered != rounds * batch:
            raise SystemExit(f"core: b delivered {b.delivered - delivered} of {rounds * batch}: {b.counters}")
        return (t1 - t0) / (rounds * batch) * 1e6, (t2 - t1) / (rounds * batch) * 1e6

    return timer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="mcmw node data path, Python cost per packet")
    p.add_argument("--batch", default="1,4,64", help="frames per call (default %(default)s)")
    p.add_argument("--seconds", type=float, default=1.0, help="CPU seconds per figure")
    p.add_argument("--udp", action="store_true", help="IP-Data over the UDP data channel")
    p.add_argument("--auth", action="store_true", help="authenticated links (secret_file)")
    p.add_argument(
        "--src",
        type=Path,
        default=HERE.parent.parent,
        help="the checkout whose mcmw is measured (default: this one), for before/after",
    )
    args = p.parse_args(argv)
    sys.path.insert(0, str(args.src.resolve()))
    timer = build("udp" if args.udp else "tcp", args.auth)
    b_name = "b: link_datagrams" if args.udp else "b: link_data"
    print(f"{'batch':>5s} {'a: tap_frames':>14s} {b_name:>17s} {'sum':>6s}   us/pkt")
    for batch in (int(x) for x in args.batch.split(",")):
        # In slices of at most 20 000 packets (what a sends is kept for b), ~5 us each.
        packets = max(batch, int(args.seconds * 1e6 / 5))
        rounds = max(1, min(packets, 20000) // batch)
        slices = [timer(batch, rounds) for _ in range(max(1, packets // (rounds * batch)))]
        ua = sum(a for a, _ in slices) / len(slices)
        ub = sum(b for _, b in slices) / len(slices)
        print(f"{batch:5d} {ua:14.2f} {ub:17.2f} {ua + ub:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
