"""Make a synthetic capture of N hosts joining and leaving multicast groups on a segment.

    .venv/bin/python tools/mkcapture.py -o joins.pcap --hosts 50 --groups 4 \\
        --protocol igmp --version 3 --duration 3600 [--sources 2] [--data 10] [--link sll2]

Each host joins one group (round robin) at a random time in the first fifth of the run,
announces it the way Linux does (the unsolicited report sent robustness = 2 times, 1 s
apart) and answers the querier every query interval while a member. The share of hosts
given by --leave leave at a random time in the second half (IGMPv1 hosts just go quiet);
the members left answer the querier's group-specific query within a second. With
--sources K each join is source-specific (K sources; IGMPv3/MLDv2 only). With --data P a
sender on the segment streams P packets/s of UDP to the first group.

The same arguments and --seed give the same file, byte for byte. The last line printed
(JSON) says which hosts are members at the end, so that a replay can be checked:
    mcmw replay joins.pcap -c tree.yaml --node NAME --json
Packets are built by igmp/'s own builders; the file is written by mcmw.capture.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import random
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from igmp import codec_igmp, codec_mld  # noqa: E402
from igmp.checksum import inet_checksum  # noqa: E402
from igmp.messages import ALLOW, BLOCK, IS_EX, IS_IN, TO_EX, TO_IN, GroupRecord  # noqa: E402
from mcmw.capture import ETHERNET, LINUX_SLL, LINUX_SLL2, RAW_IP, relink, write_pcap  # noqa: E402
from tap.ethernet import frame_for_ip  # noqa: E402

LINKS = {"ethernet": ETHERNET, "sll": LINUX_SLL, "sll2": LINUX_SLL2, "raw": RAW_IP}
NS = 1_000_000_000
UNSOLICITED_INTERVAL = 1.0  # Linux: IGMPv3/MLDv2 unsolicited report interval
ROBUSTNESS = 2


@dataclass
class Host:
    index: int
    address: bytes
    mac: bytes
    group: bytes
    sources: tuple[bytes, ...]
    join: float
    leave: float | None


def hosts(args: argparse.Namespace, rng: random.Random) -> list[Host]:
    v6 = args.protocol == "mld"
    first = ipaddress.ip_address(args.first_group or ("ff0e::1:1" if v6 else "239.1.1.1"))
    out = []
    for i in range(args.hosts):
        group = (first + i % args.groups).packed
        if v6:
            address = ipaddress.IPv6Address(f"fe80::100:{i + 1:x}").packed
            sources = tuple(ipaddress.IPv6Address(f"2001:db8::{s + 1:x}").packed for s in range(args.sources))
        else:
            address = ipaddress.IPv4Address(0xA9FE6400 + i + 1).packed  # 169.254.100.0/24 and on
            sources = tuple(ipaddress.IPv4Address(0xC0000201 + s).packed for s in range(args.sources))
        mac = struct.pack("!HI", 0x0200, 0x64000000 + i + 1)
        join = rng.uniform(0, args.duration * 0.2)
        leave = rng.uniform(args.duration * 0.5, args.duration * 0.95) if rng.random() < args.leave else None
        out.append(Host(i, address, mac, group, sources, join, leave))
    return out


def report(args: argparse.Namespace, host: Host, kind: str) -> bytes:
    """A host's message as an IP packet: kind is 'join', 'current' (answer to a query) or
    'leave'."""
    v6 = args.protocol == "mld"
    codec = codec_mld if v6 else codec_igmp
    newest = 2 if v6 else 3
    if args.version < newest:
        if kind == "leave":
            return (
                codec_mld.build_done(host.address, host.group)
                if v6
                else codec_igmp.build_leave(host.address, host.group)
            )
        return codec.build_report(args.version, host.address, host.group)
    if host.sources:
        kinds = {"join": ALLOW, "current": IS_IN, "leave": BLOCK}
    else:
        kinds = {"join": TO_EX, "current": IS_EX, "leave": TO_IN}
    sources = host.sources if host.sources else ()
    return codec.build_report(newest, host.address, records=[GroupRecord(kinds[kind], host.group, sources)])


def datagram(args: argparse.Namespace, sender: Host, group: bytes, seq: int) -> bytes:
    payload = struct.pack("!I", seq) + bytes(96)
    udp = struct.pack("!HHHH", 40000, 5004, 8 + len(payload), 0) + payload
    if args.protocol == "mld":
        return struct.pack("!IHBB16s16s", 6 << 28, len(udp), 17, 16, sender.address, group) + udp
    head = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), seq & 0xFFFF, 0, 16, 17, 0, sender.address, group
    )
    return head[:10] + struct.pack("!H", inet_checksum(head)) + head[12:] + udp


def timeline(args: argparse.Namespace) -> tuple[list[tuple[float, int, bytes]], list[Host]]:
    rng = random.Random(args.seed)
    everyone = hosts(args, rng)
    events: list[tuple[float, int, bytes]] = []  # (time, tie-break, Ethernet frame)

    def add(at: float, host: Host, packet: bytes) -> None:
        events.append((at, len(events), frame_for_ip(packet, host.mac)))

    for host in everyone:
        end = host.leave if host.leave is not None else args.duration
        for n in range(ROBUSTNESS):
            add(host.join + n * UNSOLICITED_INTERVAL, host, report(args, host, "join"))
        # Answers to the querier's general queries, within its 10 s response window.
        at = args.query_interval
        while at < end:
            if at > host.join:
                add(at + rng.uniform(0, 10), host, report(args, host, "current"))
            at += args.query_interval
        if host.leave is None or (args.protocol == "igmp" and args.version == 1):
            continue
        staying = [
            other
            for other in everyone
            if other is not host
            and other.group == host.group
            and other.join < host.leave
            and (other.leave is None or other.leave > host.leave + ROBUSTNESS)
        ]
        for n in range(ROBUSTNESS if args.version == (2 if args.protocol == "mld" else 3) else 1):
            at = host.leave + n * UNSOLICITED_INTERVAL
            add(at, host, report(args, host, "leave"))
            # Each leave makes the querier ask the group (or its sources); the members left
            # answer within its Last Member Query Interval (1 s), or the group is dropped.
            for other in staying:
                add(at + rng.uniform(0.01, 0.9), other, report(args, other, "current"))
    if args.data > 0 and everyone:
        sender, group = everyone[0], everyone[0].group
        step, at, seq = 1.0 / args.data, 0.0, 0
        while at < args.duration:
            add(at, sender, datagram(args, sender, group, seq))
            at, seq = at + step, seq + 1
    events.sort()
    return events, everyone


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", required=True, metavar="FILE.pcap")
    parser.add_argument("--hosts", type=int, default=10)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--protocol", choices=("igmp", "mld"), default="igmp")
    parser.add_argument("--version", type=int, default=None, help="IGMP 1-3 / MLD 1-2 (default: newest)")
    parser.add_argument("--first-group", help="groups count up from here (239.1.1.1 / ff0e::1:1)")
    parser.add_argument("--sources", type=int, default=0, help="source-specific joins with K sources")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--query-interval", type=float, default=125.0, help="seconds (default 125)")
    parser.add_argument("--leave", type=float, default=0.5, help="share of hosts that leave (default 0.5)")
    parser.add_argument("--data", type=float, default=0.0, help="packets/s of data to the first group")
    parser.add_argument("--link", choices=sorted(LINKS), default="ethernet", help="link type of the file")
    parser.add_argument("--start", type=float, default=1_700_000_000.0, help="epoch of the first second")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    newest = 2 if args.protocol == "mld" else 3
    args.version = args.version or newest
    if not 1 <= args.version <= newest:
        parser.error(f"--version {args.version}: {args.protocol} has versions 1 to {newest}")
    if args.sources and args.version != newest:
        parser.error("--sources needs IGMPv3 or MLDv2")
    try:
        family = ipaddress.ip_address(args.first_group).version if args.first_group else None
    except ValueError:
        parser.error(f"--first-group {args.first_group}: not an address")
    if family is not None and family != (6 if args.protocol == "mld" else 4):
        parser.error(f"--first-group {args.first_group}: not an {args.protocol} group")
    if args.hosts < 0 or args.groups < 1 or args.duration <= 0:
        parser.error("--hosts must be 0 or more, --groups 1 or more, --duration positive")
    return args


def build(argv: list[str] | None = None) -> dict[str, object]:
    """Write the capture; return its frame count and the members at the end, by group."""
    args = parse(argv)
    events, everyone = timeline(args)
    linktype = LINKS[args.link]
    start = round(args.start * NS)
    frames = ((start + round(t * NS), relink(f, linktype)) for t, _, f in events)
    count = write_pcap(args.out, frames, linktype)
    members: dict[str, list[str]] = {}
    for host in everyone:
        if host.leave is None:
            group, address = ipaddress.ip_address(host.group), ipaddress.ip_address(host.address)
            members.setdefault(str(group), []).append(str(address))
    return {"frames": count, "members_at_end": dict(sorted(members.items()))}


def main(argv: list[str] | None = None) -> int:
    result = build(argv)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
