"""Send numbered UDP datagrams to a multicast group: mc_send.py GROUP PORT COUNT RATE TTL [SIZE]."""

import socket
import struct
import sys
import time

group, port, count, rate, ttl = (
    sys.argv[1],
    int(sys.argv[2]),
    int(sys.argv[3]),
    float(sys.argv[4]),
    int(sys.argv[5]),
)
size = int(sys.argv[6]) if len(sys.argv) > 6 else 200
family = socket.AF_INET6 if ":" in group else socket.AF_INET
sock = socket.socket(family, socket.SOCK_DGRAM)
if family == socket.AF_INET:
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
else:
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, ttl)
start = time.monotonic()
padding = bytes(max(0, size - 4))
for seq in range(count):
    sock.sendto(struct.pack("!I", seq) + padding, (group, port))
    # Pace in small bursts so the whole run stays bounded and receivers keep up.
    ahead = start + (seq + 1) / rate - time.monotonic()
    if ahead > 0.002:
        time.sleep(ahead)
print(f"sent {count}", flush=True)
