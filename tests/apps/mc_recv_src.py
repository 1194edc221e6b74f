"""Join a group (any source, INCLUDE or EXCLUDE some sources), receive numbered datagrams
and report them per source, as JSON.

mc_recv_src.py GROUP PORT IDLE [--count N] [--include S ...] [--exclude S ...] [--ifname DEV]

- IDLE: stop after this many seconds without a datagram (after the first one, or from
  the start when none came);
- --count: stop once N datagrams arrived in all;
- --include: IP_ADD_SOURCE_MEMBERSHIP for each source (IPv4 only);
- --exclude: a normal join, then IP_BLOCK_SOURCE for each source (IPv4 only);
- SIGTERM or SIGINT stops the receiver too; it still prints its report.

Prints "joined" once the membership is in place, then one JSON line:
{"by_source": {SOURCE: [seq, ...]}, "sizes": [...], "corrupt": N} where each datagram is
a 4-byte big-endian sequence number followed by zero padding (as tests/apps/mc_send.py
sends), `sizes` are the distinct datagram sizes seen and `corrupt` counts datagrams whose
padding is not all zero.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import struct
import time

# Linux values (include/uapi/linux/in.h); CPython does not export them on every build.
IP_BLOCK_SOURCE = 38
IP_ADD_SOURCE_MEMBERSHIP = 39


class Stop(Exception):
    pass


def _stop(signum: int, frame: object) -> None:
    raise Stop


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("group")
    parser.add_argument("port", type=int)
    parser.add_argument("idle", type=float)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--include", nargs="*", default=[])
    parser.add_argument("--exclude", nargs="*", default=[])
    parser.add_argument("--ifname", default="mcmw0")
    args = parser.parse_args()

    family = socket.AF_INET6 if ":" in args.group else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    if family == socket.AF_INET6:
        sock.bind(("::", args.port))
        index = socket.if_nametoindex(args.ifname)
        mreq6 = socket.inet_pton(socket.AF_INET6, args.group) + struct.pack("@I", index)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq6)
    else:
        sock.bind(("0.0.0.0", args.port))
        group, anywhere = socket.inet_aton(args.group), socket.inet_aton("0.0.0.0")
        if args.include:
            for source in args.include:
                mreq = group + anywhere + socket.inet_aton(source)
                sock.setsockopt(socket.IPPROTO_IP, IP_ADD_SOURCE_MEMBERSHIP, mreq)
        else:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group + anywhere)
            for source in args.exclude:
                mreq = group + anywhere + socket.inet_aton(source)
                sock.setsockopt(socket.IPPROTO_IP, IP_BLOCK_SOURCE, mreq)
    by_source: dict[str, list[int]] = {}
    sizes: set[int] = set()
    corrupt = total = 0
    sock.settimeout(args.idle)
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        # Inside the try: a stop that comes at once still ends in a report.
        print("joined", flush=True)
        while not args.count or total < args.count:
            try:
                data, address = sock.recvfrom(65536)
            except TimeoutError:
                break
            total += 1
            sizes.add(len(data))
            if len(data) < 4 or data[4:].count(0) != len(data) - 4:
                corrupt += 1
            if len(data) >= 4:
                source = address[0].split("%")[0]
                by_source.setdefault(source, []).append(struct.unpack("!I", data[:4])[0])
    except Stop:
        pass
    sock.close()  # leaves the group
    report = {
        "by_source": by_source,
        "sizes": sorted(sizes),
        "corrupt": corrupt,
        "elapsed_s": round(time.monotonic() - started, 3),
    }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
