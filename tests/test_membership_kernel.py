"""Group membership against real hosts, through a running node: `mcmw run` in a network
namespace, the Linux kernel of that namespace as the host on the node's TAP.

For every host version (force_igmp_version 1, 2, 3; force_mld_version 1, 2) a socket
joins, status shows the group within a second of the join, the socket leaves, and
status drops the group within the Last Member Query Time (v2, v3, MLDv1, MLDv2) or the
Group Membership Interval (v1). Source-specific joins (IP_ADD_SOURCE_MEMBERSHIP,
IP_BLOCK_SOURCE, MCAST_JOIN_SOURCE_GROUP) show the right mode and sources. Every query
the nodes send is captured on their TAPs and must dissect in tshark without a
malformed or error mark. Last, a TAP bridged into a LAN serves a host behind the bridge.

The segments run side by side, one namespace each, so the slowest (IGMPv1, which must
wait out the Group Membership Interval) sets the pace. Needs root.

The harness here (`Segment`, the capture helpers) is shared with
tests/test_membership_crafted.py.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import select
import struct
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from mcmw.capture import CaptureReader, write_pcap
from mcmw.lab import Lab, LabError, run, status_or_none, wait_for
from tap.ethernet import multicast_mac, router_mac
from tests.netlab import require_tools
from tests.sites import received

pytestmark = pytest.mark.privileged

APPS = Path(__file__).resolve().parent / "apps"
TAP = "mcmw0"
POLL = 0.02  # status polling period, seconds
MARGIN = 0.8  # scheduling slack on top of a protocol time (the node ticks every 50 ms; a loaded CI)

# Short timers so that IGMPv1, which has no leave, expires within the test:
# GMI = robustness * query_interval + query_response_interval = 2 * 4 + 1 = 9 s.
TIMERS: dict[str, Any] = {"query_interval": "4s", "query_response_interval": "1s", "robustness": 2}
GMI = 9.0
LMQC = 2  # last_member_query_count defaults to the robustness
LMQT = 1.0 * LMQC  # last_member_query_interval (default 1 s) * LMQC


# -- the harness ----------------------------------------------------------------------


class Helper:
    """A line-protocol helper app (tests/apps) running in a namespace."""

    def __init__(self, lab: Lab, ns: str, app: str, *args: str) -> None:
        self.proc = lab.popen(ns, [sys.executable, str(APPS / app), *args], text=True, stdin=subprocess.PIPE)
        self.name = app
        self.lock = threading.Lock()
        ready = self._read(10.0)
        assert ready.get("ready"), f"{app} did not start: {ready}"

    def _read(self, timeout: float) -> dict[str, Any]:
        out = self.proc.stdout
        assert out is not None
        readable, _, _ = select.select([out], [], [], timeout)
        if not readable:
            raise TimeoutError(f"{self.name} did not answer within {timeout:g}s")
        line = out.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise LabError(f"{self.name} exited: {err[-2000:]}")
        return json.loads(line)

    def ask(self, line: str, timeout: float = 10.0) -> dict[str, Any]:
        with self.lock:
            stdin = self.proc.stdin
            assert stdin is not None
            stdin.write(line + "\n")
            stdin.flush()
            reply = self._read(timeout)
        assert reply.get("ok"), f"{self.name}: {line[:80]}: {reply}"
        return reply

    def close(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()


def node_doc(
    name: str,
    address: str,
    igmp: dict[str, Any] | None,
    mld: dict[str, Any] | None,
    tap: dict[str, Any] | None = None,
    listen: str = "127.0.0.1:7000",
) -> dict[str, Any]:
    doc: dict[str, Any] = {"listen": listen, "tap": {"name": TAP, "address": address, **(tap or {})}}
    if igmp:
        doc["igmp"] = igmp
    if mld:
        doc["mld"] = mld
    return doc


class Segment:
    """One node on its TAP in a namespace of its own, with the kernel there as the host;
    `member` holds sockets (tests/apps/mc_member.py), `tap` captures every frame on the
    TAP and injects crafted ones (tests/apps/frame_tap.py)."""

    def __init__(
        self,
        lab: Lab,
        short: str,
        node: str,
        igmp: dict[str, Any] | None = None,
        mld: dict[str, Any] | None = None,
        address: str = "169.254.1.1/16",
        tap: dict[str, Any] | None = None,
    ) -> None:
        self.lab = lab
        self.node = node
        self.ns = lab.ns(short)
        self.address = address.split("/")[0]
        self.mac = router_mac(node)
        self.tree = lab.workdir / f"{node}.yaml"
        doc = {
            "overlay": {"address_bits": 24, "mapping": "modulo"},
            "nodes": {node: node_doc(node, address, igmp, mld, tap)},
            "links": [],
        }
        self.tree.write_text(yaml.safe_dump(doc, sort_keys=False))
        self.socket = ""
        self.proc: subprocess.Popen[Any] | None = None
        self.member: Helper | None = None
        self.tap: Helper | None = None
        self.expected_drops: set[str] = set()  # drop reasons the host's start-up may cause

    def start(self, igmp_host: int | None = None, mld_host: int | None = None) -> Segment:
        """Force the kernel's versions if asked, then start the node and the helpers.

        The versions are forced for the whole namespace (`all`) before the TAP exists:
        forced only on the TAP after the node started, the kernel could still answer the
        node's first general query, heard before, with an IGMPv3/MLDv2 report that lists
        the groups joined meanwhile (its general-query response timer does not look at
        the forced version when it fires). An MLDv1 host sends its first report at once
        when the TAP comes up, before it has a usable link-local address: from ::, which
        the node must drop (RFC 3810 5.2.13), so such a segment starts with that drop
        counted (`expected_drops`)."""
        if mld_host == 1:
            self.expected_drops = {"mld.bad_source"}
        if igmp_host is not None:
            self.sysctl("net.ipv4.conf.all.force_igmp_version", igmp_host)
        if mld_host is not None:
            self.sysctl("net.ipv6.conf.all.force_mld_version", mld_host)
        self.proc, self.socket = self.lab.start_node(self.ns, self.tree, self.node)
        self.tap = Helper(self.lab, self.ns, "frame_tap.py", TAP)
        self.member = Helper(self.lab, self.ns, "mc_member.py", TAP)
        return self

    def sysctl(self, key: str, value: int) -> None:
        self.lab.exec(self.ns, ["sysctl", "-qw", f"{key}={value}"])

    # -- status --

    def status(self) -> dict[str, Any]:
        status = status_or_none(self.socket)
        assert status is not None, f"node {self.node} does not answer: {self.lab.node_log(self.node)}"
        return status

    def local(self, group: str) -> dict[str, Any] | None:
        entry = next((g for g in self.status()["groups"] if g["group"] == group), None)
        return None if entry is None else entry["local"]

    def drops(self) -> Counter[str]:
        """Membership drops of both families, keyed `igmp.REASON` / `mld.REASON`."""
        out: Counter[str] = Counter()
        for family, reasons in self.status()["membership_drops"].items():
            out.update({f"{family}.{reason}": n for reason, n in reasons.items()})
        return out

    def until(self, check: Callable[[], Any], timeout: float, what: str) -> float:
        """Poll until `check()` is truthy; the monotonic time it first was."""
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if check():
                return now
            if now > deadline:
                raise TimeoutError(f"{self.node}: timed out after {timeout:g}s waiting for {what}")
            time.sleep(POLL)

    def until_local(
        self, group: str, want: Callable[[dict[str, Any] | None], bool], timeout: float, what: str
    ) -> float:
        return self.until(lambda: want(self.local(group)), timeout, f"{group} {what}")

    # -- the host and the wire --

    def do(self, *words: str) -> float:
        """A membership command of mc_member.py; the monotonic time it took effect."""
        assert self.member is not None
        return float(self.member.ask(" ".join(words))["t"])

    def inject(self, *frames: bytes) -> float:
        """Frames into the TAP, as if a host on the segment sent them."""
        assert self.tap is not None
        return float(self.tap.ask("send " + " ".join(f.hex() for f in frames))["t"])

    def capture(self) -> list[tuple[float, bytes]]:
        """Every frame seen on the TAP so far, with monotonic times."""
        assert self.tap is not None
        path = self.lab.workdir / f"{self.node}-{time.monotonic_ns()}.pcap"
        self.tap.ask(f"save {path}")
        with CaptureReader(str(path)) as reader:
            return [(frame.time, frame.data) for frame in reader.frames()]

    def sent(self) -> list[tuple[float, bytes]]:
        """The frames the node wrote into its TAP (its source MAC)."""
        return [(t, f) for t, f in self.capture() if f[6:12] == self.mac]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def start_all(segments: list[tuple[Segment, dict[str, Any]]]) -> None:
    """Start several segments at once (each start waits for its node to answer)."""
    with ThreadPoolExecutor(len(segments)) as pool:
        for future in [pool.submit(seg.start, **kw) for seg, kw in segments]:
            future.result()


# -- reading queries off a capture ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Query:
    t: float
    family: int
    version: int
    group: str  # "0.0.0.0" / "::" for a general query
    sources: tuple[str, ...]
    s_flag: bool
    size: int  # of the IP packet
    max_resp_s: float  # IGMPv1: 0
    qrv: int | None
    qqic: int | None
    src: str
    dst: str
    ttl: int  # TTL / hop limit
    router_alert: bool
    dst_mac_ok: bool  # the Ethernet destination is the IP destination's multicast MAC

    @property
    def general(self) -> bool:
        return ipaddress.ip_address(self.group).is_unspecified

    def wire_problems(self) -> list[str]:
        """What differs from RFC 3376 4 / RFC 3810 5 and 7.1.1 in the packet's framing."""
        problems = []
        if self.ttl != 1:
            problems.append(f"TTL/hop limit {self.ttl}")
        if not self.router_alert:
            problems.append("no Router Alert")
        if not self.dst_mac_ok:
            problems.append("Ethernet destination is not the group's MAC")
        everyone = "224.0.0.1" if self.family == 4 else "ff02::1"
        if self.dst != (everyone if self.general else self.group):
            problems.append(f"sent to {self.dst}")
        if self.family == 6 and not ipaddress.IPv6Address(self.src).is_link_local:
            problems.append(f"from {self.src}, not link-local")
        return problems


def _code8(code: int) -> int:
    """RFC 3376 4.1.1 / 4.1.7 floating-point code, decoded independently of igmp/fpcode."""
    return code if code < 128 else ((code & 0x0F) | 0x10) << (((code >> 4) & 0x07) + 3)


def _code16(code: int) -> int:
    """RFC 3810 5.1.3 Maximum Response Code."""
    return code if code < 32768 else ((code & 0x0FFF) | 0x1000) << (((code >> 12) & 0x07) + 3)


def parse_query(t: float, frame: bytes) -> Query | None:
    """The membership query in an Ethernet frame, or None."""
    ethertype = frame[12:14]
    if ethertype == b"\x08\x00" and len(frame) >= 34 and frame[23] == 2:
        ihl = (frame[14] & 0x0F) * 4
        total = struct.unpack_from("!H", frame, 16)[0]
        igmp = frame[14 + ihl : 14 + total]
        if len(igmp) < 8 or igmp[0] != 0x11:
            return None
        src, dst = (str(ipaddress.IPv4Address(frame[a : a + 4])) for a in (26, 30))
        common = {
            "t": t,
            "family": 4,
            "size": total,
            "src": src,
            "dst": dst,
            "ttl": frame[22],
            "router_alert": b"\x94\x04\x00\x00" in frame[34 : 14 + ihl],
            "dst_mac_ok": frame[:6] == multicast_mac(frame[30:34]),
            "group": str(ipaddress.IPv4Address(igmp[4:8])),
        }
        if len(igmp) == 8:
            return Query(
                version=2 if igmp[1] else 1,
                sources=(),
                s_flag=False,
                max_resp_s=igmp[1] / 10,
                qrv=None,
                qqic=None,
                **common,
            )
        count = struct.unpack_from("!H", igmp, 10)[0]
        sources = tuple(str(ipaddress.IPv4Address(igmp[12 + 4 * i : 16 + 4 * i])) for i in range(count))
        return Query(
            version=3,
            sources=sources,
            s_flag=bool(igmp[8] & 0x08),
            max_resp_s=_code8(igmp[1]) / 10,
            qrv=igmp[8] & 0x07,
            qqic=_code8(igmp[9]),
            **common,
        )
    if ethertype == b"\x86\xdd" and len(frame) >= 54:
        total = 40 + struct.unpack_from("!H", frame, 18)[0]
        next_header, offset = frame[20], 54
        alert = False
        if next_header == 0:
            hop_by_hop = frame[54 : 54 + (frame[55] + 1) * 8]
            alert = b"\x05\x02\x00\x00" in hop_by_hop
            next_header, offset = frame[54], 54 + len(hop_by_hop)
        mld = frame[offset : 14 + total]
        if next_header != 58 or len(mld) < 24 or mld[0] != 130:
            return None
        common = {
            "t": t,
            "family": 6,
            "size": total,
            "ttl": frame[21],
            "router_alert": alert,
            "src": str(ipaddress.IPv6Address(frame[22:38])),
            "dst": str(ipaddress.IPv6Address(frame[38:54])),
            "dst_mac_ok": frame[:6] == multicast_mac(frame[38:54]),
            "group": str(ipaddress.IPv6Address(mld[8:24])),
        }
        code = struct.unpack_from("!H", mld, 4)[0]
        if len(mld) == 24:
            return Query(
                version=1, sources=(), s_flag=False, max_resp_s=code / 1000, qrv=None, qqic=None, **common
            )
        count = struct.unpack_from("!H", mld, 26)[0]
        sources = tuple(str(ipaddress.IPv6Address(mld[28 + 16 * i : 44 + 16 * i])) for i in range(count))
        return Query(
            version=2,
            sources=sources,
            s_flag=bool(mld[24] & 0x08),
            max_resp_s=_code16(code) / 1000,
            qrv=mld[24] & 0x07,
            qqic=_code8(mld[25]),
            **common,
        )
    return None


def queries(frames: list[tuple[float, bytes]]) -> list[Query]:
    return [q for t, f in frames if (q := parse_query(t, f)) is not None]


IGMP_KINDS = {0x12: "igmp_v1_report", 0x16: "igmp_v2_report", 0x17: "igmp_v2_leave"}
MLD_KINDS = {131: "mld_v1_report", 132: "mld_v1_done"}


def record_groups(report: bytes, width: int) -> list[str]:
    """The group of each record of an IGMPv3 (`width` 4) or MLDv2 (16) report, read
    independently of igmp/ (RFC 3376 4.2, RFC 3810 5.2: the same layout)."""
    groups, offset = [], 8
    for _ in range(struct.unpack_from("!H", report, 6)[0]):
        _, aux, count = struct.unpack_from("!BBH", report, offset)
        groups.append(str(ipaddress.ip_address(report[offset + 4 : offset + 4 + width])))
        offset += 4 + width + width * count + 4 * aux
    return groups


def host_messages(frames: list[tuple[float, bytes]], router: bytes) -> dict[str, set[str]]:
    """Per group, the kinds of membership message the hosts (every sender but the
    router's MAC) sent about it: `igmp_v2_leave`, `mld_v2_report`, ..."""
    out: dict[str, set[str]] = defaultdict(set)
    for _, frame in frames:
        if frame[6:12] == router:
            continue
        if frame[12:14] == b"\x08\x00" and len(frame) >= 34 and frame[23] == 2:
            ihl = (frame[14] & 0x0F) * 4
            igmp = frame[14 + ihl : 14 + struct.unpack_from("!H", frame, 16)[0]]
            if len(igmp) >= 8 and igmp[0] in IGMP_KINDS:
                out[str(ipaddress.IPv4Address(igmp[4:8]))].add(IGMP_KINDS[igmp[0]])
            elif len(igmp) >= 8 and igmp[0] == 0x22:
                for group in record_groups(igmp, 4):
                    out[group].add("igmp_v3_report")
        elif frame[12:14] == b"\x86\xdd" and len(frame) >= 62 and frame[20] == 0 and frame[54] == 58:
            mld = frame[54 + (frame[55] + 1) * 8 : 54 + struct.unpack_from("!H", frame, 18)[0]]
            if len(mld) >= 24 and mld[0] in MLD_KINDS:
                out[str(ipaddress.IPv6Address(mld[8:24]))].add(MLD_KINDS[mld[0]])
            elif len(mld) >= 8 and mld[0] == 143:
                for group in record_groups(mld, 16):
                    out[group].add("mld_v2_report")
    return out


def assert_dissects_cleanly(frames: list[tuple[float, bytes]], path: Path) -> int:
    """Every frame (the node's queries) dissects in tshark as IGMP or MLD, with no
    Malformed mark, no expert error and no bad checksum. Returns how many frames."""
    require_tools("tshark")
    assert frames, "no frames to dissect"
    write_pcap(str(path), [(round(t * 1e9), frame) for t, frame in frames])

    def tshark(*args: str) -> list[str]:
        proc = subprocess.run(
            ["tshark", "-n", "-r", str(path), *args], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        return [line for line in proc.stdout.splitlines() if line.strip()]

    bad = tshark(
        "-Y",
        '_ws.malformed || _ws.expert.severity >= "Error" || igmp.checksum.status == "Bad"'
        ' || icmpv6.checksum.status == "Bad"',
    )
    assert bad == [], "tshark marks these frames:\n" + "\n".join(bad[:20])
    understood = tshark("-Y", "igmp.type == 0x11 || icmpv6.type == 130", "-T", "fields", "-e", "frame.number")
    assert len(understood) == len(frames), "tshark did not read every frame as a membership query"
    return len(frames)


# -- real hosts -----------------------------------------------------------------------


def join_leave(seg: Segment, group: str, leave_within: float) -> dict[str, Any]:
    """Join, see it in status, leave, see it gone; the times, relative to the host's act."""
    t_join = seg.do("join", group)
    t_seen = seg.until_local(group, lambda local: local is not None, 3.0, "to show up")
    local = seg.local(group)
    t_leave = seg.do("leave", group)
    t_gone = seg.until_local(group, lambda local: local is None, leave_within + 3.0, "to go")
    return {"seen": t_seen - t_join, "gone": t_gone - t_leave, "lifetime": t_gone - t_join, "local": local}


def source_join_leave(seg: Segment, group: str, source: str) -> dict[str, Any]:
    t_join = seg.do("source-join", group, source)
    t_seen = seg.until_local(group, lambda local: local is not None, 3.0, "to show up")
    seg.until_local(
        group, lambda local: local is not None and local["sources"] == [source], 1.0, f"to list {source}"
    )
    local = seg.local(group)
    t_leave = seg.do("source-leave", group, source)
    t_gone = seg.until_local(group, lambda local: local is None, LMQT + 3.0, "to go")
    return {"seen": t_seen - t_join, "gone": t_gone - t_leave, "local": local}


def join_block_leave(seg: Segment, group: str, source: str) -> dict[str, Any]:
    t_join = seg.do("join", group)
    t_seen = seg.until_local(group, lambda local: local is not None, 3.0, "to show up")
    joined = seg.local(group)
    t_block = seg.do("block", group, source)
    # BLOCK(S) puts S on the requested list with the group timer and queries it; the
    # host does not answer for S, so S is excluded once its timer ran out (LMQT).
    t_blocked = seg.until_local(
        group,
        lambda local: local is not None and local["sources"] == [source],
        LMQT + 3.0,
        f"to exclude {source}",
    )
    blocked = seg.local(group)
    t_leave = seg.do("leave", group)
    t_gone = seg.until_local(group, lambda local: local is None, LMQT + 3.0, "to go")
    return {
        "seen": t_seen - t_join,
        "joined": joined,
        "blocked_after": t_blocked - t_block,
        "blocked": blocked,
        "gone": t_gone - t_leave,
    }


def check_leave_time(result: dict[str, Any], what: str) -> None:
    assert LMQT - 0.1 <= result["gone"] <= LMQT + MARGIN, (
        f"{what}: dropped {result['gone']:.2f}s after the leave; LMQT is {LMQT}s"
    )


def test_kernel_hosts_of_every_version_join_and_leave(lab: Lab) -> None:
    # k1-k3: the default querier (IGMPv3, MLDv2) with hosts forced to each version;
    # k4, k5: older queriers (IGMPv2 + MLDv1, IGMPv1), so their query formats are
    # captured and dissected too, and the kernel follows the querier's version.
    k1 = Segment(lab, "k1", "k1", igmp=TIMERS, mld=TIMERS)
    k2 = Segment(lab, "k2", "k2", igmp=TIMERS, mld=TIMERS)
    k3 = Segment(lab, "k3", "k3", igmp=TIMERS, mld=TIMERS)
    k4 = Segment(lab, "k4", "k4", igmp={**TIMERS, "version": 2}, mld={**TIMERS, "version": 1})
    k5 = Segment(lab, "k5", "k5", igmp={**TIMERS, "version": 1}, mld=TIMERS)
    start_all(
        [
            (k1, {"igmp_host": 1, "mld_host": 1}),
            (k2, {"igmp_host": 2, "mld_host": 2}),
            (k3, {"igmp_host": 3}),
            (k4, {}),
            (k5, {}),
        ]
    )
    ssm4, ssm6, src4, src6 = "232.1.1.1", "ff3e::8000:1", "192.0.2.1", "2001:db8::5"
    scenarios: dict[str, Callable[[], dict[str, Any]]] = {
        "igmpv1 host": lambda: join_leave(k1, "239.1.0.1", GMI),
        "mldv1 host": lambda: join_leave(k1, "ff0e::1:1", LMQT),
        "igmpv2 host": lambda: join_leave(k2, "239.2.0.1", LMQT),
        "mldv2 host": lambda: join_leave(k2, "ff0e::2:1", LMQT),
        "igmpv3 host": lambda: join_leave(k3, "239.3.0.1", LMQT),
        "ssm v4": lambda: source_join_leave(k3, ssm4, src4),
        "block v4": lambda: join_block_leave(k3, "239.3.0.2", "192.0.2.7"),
        "ssm v6": lambda: source_join_leave(k3, ssm6, src6),
        "block v6": lambda: join_block_leave(k3, "ff0e::3:2", "2001:db8::7"),
        "igmpv2 querier": lambda: join_leave(k4, "239.4.0.1", LMQT),
        "mldv1 querier": lambda: join_leave(k4, "ff0e::4:1", LMQT),
        "igmpv1 querier": lambda: join_leave(k5, "239.5.0.1", GMI),
    }
    with ThreadPoolExecutor(len(scenarios)) as pool:
        futures = {name: pool.submit(fn) for name, fn in scenarios.items()}
        results = {name: future.result(timeout=60) for name, future in futures.items()}

    for name, result in results.items():
        assert result["seen"] <= 1.0, f"{name}: status showed the join after {result['seen']:.2f}s"

    any_source = {"mode": "exclude", "sources": []}
    expected_compat = {
        "igmpv1 host": 1,
        "mldv1 host": 1,
        "igmpv2 host": 2,
        "mldv2 host": 2,
        "igmpv3 host": 3,
        "igmpv2 querier": 2,
        "mldv1 querier": 1,
        "igmpv1 querier": 1,
    }
    for name, compat in expected_compat.items():
        local = results[name]["local"]
        assert {k: local[k] for k in ("mode", "sources")} == any_source, (name, local)
        assert local["compat_version"] == compat, (name, local)

    # IGMPv1 has no leave: the group lives out its Group Membership Interval from the
    # last report, which the host sent between its join and its leave.
    for name in ("igmpv1 host", "igmpv1 querier"):
        result = results[name]
        assert result["gone"] <= GMI + MARGIN, f"{name}: still there {result['gone']:.2f}s after leaving"
        assert result["lifetime"] >= GMI - 0.1, f"{name}: expired after {result['lifetime']:.2f}s < GMI"
    for name in (
        "mldv1 host",
        "igmpv2 host",
        "mldv2 host",
        "igmpv3 host",
        "igmpv2 querier",
        "mldv1 querier",
        "ssm v4",
        "ssm v6",
    ):
        check_leave_time(results[name], name)

    # Source-specific joins, in forwarding terms.
    assert results["ssm v4"]["local"]["mode"] == "include"
    assert results["ssm v4"]["local"]["sources"] == [src4]
    assert results["ssm v4"]["local"]["compat_version"] == 3
    assert results["ssm v6"]["local"]["mode"] == "include"
    assert results["ssm v6"]["local"]["sources"] == [src6]
    assert results["ssm v6"]["local"]["compat_version"] == 2
    for name, source in (("block v4", "192.0.2.7"), ("block v6", "2001:db8::7")):
        block = results[name]
        assert {k: block["joined"][k] for k in ("mode", "sources")} == any_source, (name, block)
        assert block["blocked"]["mode"] == "exclude", (name, block)
        assert block["blocked"]["sources"] == [source], (name, block)
        assert block["blocked"]["requested"] == [], (name, block)
        assert LMQT - 0.1 <= block["blocked_after"] <= LMQT + MARGIN, (name, block)
        assert block["gone"] <= LMQT + MARGIN, (name, block)

    # What went over the wire: the versions each querier speaks, a group-specific query
    # LMQC times for each single leave, none after an IGMPv1 host's silence.
    captured = {seg.node: seg.capture() for seg in (k1, k2, k3, k4, k5)}
    sent = {
        seg.node: [(t, f) for t, f in captured[seg.node] if f[6:12] == seg.mac]
        for seg in (k1, k2, k3, k4, k5)
    }
    heard = {node: queries(frames) for node, frames in sent.items()}
    versions = {node: {(q.family, q.version) for q in qs} for node, qs in heard.items()}
    for node in ("k1", "k2", "k3"):
        assert versions[node] == {(4, 3), (6, 2)}, (node, versions[node])
    assert versions["k4"] == {(4, 2), (6, 1)}
    assert versions["k5"] == {(4, 1), (6, 2)}

    for node, qs in heard.items():
        for q in qs:
            assert q.wire_problems() == [], (node, q)
            # Max Resp: query_response_interval (1 s) in general queries, the last member
            # query interval (1 s) in specific ones; IGMPv1 has none. QRV, QQIC: 2, 4 s.
            assert q.max_resp_s == (0.0 if q.version == 1 and q.family == 4 else 1.0), (node, q)
            if q.qrv is not None:
                assert (q.qrv, q.qqic) == (2, 4), (node, q)
        # General queries: the startup ones query_interval / 4 (1 s) apart, then one every
        # query_interval (4 s). The capture starts just after the first.
        for family in (4, 6):
            times = [q.t for q in qs if q.general and q.family == family]
            gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
            assert len(times) >= 3 and all(abs(gap - 4.0) < 0.2 for gap in gaps[1:]), (node, family, gaps)
            assert min(abs(gaps[0] - 1.0), abs(gaps[0] - 4.0)) < 0.2, (node, family, gaps)

    def specific(node: str, group: str) -> list[Query]:
        return [q for q in heard[node] if q.group == group]

    assert specific("k1", "239.1.0.1") == []  # nothing to ask an IGMPv1 host
    assert specific("k5", "239.5.0.1") == []  # nor can an IGMPv1 querier ask
    assert len(specific("k1", "ff0e::1:1")) == LMQC  # one MLDv1 Done
    assert len(specific("k2", "239.2.0.1")) == LMQC  # one IGMPv2 Leave
    assert len(specific("k4", "239.4.0.1")) == LMQC
    assert len(specific("k4", "ff0e::4:1")) == LMQC
    # IGMPv3/MLDv2 hosts repeat their state change; each repetition may restart the
    # retransmissions (RFC 3376 6.6.3.1), so at least LMQC.
    for node, group in (("k2", "ff0e::2:1"), ("k3", "239.3.0.1")):
        assert len(specific(node, group)) >= LMQC, (node, group)
    # Leaving (S,G) or blocking S queries S, with a group-and-source-specific query.
    for group, source in (
        (ssm4, src4),
        (ssm6, src6),
        ("239.3.0.2", "192.0.2.7"),
        ("ff0e::3:2", "2001:db8::7"),
    ):
        asked = [q for q in specific("k3", group) if source in q.sources]
        assert len(asked) >= LMQC, (group, [dataclasses.asdict(q) for q in specific("k3", group)])

    # The hosts spoke the forced (or the querier's) version about each group, and the
    # node counted the messages by type and version.
    v1, v2, v3 = {"igmp_v1_report"}, {"igmp_v2_report", "igmp_v2_leave"}, {"igmp_v3_report"}
    m1, m2 = {"mld_v1_report", "mld_v1_done"}, {"mld_v2_report"}
    spoke = {
        "k1": {"239.1.0.1": v1, "ff0e::1:1": m1},
        "k2": {"239.2.0.1": v2, "ff0e::2:1": m2},
        "k3": {"239.3.0.1": v3, ssm4: v3, "239.3.0.2": v3, ssm6: m2, "ff0e::3:2": m2},
        "k4": {"239.4.0.1": v2, "ff0e::4:1": m1},
        "k5": {"239.5.0.1": v1},
    }
    for seg in (k1, k2, k3, k4, k5):
        by_group = host_messages(captured[seg.node], seg.mac)
        for group, kinds in spoke[seg.node].items():
            assert by_group[group] == kinds, (seg.node, group, by_group[group])
        counters = {k for q in seg.status()["queriers"].values() for k, v in q["counters"].items() if v}
        assert set().union(*spoke[seg.node].values()) <= counters, (seg.node, counters, dict(by_group))

    total = sum(
        assert_dissects_cleanly(frames, lab.workdir / f"{node}-sent.pcap") for node, frames in sent.items()
    )
    assert total >= 30
    for seg in (k1, k2, k3, k4, k5):
        assert seg.alive()
        drops = seg.drops()
        assert set(drops) <= seg.expected_drops and sum(drops.values()) <= 2, (seg.node, drops)


# -- bridging -------------------------------------------------------------------------


def ip_json(lab: Lab, ns: str, *args: str) -> list[dict[str, Any]]:
    return json.loads(lab.exec(ns, ["ip", "-j", *args]).stdout or "[]")


def test_bridged_tap_serves_a_host_on_the_lan(lab: Lab) -> None:
    """Namespace r: a Linux bridge `br0` (the LAN, 192.168.50.0/24) with a veth to host
    namespace h, and node r whose TAP is enslaved to br0. Node s, another site, runs in
    namespace s, linked to r. A socket in h joins; r sees it; h receives s's stream."""
    r, s, h = lab.ns("r"), lab.ns("s"), lab.ns("h")
    lan_r, lan_h = f"l{lab.tag}r", f"l{lab.tag}h"
    run(["ip", "link", "add", lan_r, "netns", r, "type", "veth", "peer", "name", lan_h, "netns", h])
    for command in (
        ["ip", "link", "add", "br0", "type", "bridge"],
        ["ip", "link", "set", lan_r, "master", "br0"],
        ["ip", "link", "set", lan_r, "up"],
        ["ip", "link", "set", "br0", "up"],
        ["ip", "addr", "add", "192.168.50.1/24", "dev", "br0"],
    ):
        lab.exec(r, command)
    for command in (
        ["ip", "addr", "add", "192.168.50.2/24", "dev", lan_h],
        ["ip", "link", "set", lan_h, "up"],
        # h's way out of the LAN, as any LAN host has: also what its joins
        # and its reverse-path check of the overlay's sources go by.
        ["ip", "route", "add", "default", "via", "192.168.50.1"],
    ):
        lab.exec(h, command)
    lab.veth(s, "198.18.1.1/24", r, "198.18.1.2/24")

    tree = lab.workdir / "tree.yaml"
    tree.write_text(
        yaml.safe_dump(
            {
                "overlay": {"address_bits": 24, "mapping": "modulo"},
                "nodes": {
                    "r": node_doc(
                        "r", "169.254.1.1/16", None, None, {"bridge": "br0"}, listen="198.18.1.2:7000"
                    ),
                    "s": node_doc("s", "169.254.1.2/16", None, None, listen="127.0.0.1:7001"),
                },
                "links": [["s", "r"]],
            },
            sort_keys=False,
        )
    )
    r_proc, r_sock = lab.start_node(r, tree, "r")
    _, s_sock = lab.start_node(s, tree, "s")

    # The TAP is a port of br0, a permanent multicast router port, with no address; the
    # address and the multicast routes are on the bridge.
    link = ip_json(lab, r, "-d", "link", "show", "dev", TAP)[0]
    assert link.get("master") == "br0", "the TAP is not a port of br0"
    assert link["linkinfo"]["info_slave_kind"] == "bridge"
    assert link["linkinfo"]["info_slave_data"].get("multicast_router") == 2
    assert not any(a for x in ip_json(lab, r, "addr", "show", "dev", TAP) for a in x.get("addr_info", []))
    br_addrs = {
        (a["local"], a["prefixlen"])
        for x in ip_json(lab, r, "-4", "addr", "show", "dev", "br0")
        for a in x["addr_info"]
    }
    assert br_addrs == {("192.168.50.1", 24), ("169.254.1.1", 16)}
    assert [x["dev"] for x in ip_json(lab, r, "route", "show", "exact", "224.0.0.0/4")] == ["br0"]

    def status(sock: str) -> dict[str, Any]:
        value = status_or_none(sock)
        assert value is not None, lab.node_log("r") + lab.node_log("s")
        return value

    def group(sock: str, name: str) -> dict[str, Any] | None:
        return next((g for g in status(sock)["groups"] if g["group"] == name), None)

    wait_for(lambda: all(p["state"] == "up" for p in status(r_sock)["peers"]), 15, "r-s link up")
    group4, group6, count = "239.42.0.1", "ff0e::42:1", 500
    receiver = lab.popen(
        h, [sys.executable, str(APPS / "mc_recv.py"), group4, "5004", str(count), "5"], text=True
    )
    assert receiver.stdout is not None
    assert receiver.stdout.readline().strip() == "joined"
    member = Helper(lab, h, "mc_member.py", lan_h)
    member.ask(f"join {group6}")
    wait_for(lambda: (g := group(r_sock, group4)) and g["local"], 3, "r to see h's join through the bridge")
    wait_for(lambda: (g := group(r_sock, group6)) and g["local"], 3, "r to see h's MLD join")
    wait_for(lambda: (g := group(s_sock, group4)) and "r" in g["peers"], 5, "s to learn r wants it")
    sender = lab.popen(
        s, [sys.executable, str(APPS / "mc_send.py"), group4, "5004", str(count), "1000", "16"], text=True
    )
    sender.wait(timeout=30)
    result = received(receiver, timeout=30)
    assert result["received"] == list(range(count))
    assert result["sources"] == ["169.254.1.2"]
    querier = status(r_sock)["queriers"]["igmp"]
    assert querier["is_querier"] and querier["querier"] == "169.254.1.1"
    member.close()

    # Stopping the node takes back what it put on the bridge, and only that.
    r_proc.terminate()
    r_proc.wait(timeout=10)
    assert run(["ip", "netns", "exec", r, "ip", "link", "show", "dev", TAP], check=False).returncode != 0
    br_addrs = {
        (a["local"], a["prefixlen"])
        for x in ip_json(lab, r, "-4", "addr", "show", "dev", "br0")
        for a in x["addr_info"]
    }
    assert br_addrs == {("192.168.50.1", 24)}
    assert ip_json(lab, r, "route", "show", "exact", "224.0.0.0/4") == []
    assert (
        ip_json(lab, r, "-6", "route", "show", "table", "local", "type", "multicast", "exact", "ff0e::/16")
        == []
    )
    assert lab.exec(r, ["sysctl", "-n", "net.ipv4.conf.br0.accept_local"]).stdout.strip() == "0"
