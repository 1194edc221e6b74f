"""Join a group, receive numbered datagrams, print JSON.

mc_recv.py GROUP PORT COUNT TIMEOUT [SOURCE]: stops after COUNT datagrams or TIMEOUT
seconds without one; with SOURCE, joins (SOURCE, GROUP) only. Prints "joined" first.
"""

import json
import socket
import struct
import sys

group, port, count, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
source = sys.argv[5] if len(sys.argv) > 5 else None
family = socket.AF_INET6 if ":" in group else socket.AF_INET
sock = socket.socket(family, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
if family == socket.AF_INET6:
    mreq = socket.inet_pton(socket.AF_INET6, group) + struct.pack("@I", 0)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
elif source:
    mreq = socket.inet_aton(group) + socket.inet_aton("0.0.0.0") + socket.inet_aton(source)
    sock.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_ADD_SOURCE_MEMBERSHIP", 39), mreq)
else:
    mreq = socket.inet_aton(group) + socket.inet_aton("0.0.0.0")
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
print("joined", flush=True)
sock.settimeout(timeout)
received = []
sources = set()
try:
    while len(received) < count:
        data, addr = sock.recvfrom(65536)
        received.append(struct.unpack("!I", data[:4])[0])
        sources.add(addr[0])
except TimeoutError:
    pass
sock.close()  # leaves the group
print(json.dumps({"received": received, "sources": sorted(sources)}), flush=True)
