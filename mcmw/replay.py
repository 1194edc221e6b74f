"""`mcmw replay`: a capture's frames through a node's real core, on the capture's clock.

The Node is the one `mcmw run` drives (mcmw/runtime.py); here its TAP is the capture.
Each neighbour is that neighbour's own Node core with an empty segment, wired to it in
memory (as tests/test_node.py does), so the Open handshake, authentication and
keep-alives run as they would and every byte the node sends is seen. Time is virtual
and follows the capture: the timers due between two frames run at their deadlines
(Node.next_deadline), so an hour of capture replays as fast as its frames can be
processed, and the same capture always gives the same output.

Peer messages found in the capture (a capture of the overlay side, merged in) are fed
to the node as coming from the neighbour that sent them, when the tree tells who that
is: the routes a neighbour asked for, and the packets it carried to this node.

`--live` instead sends the frames into a running node's TAP at the capture's pace.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import logging
import math
import socket
import struct
import sys
import time
from collections import Counter
from typing import Any

import dpkt

from mcmw.capture import (
    NS,
    CaptureError,
    Frame,
    TcpFlow,
    ethernet_frame,
    frames_with_progress,
    link_layer,
    udp_frame,
    write_pcap,
)
from mcmw.cli import UsageError
from mcmw.config import ConfigError, TreeConfig, load_tree
from mcmw.decode import (
    CopsStreams,
    FlowKey,
    ip_endpoints,
    is_membership,
    is_multicast,
    membership,
    pipe_closed,
    split_messages,
    strip_integrity,
    text,
)
from mcmw.node import Node
from overlay import codec
from overlay.link import CLOSED
from tap.ethernet import ETHERTYPE_IPV4, ETHERTYPE_IPV6, router_mac

ORIGIN = 1.0  # the node's clock at the first frame (a keep-alive timestamp of 0 means "none")
FED_FROM_CAPTURE = frozenset((codec.OP_ADD_ROUTE, codec.OP_REMOVE_ROUTE, codec.OP_IP_DATA))
EPHEMERAL_PORT = 40000
QUERIES_SHOWN = 20  # in the report for people; --json has them all


class Tally:
    """Packets and bytes per (group, source)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[bytes, bytes], list[int]] = {}

    def add(self, packet: bytes) -> None:
        ends = ip_endpoints(packet)
        if ends is None:
            return
        entry = self.counts.setdefault((ends[1], ends[0]), [0, 0])
        entry[0] += 1
        entry[1] += len(packet)

    def report(self) -> list[dict[str, Any]]:
        ordered = sorted(self.counts.items(), key=lambda kv: (len(kv[0][0]), kv[0]))
        return [
            {"group": text(group), "source": text(source), "packets": n, "bytes": size}
            for (group, source), (n, size) in ordered
        ]


def route_fields(route: codec.Route) -> dict[str, Any]:
    return {
        "group": text(route.group),
        "overlay_address": route.overlay_address,
        "mode": route.mode,
        "sources": [text(s) for s in route.sources],
    }


def replay_nonce(seed: str) -> bytes:
    """An Open nonce derived from `seed` instead of a random one, so that session keys,
    and so the replay's output, are the same on every run."""
    return hashlib.sha256(b"mcmw-replay:" + seed.encode()).digest()[:16]


class Wire:
    """The link between the replayed node and one neighbour: both ends, the neighbour's
    core, the made-up TCP/UDP flows that show it in `--out`, and what the node sent."""

    def __init__(self, tree: TreeConfig, node: Node, name: str, dials: bool, index: int, now: float) -> None:
        self.name = name
        self.dials = dials  # the node dials this neighbour (the node is the TCP client)
        self.peer = Node(tree, name, now)  # never started: its segment is empty
        me = tree.nodes[node.name].listen[0]
        there = tree.nodes[name].listen[0]
        self.link = node.new_link(
            name if dials else None, now, address=there, nonce=replay_nonce(f"{node.name}>{name}")
        )
        self.peer_link = self.peer.new_link(
            None if dials else node.name, now, address=me, nonce=replay_nonce(f"{name}>{node.name}")
        )
        self.flow = flow_for(tree, node.name, name, dials, index)
        self.udp_ends = ((me, tree.nodes[node.name].udp or 0), (there, tree.nodes[name].udp or 0))
        self.macs = (router_mac(node.name), router_mac(name))
        self.messages: Counter[str] = Counter()
        self.wants: dict[bytes, codec.Route] = {}  # what the node last asked this neighbour for
        self.changes: list[dict[str, Any]] = []
        self.data = Tally()
        self.fed: Counter[str] = Counter()  # messages from the capture, given to the node
        self.unread = bytearray()

    def heard(self, data: bytes, now: float) -> None:
        """Note what the node sent on the stream (authenticated messages are read without
        their Integrity object; the neighbour's core checks it)."""
        self.unread += data
        raw, used, _ = split_messages(self.unread)
        del self.unread[:used]
        for message in raw:
            self.note(message, now)

    def note(self, message: bytes, now: float) -> None:
        name = codec.MESSAGE_NAMES[message[1]]
        self.messages[name] += 1
        try:
            msg = codec.decode(strip_integrity(message)[0])
        except codec.CodecError:
            return
        if isinstance(msg, codec.AddRoute | codec.RemoveRoute):
            for route in msg.routes:
                if isinstance(msg, codec.AddRoute):
                    self.wants[route.group] = route
                else:
                    self.wants.pop(route.group, None)
                self.changes.append({"time": round(now - ORIGIN, 9), "message": name, **route_fields(route)})
        elif isinstance(msg, codec.IpData):
            self.data.add(msg.packet)

    def report(self, status: dict[str, Any]) -> dict[str, Any]:
        peer = next((p for p in status["peers"] if p["name"] == self.name), {})
        routes = sorted(self.wants.values(), key=lambda r: (len(r.group), r.group))
        return {
            "name": self.name,
            "state": peer.get("state"),
            "role": "dial" if self.dials else "accept",
            "transport": peer.get("transport"),
            "messages": dict(sorted(self.messages.items())),
            "routes": [route_fields(r) for r in routes],
            "route_changes": self.changes,
            "data": self.data.report(),
            "from_capture": dict(sorted(self.fed.items())),
            "last_error": peer.get("last_error"),
        }


def flow_for(tree: TreeConfig, node: str, peer: str, dials: bool, index: int) -> TcpFlow:
    """The made-up TCP connection of a link, between the tree's listen addresses."""
    client, server = (node, peer) if dials else (peer, node)
    server_end = tree.nodes[server].listen
    host = tree.nodes[client].listen[0]
    family = ipaddress.ip_address(server_end[0]).version
    if ipaddress.ip_address(host).version != family:
        host = "192.0.2.1" if family == 4 else "2001:db8::1"  # documentation addresses
    client_end = (host, EPHEMERAL_PORT + index)
    digest = hashlib.sha256(f"{client}>{server}".encode()).digest()
    isn = (int.from_bytes(digest[:4], "big"), int.from_bytes(digest[4:8], "big"))
    return TcpFlow(client_end, server_end, (router_mac(client), router_mac(server)), isn)


class Replay:
    """One node, its neighbours' cores and a virtual clock, fed frame by frame."""

    def __init__(self, tree: TreeConfig, name: str, start_ns: int, record: bool) -> None:
        self.tree = tree
        self.name = name
        self.start_ns = start_ns
        self.now = ORIGIN
        self.out: list[tuple[int, bytes]] | None = [] if record else None
        self.frames: Counter[str] = Counter(read=0, replayed=0)
        self.own_macs = {router_mac(n) for n in tree.nodes}
        self.queries: list[dict[str, Any]] = []
        self.tap_data = Tally()
        self.tap_frames = 0
        self.streams = CopsStreams()
        self.opened: dict[FlowKey, str] = {}  # the capture's peer streams -> who sent Open
        self.listeners = {
            (ipaddress.ip_address(n.listen[0]).packed, n.listen[1]): k for k, n in tree.nodes.items()
        }
        self.udp_ports = {
            (ipaddress.ip_address(n.listen[0]).packed, n.udp): k for k, n in tree.nodes.items() if n.udp
        }
        node = self.node = Node(tree, name, self.now)
        node.start(self.now)
        self.wires: dict[str, Wire] = {}
        for index, (peer, dials) in enumerate(node.neighbours.items()):
            wire = self.wires[peer] = Wire(tree, node, peer, dials, index, self.now)
            if self.out is not None:
                self.out.extend((start_ns, f) for f in wire.flow.handshake())
        self.pump()

    # -- time -----------------------------------------------------------------------

    def clock(self, ts_ns: int) -> float:
        return ORIGIN + (ts_ns - self.start_ns) / NS

    def stamp(self) -> int:
        return self.start_ns + round((self.now - ORIGIN) * NS)

    def cores(self) -> list[Node]:
        return [self.node, *(w.peer for w in self.wires.values())]

    def next_deadline(self) -> float | None:
        return min((d for d in (n.next_deadline() for n in self.cores()) if d is not None), default=None)

    def advance(self, until: float) -> None:
        """Run every timer due up to `until`, each at its own deadline."""
        while (due := self.next_deadline()) is not None and due <= until:
            t = max(self.now, due)
            for attempt in range(8):
                self.now = t
                for core in self.cores():
                    core.expire(t)
                self.pump()
                after = self.next_deadline()
                if after is None or after > t:
                    break
                # Float rounding left a timer just short of due at its own deadline.
                t = min(until, t + math.ulp(t) * (1 << (attempt + 1)))
            else:
                break  # a deadline that never moves: leave it for the next frame
        self.now = max(self.now, until)

    # -- input ------------------------------------------------------------------------

    def feed(self, frame: Frame) -> None:
        self.frames["read"] += 1
        self.advance(self.clock(frame.ts_ns))
        link = link_layer(frame)
        if link is None:
            self.frames["too_short"] += 1
            return
        if link.ethertype in (ETHERTYPE_IPV4, ETHERTYPE_IPV6) and self.peer_messages(link.payload):
            self.frames["peer_messages"] += 1
            return
        if link.src in self.own_macs:
            self.frames["mcmw_output"] += 1  # a node's own writes, seen on its TAP
            return
        ethernet = ethernet_frame(frame)
        if ethernet is None:
            self.frames["not_ip"] += 1
            return
        self.frames["replayed"] += 1
        self.node.tap_frames([ethernet], self.now)
        self.pump()

    def peer_messages(self, packet: bytes) -> bool:
        """Feed the peer messages of a captured overlay segment; False if it is not one."""
        ends = ip_endpoints(packet)
        if ends is None or is_multicast(ends[1]) or is_membership(packet, packet[0] >> 4):
            return False  # peer messages travel unicast
        try:
            ip, key, seg = self.streams.segment(packet, packet[0] >> 4)
        except Exception:  # what dpkt cannot read is not a peer message
            return False
        if seg is None or key is None:
            return False
        datagram = isinstance(ip.data, dpkt.udp.UDP)
        if datagram:  # the UDP data channel: nodes by their udp ports
            sender, receiver = self.udp_ports.get(key[:2]), self.udp_ports.get(key[2:])
            if sender is None and receiver is not None:  # datagrams leave from any address
                ports = [p for p, _ in self.tree.neighbours(receiver) if self.tree.nodes[p].udp == key[1]]
                sender = ports[0] if len(ports) == 1 else None
        else:
            sender, receiver = self.who(key, seg.messages)
        wire = self.wires.get(sender or "")
        for message in seg.messages:
            if receiver != self.name or wire is None or message[1] not in FED_FROM_CAPTURE:
                continue
            if wire.link.auth is not None:
                wire.fed["not fed: authenticated"] += 1  # sealed with another session's key
                continue
            if wire.link.state == CLOSED:
                wire.fed["not fed: link closed"] += 1
                continue
            try:
                if datagram:
                    self.record_datagram(wire, from_node=False, data=message)
                    self.node.link_datagram(wire.link, message, self.now)
                else:
                    self.record_stream(wire, from_node=False, data=message)
                    self.node.link_data(wire.link, message, self.now)
            except struct.error:
                # Node._ip_data reads an IP-Data head without checking its length (an xfail
                # in tests/test_overlay_hostile.py): count it and go on.
                wire.fed["not fed: too short for the node"] += 1
                continue
            wire.fed[codec.MESSAGE_NAMES[message[1]]] += 1
        self.pump()
        return True

    def who(self, key: FlowKey, messages: list[bytes]) -> tuple[str | None, str | None]:
        """Which nodes a captured peer stream runs between: by the Open it carried, else by
        the tree's listen addresses (the accepting end's address and port; the dialing
        end's address when only one neighbour has it)."""
        for message in messages:
            if message[1] == codec.OP_OPEN:
                try:
                    opened = codec.decode(strip_integrity(message)[0])
                except codec.CodecError:
                    continue
                assert isinstance(opened, codec.Open)
                self.opened[key] = opened.node
        src, sport, dst, dport = key
        sender = self.opened.get(key) or self.listeners.get((src, sport))
        receiver = self.opened.get((dst, dport, src, sport)) or self.listeners.get((dst, dport))
        if sender is None and receiver is not None:
            sender = self.neighbour_at(receiver, src)
        if receiver is None and sender is not None:
            receiver = self.neighbour_at(sender, dst)
        return sender, receiver

    def neighbour_at(self, node: str, address: bytes) -> str | None:
        names = [
            peer
            for peer, _ in self.tree.neighbours(node)
            if ipaddress.ip_address(self.tree.nodes[peer].listen[0]).packed == address
        ]
        return names[0] if len(names) == 1 else None

    # -- moving bytes ------------------------------------------------------------------

    def pump(self) -> None:
        """Move what the cores queued between the node and its neighbours until nothing is
        in flight; note what the node wrote into its TAP."""
        node = self.node
        busy = True
        while busy:
            busy = False
            for frame in node.tap_out:
                self.wrote(frame)
            node.tap_tx += len(node.tap_out)
            node.tap_out.clear()
            for wire in self.wires.values():
                wire.peer.tap_out.clear()  # the neighbour's own (empty) segment
                for source, from_node in ((wire.link, True), (wire.peer_link, False)):
                    target, core = (wire.peer_link, wire.peer) if from_node else (wire.link, node)
                    if source.has_output:
                        data = source.take_output()
                        self.record_stream(wire, from_node, data)
                        if from_node:
                            wire.heard(data, self.now)
                        if target.state != CLOSED:
                            core.link_data(target, data, self.now)
                        busy = True
                    for datagram in source.datagrams:
                        self.record_datagram(wire, from_node, datagram)
                        if from_node:
                            wire.note(datagram, self.now)
                        if target.state != CLOSED:
                            core.link_datagram(target, datagram, self.now)
                        busy = True
                    source.datagrams.clear()

    def record_stream(self, wire: Wire, from_node: bool, data: bytes) -> None:
        if self.out is not None:
            stamp = self.stamp()
            self.out.extend((stamp, f) for f in wire.flow.send(from_node == wire.dials, data))

    def record_datagram(self, wire: Wire, from_node: bool, data: bytes) -> None:
        if self.out is not None:
            ends, macs = wire.udp_ends, wire.macs
            if not from_node:
                ends, macs = (ends[1], ends[0]), (macs[1], macs[0])
            self.out.append((self.stamp(), udp_frame(ends[0], ends[1], macs, data)))

    def wrote(self, frame: bytes) -> None:
        """A frame the node wrote into its TAP: a query of its own, or a packet delivered."""
        self.tap_frames += 1
        if self.out is not None:
            self.out.append((self.stamp(), frame))
        packet = frame[14:]
        family = 4 if frame[12:14] == b"\x08\x00" else 6
        if ip_endpoints(packet) is not None and is_membership(packet, family):
            query = membership(packet, family)
            fields = ("protocol", "version", "group", "sources", "max_resp_s", "s_flag")
            self.queries.append({"time": round(self.now - ORIGIN, 9), **{k: query.get(k) for k in fields}})
        else:
            self.tap_data.add(packet)

    def report(self, path: str) -> dict[str, Any]:
        status = self.node.status(self.now)
        return {
            "node": self.name,
            "capture": path,
            "start": self.start_ns / NS,
            "duration_s": round(self.now - ORIGIN, 9),
            "frames": dict(self.frames),
            "groups": status["groups"],
            "queriers": status["queriers"],
            "neighbours": [w.report(status) for w in self.wires.values()],
            "tap": {"frames": self.tap_frames, "queries": len(self.queries), "data": self.tap_data.report()},
            "queries": self.queries,
            "counters": status["counters"],
            "membership_drops": status["membership_drops"],
        }


# -- the command -------------------------------------------------------------------


def load_node_tree(args: argparse.Namespace) -> TreeConfig:
    tree = load_tree(args.config)
    if args.node not in tree.nodes:
        raise ConfigError(f"{args.config}: nodes: no node named {args.node!r} (have {', '.join(tree.nodes)})")
    return tree


def replay_main(args: argparse.Namespace) -> int:
    """`mcmw replay FILE -c TREE --node NAME [--out OUT] [--json] | --live [--speed X]`."""
    tree = load_node_tree(args)
    # The cores' warnings (a link closed, a bad message) would come from the node and its
    # neighbours alike, on a clock that is not now: the report says it all instead.
    logging.getLogger("mcmw.node").setLevel(logging.ERROR)
    if getattr(args, "live", False):
        if args.out:
            raise UsageError("--out and --live do not go together: a live replay writes no capture")
        return live(args, tree)
    replay: Replay | None = None
    damage: CaptureError | None = None
    frames = frames_with_progress(args.file, "replay")
    try:
        for frame in frames:
            if replay is None:
                replay = Replay(tree, args.node, frame.ts_ns, record=bool(args.out))
            replay.feed(frame)
    except CaptureError as exc:
        damage = exc  # replay what could be read, then report the damage
    finally:
        frames.close()
    if replay is None:
        replay = Replay(tree, args.node, 0, record=bool(args.out))
    result = replay.report(args.file)
    if damage is not None:
        result["damaged"] = str(damage)
    if args.out:
        assert replay.out is not None
        try:
            write_pcap(args.out, replay.out)
        except OSError as exc:
            raise UsageError(f"{args.out}: cannot write: {exc.strerror or exc}") from None
        result["out"] = {"file": args.out, "frames": len(replay.out)}
    try:
        print(json.dumps(result, indent=2) if args.json else format_report(result))
    except BrokenPipeError:
        pipe_closed()
    if damage is not None:
        sys.stdout.flush()
        raise damage
    return 0


def live(args: argparse.Namespace, tree: TreeConfig) -> int:
    """Send the capture's frames into the node's TAP (in this namespace) at the capture's
    pace times `--speed` (0: as fast as possible); a node's own output is not sent back."""
    speed = getattr(args, "speed", 1.0)
    if speed < 0:
        raise UsageError(f"--speed {speed:g}: must be 0 (no pauses) or more")
    ifname = tree.nodes[args.node].tap.name
    own = {router_mac(n) for n in tree.nodes}
    counts: Counter[str] = Counter(sent=0)
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        sock.bind((ifname, 0))
    except OSError as exc:
        raise OSError(f"cannot send on {ifname}: {exc.strerror or exc} (is the node running here?)") from None
    began = time.monotonic()
    first: int | None = None
    frames = frames_with_progress(args.file, "replay")
    with sock:
        try:
            for frame in frames:
                first = frame.ts_ns if first is None else first
                ethernet = ethernet_frame(frame)
                if ethernet is None or ethernet[6:12] in own:
                    counts["skipped"] += 1
                    continue
                if speed > 0:
                    pause = began + (frame.ts_ns - first) / NS / speed - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                try:
                    sock.send(ethernet)
                    counts["sent"] += 1
                except OSError:
                    counts["failed"] += 1  # e.g. larger than the TAP's MTU
        finally:
            frames.close()
    result = {"node": args.node, "tap": ifname, "seconds": round(time.monotonic() - began, 3), **counts}
    if args.json:
        print(json.dumps(result))
    else:
        extra = "".join(f", {counts[k]} {k}" for k in ("skipped", "failed") if counts[k])
        print(f"sent {counts['sent']} frames into {ifname} in {result['seconds']}s{extra}")
    return 0


# -- the report for people ---------------------------------------------------------------


def format_report(rep: dict[str, Any]) -> str:
    frames = rep["frames"]
    skipped = ", ".join(
        f"{v} {k.replace('_', ' ')}" for k, v in frames.items() if k not in ("read", "replayed")
    )
    lines = [
        f"replay of {rep['capture']} into node {rep['node']}: {frames['read']} frames over "
        f"{rep['duration_s']:g}s, {frames['replayed']} fed to the TAP"
        + (f" (not fed: {skipped})" if skipped else ""),
        "membership:",
    ]
    for group in rep["groups"]:
        local = group["local"]
        here = (
            "-"
            if local is None
            else f"{local['mode']} {{{', '.join(local['sources'])}}} v{local['compat_version']}"
        )
        lines.append(f"  {group['group']:<24} local {here:<28} peers {','.join(group['peers']) or '-'}")
    if not rep["groups"]:
        lines.append("  (no group)")
    lines.append("neighbours:")
    for n in rep["neighbours"]:
        sent = ", ".join(f"{k} {v}" for k, v in n["messages"].items()) or "nothing"
        why = f" ({n['last_error']})" if n.get("last_error") else ""
        lines.append(f"  {n['name']} ({n['state']}{why}): sent {sent}")
        for route in n["routes"]:
            lines.append(f"    asks for {route['group']} {route['mode']} {{{', '.join(route['sources'])}}}")
        for d in n["data"]:
            lines.append(f"    data {d['source']} > {d['group']}: {d['packets']} packets, {d['bytes']} bytes")
    tap = rep["tap"]
    kinds = Counter(
        "general" if q["group"] in ("0.0.0.0", "::") else "group-and-source" if q["sources"] else "group"
        for q in rep["queries"]
    )
    shown = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    lines.append(f"tap: wrote {tap['frames']} frames; queries: {shown or 'none'}")
    for d in tap["data"]:
        lines.append(f"  data {d['source']} > {d['group']}: {d['packets']} packets, {d['bytes']} bytes")
    for q in rep["queries"][:QUERIES_SHOWN]:
        what = "general" if q["group"] in ("0.0.0.0", "::") else q["group"]
        srcs = f" sources [{', '.join(q['sources'])}]" if q["sources"] else ""
        lines.append(f"  {q['time']:>12.3f}s {q['protocol']} v{q['version']} query {what}{srcs}")
    if len(rep["queries"]) > QUERIES_SHOWN:
        lines.append(f"  ... {len(rep['queries']) - QUERIES_SHOWN} more (--json lists them all)")
    counters = "  ".join(f"{k} {v}" for k, v in sorted(rep["counters"].items()))
    lines.append(f"counters: {counters}")
    drops = rep["membership_drops"]
    lines.append("membership drops: " + ("  ".join(f"{p} {d}" for p, d in drops.items() if d) or "none"))
    if "out" in rep:
        lines.append(f"wrote {rep['out']['frames']} frames to {rep['out']['file']}")
    return "\n".join(lines)
