"""Against a real Linux host: the kernel in one namespace joins and leaves groups on a
veth; the querier, driven by a small raw-socket loop in the other namespace, sends the
queries and must learn exactly what the host's sockets asked for. Needs root."""

from __future__ import annotations

import json
import time

import pytest

from tests.netlab import Lab, wait_for

pytestmark = pytest.mark.privileged

# Runs in the router namespace: one Querier per family on an AF_PACKET socket, real
# clock, for argv[2] seconds; prints every action and finally the counters as JSON.
DRIVER = r"""
import ipaddress, json, select, socket, sys, time
from igmp.params import QuerierParams
from igmp.querier import Querier
from igmp.actions import MembershipChange, SendQuery

dev, duration, v4, ll = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
sock.bind((dev, 0))
mac = sock.getsockname()[4]
p = QuerierParams(query_interval=20, query_response_interval=1, last_member_query_interval=0.5)
start = time.monotonic()
qs = {4: Querier(4, p, ipaddress.ip_address(v4).packed, start),
      6: Querier(6, QuerierParams(version=2, query_interval=20, query_response_interval=1,
                                  last_member_query_interval=0.5),
                 ipaddress.ip_address(ll).packed, start)}

def emit(fam, actions, now):
    for a in actions:
        if isinstance(a, SendQuery):
            d = a.destination
            dmac = (bytes((1, 0, 0x5e, d[1] & 0x7f, d[2], d[3])) if fam == 4
                    else b"\x33\x33" + d[12:])
            et = b"\x08\x00" if fam == 4 else b"\x86\xdd"
            sock.send(dmac + mac + et + a.packet)
            print(json.dumps({"t": now - start, "fam": fam, "query": a.packet.hex()}))
        else:
            print(json.dumps({"t": now - start, "fam": fam,
                              "group": str(ipaddress.ip_address(a.group)), "mode": a.mode,
                              "sources": sorted(str(ipaddress.ip_address(s))
                                                for s in a.sources)}))
    sys.stdout.flush()

for fam, q in qs.items():
    emit(fam, q.start(start), start)
while (now := time.monotonic()) < start + duration:
    for fam, q in qs.items():
        d = q.next_deadline()
        if d is not None and d <= now:
            emit(fam, q.expire(now), now)
    wait = min([d for d in (q.next_deadline() for q in qs.values()) if d is not None]
               + [start + duration]) - now
    r, _, _ = select.select([sock], [], [], max(0.0, min(wait, 0.1)))
    if r:
        frame, addr = sock.recvfrom(65536)
        if addr[2] == socket.PACKET_OUTGOING:
            continue
        now = time.monotonic()
        et = frame[12:14]
        if et == b"\x08\x00" and frame[23] == 2:
            emit(4, qs[4].handle(frame[14:], now), now)
        elif et == b"\x86\xdd" and frame[20] in (0, 58):
            if frame[20] == 58 and frame[54] not in (130, 131, 132, 143):
                continue
            if frame[20] == 0 and frame[54] != 58:
                continue
            emit(6, qs[6].handle(frame[14:], now), now)
print(json.dumps({"done": {fam: {"drops": dict(q.drops), "counters": dict(q.counters),
                                 "status": q.status(time.monotonic())}
                           for fam, q in qs.items()}}))
"""

# Runs in the host namespace: joins and leaves on a timeline.
HOST = r"""
import socket, struct, sys, time
dev_ip = socket.inet_aton(sys.argv[1])
ifindex = socket.if_nametoindex(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
g1 = socket.inet_aton("239.1.1.1") + dev_ip
time.sleep(0.5)
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, g1)
time.sleep(0.5)
ssm = socket.inet_aton("232.1.1.1") + dev_ip + socket.inet_aton("192.0.2.1")
s.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_ADD_SOURCE_MEMBERSHIP", 39), ssm)
mreq6 = socket.inet_pton(socket.AF_INET6, "ff0e::1:2") + struct.pack("@I", ifindex)
s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq6)
time.sleep(1.5)
s.setsockopt(socket.IPPROTO_IP, socket.IP_DROP_MEMBERSHIP, g1)
s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_LEAVE_GROUP, mreq6)
time.sleep(30)
"""


def _link_local(lab: Lab, ns: str, dev: str) -> str:
    def ready() -> str | None:
        out = lab.exec(ns, ["ip", "-6", "-o", "addr", "show", "dev", dev, "scope", "link"]).stdout
        if not out or "tentative" in out:
            return None
        return out.split()[3].split("/")[0]

    return wait_for(ready, 10, f"link-local address on {dev}")


@pytest.mark.parametrize("force_version", [0, 2])
def test_kernel_host_join_ssm_leave(lab: Lab, force_version: int) -> None:
    router, host = lab.ns("r"), lab.ns("h")
    dev_r, dev_h = lab.veth(router, "10.9.0.1/24", host, "10.9.0.2/24")
    lab.exec(host, ["sysctl", "-qw", f"net.ipv4.conf.{dev_h}.force_igmp_version={force_version}"])
    ll_r = _link_local(lab, router, dev_r)
    _link_local(lab, host, dev_h)
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    drv = lab.popen(router, [sys.executable, "-c", DRIVER, dev_r, "6", "10.9.0.1", ll_r],
                    cwd=root, text=True)
    time.sleep(0.3)
    joiner = lab.python(host, HOST, "10.9.0.2", dev_h, text=True)
    out, err = drv.communicate(timeout=30)
    assert joiner.poll() is None, joiner.communicate()[1]  # still holding its sockets
    assert drv.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    done = lines[-1]["done"]
    changes = [(x["fam"], x["group"], x["mode"], x["sources"]) for x in lines if "mode" in x]
    timed = {(x["group"], x["mode"], tuple(x["sources"])): x["t"] for x in lines if "mode" in x}

    assert done["4"]["drops"] == {}, done
    assert (4, "239.1.1.1", "exclude", []) in changes
    assert (6, "ff0e::1:2", "exclude", []) in changes
    # Leaves at ~2.5 s: group-specific queries, then gone LMQT (2 x 0.5 s) later.
    assert (4, "239.1.1.1", "include", []) in changes
    assert (6, "ff0e::1:2", "include", []) in changes
    left = timed[("239.1.1.1", "include", ())]
    assert 2.5 < left < 4.5
    if force_version == 2:
        # v2 hosts cannot ask for a source: the SSM join is a plain join there.
        assert done["4"]["counters"].get("igmp_v2_report", 0) >= 1
        assert done["4"]["counters"].get("igmp_v2_leave", 0) >= 1
    else:
        assert (4, "232.1.1.1", "include", ["192.0.2.1"]) in changes
        assert done["4"]["counters"].get("igmp_v3_report", 0) >= 1
        groups = {g["group"]: g for g in done["4"]["status"]["groups"]}
        assert groups["232.1.1.1"]["compat_version"] == 3
    assert done["6"]["counters"].get("mld_v2_report", 0) >= 1
    # MLD drops may only be DAD-time reports from :: (RFC 3810 5.2.13).
    assert set(done["6"]["drops"]) <= {"bad_source"}
