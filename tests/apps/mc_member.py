"""Hold group memberships on command, as a host application would, and say when.

mc_member.py IFNAME: reads one command a line from stdin and answers one JSON line
{"ok": true, "t": MONOTONIC} right after the socket option took effect (CLOCK_MONOTONIC
is the same in every namespace, so the caller can time the router against it), or
{"ok": false, "error": ...}. Prints {"ready": true} first. Commands:

    join GROUP                 any-source join (IP_ADD_MEMBERSHIP / IPV6_JOIN_GROUP)
    leave GROUP                drop it (IP_DROP_MEMBERSHIP / IPV6_LEAVE_GROUP)
    source-join GROUP SOURCE   IPv4: IP_ADD_SOURCE_MEMBERSHIP; IPv6: MCAST_JOIN_SOURCE_GROUP
    source-leave GROUP SOURCE  IPv4: IP_DROP_SOURCE_MEMBERSHIP; IPv6: MCAST_LEAVE_SOURCE_GROUP
    block GROUP SOURCE         after a join: IPv4 IP_BLOCK_SOURCE; IPv6 MCAST_BLOCK_SOURCE
    quit

Every group has its own socket, on interface IFNAME. Linux option numbers are written
out because Python's socket module does not export the source-specific ones.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import time

IP_BLOCK_SOURCE = 38
IP_ADD_SOURCE_MEMBERSHIP = 39
IP_DROP_SOURCE_MEMBERSHIP = 40
MCAST_BLOCK_SOURCE = 43
MCAST_JOIN_SOURCE_GROUP = 46
MCAST_LEAVE_SOURCE_GROUP = 47
IPV6_JOIN_GROUP = 20
IPV6_LEAVE_GROUP = 21
IP_MULTICAST_ALL = 49


def sockaddr_in6(address: str) -> bytes:
    """struct sockaddr_in6 inside a struct sockaddr_storage (128 bytes)."""
    raw = struct.pack("=HHI16sI", socket.AF_INET6, 0, 0, socket.inet_pton(socket.AF_INET6, address), 0)
    return raw.ljust(128, b"\0")


def group_source_req(ifindex: int, group: str, source: str) -> bytes:
    """struct group_source_req: the interface (padded to 8 bytes), group, source."""
    return struct.pack("=I4x", ifindex) + sockaddr_in6(group) + sockaddr_in6(source)


class Member:
    def __init__(self, ifname: str) -> None:
        self.ifindex = socket.if_nametoindex(ifname)
        self.sockets: dict[str, socket.socket] = {}

    def sock(self, group: str) -> socket.socket:
        if group not in self.sockets:
            family = socket.AF_INET6 if ":" in group else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            if family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
            self.sockets[group] = sock
        return self.sockets[group]

    def mreqn(self, group: str) -> bytes:
        return socket.inet_aton(group) + struct.pack("=4si", bytes(4), self.ifindex)

    def mreq6(self, group: str) -> bytes:
        return socket.inet_pton(socket.AF_INET6, group) + struct.pack("@I", self.ifindex)

    def mreq_source(self, group: str, source: str) -> bytes:
        # struct ip_mreq_source: group, interface address, source. The interface is
        # found by the route to the group (224.0.0.0/4 points at the TAP).
        return socket.inet_aton(group) + bytes(4) + socket.inet_aton(source)

    def do(self, words: list[str]) -> None:
        command, group, *rest = words
        sock = self.sock(group)
        v6 = ":" in group
        if command == "join":
            if v6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_JOIN_GROUP, self.mreq6(group))
            else:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, self.mreqn(group))
        elif command == "leave":
            if v6:
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_LEAVE_GROUP, self.mreq6(group))
            else:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_DROP_MEMBERSHIP, self.mreqn(group))
        elif command in ("source-join", "source-leave", "block"):
            (source,) = rest
            if v6:
                option = {
                    "source-join": MCAST_JOIN_SOURCE_GROUP,
                    "source-leave": MCAST_LEAVE_SOURCE_GROUP,
                    "block": MCAST_BLOCK_SOURCE,
                }[command]
                sock.setsockopt(socket.IPPROTO_IPV6, option, group_source_req(self.ifindex, group, source))
            else:
                option = {
                    "source-join": IP_ADD_SOURCE_MEMBERSHIP,
                    "source-leave": IP_DROP_SOURCE_MEMBERSHIP,
                    "block": IP_BLOCK_SOURCE,
                }[command]
                sock.setsockopt(socket.IPPROTO_IP, option, self.mreq_source(group, source))
        else:
            raise ValueError(f"unknown command {command!r}")


def main() -> None:
    member = Member(sys.argv[1])
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            break
        try:
            member.do(words)
            reply: dict[str, object] = {"ok": True, "t": time.monotonic()}
        except (OSError, ValueError) as exc:
            reply = {"ok": False, "error": f"{line.strip()}: {exc}"}
        print(json.dumps(reply), flush=True)
    for sock in member.sockets.values():
        sock.close()


if __name__ == "__main__":
    main()
