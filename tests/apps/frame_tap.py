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
back to their own socket), so the pcap shows the whole exchange. The file is written by
mcmw.capture, the project's one pcap writer; read it back with mcmw.capture.CaptureReader.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import sys
import time

from mcmw.capture import write_pcap

ETH_P_ALL = 0x0003
SNAPLEN = 65535


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
                        stamped = ((round(t * 1e9), frame) for t, frame in captured)
                        reply = {"ok": True, "frames": write_pcap(words[1], stamped)}
                    else:
                        reply = {"ok": False, "error": f"unknown command {words[0]!r}"}
                except (OSError, ValueError) as exc:
                    reply = {"ok": False, "error": str(exc)}
                print(json.dumps(reply), flush=True)
    sock.close()


if __name__ == "__main__":
    main()
