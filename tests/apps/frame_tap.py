"""Capture every frame on an interface and inject crafted ones, on command.

frame_tap.py IFNAME: one AF_PACKET socket bound to IFNAME. Frames sent on it leave
through IFNAME (on a TAP: they reach the process behind the TAP, as if a host on the
segment had sent them); every frame seen on IFNAME in either direction is kept, with
its CLOCK_MONOTONIC arrival time. Prints {"ready": true}, then answers each stdin line
with one JSON line:

    send HEX [HEX ...]   inject these frames      -> {"ok": true, "t": MONOTONIC}
    save PATH            write the capture so far as a pcap (timestamps: monotonic)
                                                  -> {"ok": true, "frames": N}
    quit

Frames this socket injects are kept in the capture too (the kernel does not loop them
back to their own socket), so the pcap shows the whole exchange.

Importable: `read_pcap` and `write_pcap` are the small pcap reader/writer the tests use.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import struct
import sys
import time
from collections.abc import Iterable

ETH_P_ALL = 0x0003
PCAP_MAGIC = 0xA1B2C3D4
LINKTYPE_ETHERNET = 1
SNAPLEN = 65535


def write_pcap(path: str, frames: Iterable[tuple[float, bytes]]) -> int:
    """Write (time, frame) pairs as a classic little-endian pcap; return how many."""
    count = 0
    with open(path, "wb") as out:
        out.write(struct.pack("<IHHiIII", PCAP_MAGIC, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET))
        for stamp, frame in frames:
            seconds = int(stamp)
            micros = int(round((stamp - seconds) * 1e6))
            if micros >= 1_000_000:
                seconds, micros = seconds + 1, micros - 1_000_000
            out.write(struct.pack("<IIII", seconds, micros, len(frame), len(frame)) + frame)
            count += 1
    return count


def read_pcap(path: str) -> list[tuple[float, bytes]]:
    """(time, frame) pairs of a classic microsecond pcap written by `write_pcap`."""
    with open(path, "rb") as src:
        data = src.read()
    magic = struct.unpack_from("<I", data)[0]
    endian = "<" if magic == PCAP_MAGIC else ">"
    offset, frames = 24, []
    while offset + 16 <= len(data):
        seconds, micros, incl, _orig = struct.unpack_from(endian + "IIII", data, offset)
        offset += 16
        frames.append((seconds + micros / 1e6, data[offset : offset + incl]))
        offset += incl
    return frames


def main() -> None:
    ifname = sys.argv[1]
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind((ifname, 0))
    sock.setblocking(False)
    captured: list[tuple[float, bytes]] = []
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ, "sock")
    selector.register(sys.stdin, selectors.EVENT_READ, "stdin")
    print(json.dumps({"ready": True}), flush=True)
    pending = b""
    running = True

    def drain() -> None:
        while True:
            try:
                frame = sock.recv(SNAPLEN)
            except BlockingIOError:
                return
            captured.append((time.monotonic(), frame))

    while running:
        for key, _ in selector.select(timeout=1.0):
            drain()
            if key.data == "sock":
                continue
            chunk = os.read(sys.stdin.fileno(), 1 << 20)
            if not chunk:
                running = False
                break
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                words = line.decode().split()
                if not words:
                    continue
                reply: dict[str, object]
                try:
                    if words[0] == "quit":
                        running = False
                        break
                    if words[0] == "send":
                        for text in words[1:]:
                            frame = bytes.fromhex(text)
                            sock.send(frame)
                            captured.append((time.monotonic(), frame))
                        reply = {"ok": True, "t": time.monotonic()}
                    elif words[0] == "save":
                        reply = {"ok": True, "frames": write_pcap(words[1], captured)}
                    else:
                        reply = {"ok": False, "error": f"unknown command {words[0]!r}"}
                except (OSError, ValueError) as exc:
                    reply = {"ok": False, "error": str(exc)}
                print(json.dumps(reply), flush=True)
    sock.close()


if __name__ == "__main__":
    main()
