"""`mcmw replay`: a capture's frames through a node's real core, on the capture's clock.

The Node is the one `mcmw run` drives (mcmw/runtime.py); here its TAP is the capture
and each neighbour is a fake peer in memory that completes the Open handshake and
answers keep-alives, so links stay up and every byte the node would send is seen.
Time is virtual and follows the capture: the timers due between two frames run at their
deadlines (Node.next_deadline), so an hour of capture replays as fast as its frames can
be processed, and the same capture always gives the same output.

Peer messages found in the capture (a capture of the overlay side, merged in) are fed
to the node as coming from the neighbour that sent them, when the tree says who that
is: routes a neighbour asked for, and packets it carried to this node.

`--live` instead sends the frames into a running node's TAP at the capture's pace.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import math
import socket
import sys
import time
from collections import Counter
from typing import Any

from mcmw.capture import (
    NS,
    CaptureError,
    CaptureReader,
    Frame,
    Progress,
    TcpFlow,
    ethernet_frame,
    link_layer,
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
    split_messages,
    text,
)
from mcmw.node import Node
from overlay import codec
from overlay.link import CLOSED, PeerLink
from tap.ethernet import ETHERTYPE_IPV4, ETHERTYPE_IPV6, router_mac

ORIGIN = 1.0  # the node's clock at the first frame (a keep-alive timestamp of 0 means "none")
FED_FROM_CAPTURE = frozenset((codec.OP_ADD_ROUTE, codec.OP_REMOVE_ROUTE, codec.OP_IP_DATA))
EPHEMERAL_PORT = 40000


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
        return [
            {"group": text(group), "source": text(source), "packets": n, "bytes": size}
            for (group, source), (n, size) in sorted(
                self.counts.items(), key=lambda kv: (len(kv[0][0]), kv[0])
            )
        ]


class Neighbour:
    """A fake peer: completes the handshake, answers keep-alives, and keeps what the node
    sent it (message counts, the routes it asked for, the packets it carried)."""

    def __init__(self, name: str, dials: bool, link: PeerLink, flow: TcpFlow) -> None:
        self.name = name
        self.dials = dials  # the node dials this neighbour (the node is the TCP client)
        self.link = link
        self.flow = flow
        self.messages: Counter[str] = Counter()
        self.wants: dict[bytes, codec.Route] = {}  # what the node last asked this neighbour for
        self.changes: list[dict[str, Any]] = []
        self.data = Tally()
        self.fed: Counter[str] = Counter()  # messages from the capture, given to the node as ours
        self.unread = bytearray()

    def heard(self, data: bytes, now: float) -> list[bytes]:
        """Take what the node sent; return the replies (keep-alive echoes)."""
        self.unread += data
        raw, used, _ = split_messages(self.unread)
        del self.unread[:used]
        replies: list[bytes] = []
        for message in raw:
            name = codec.MESSAGE_NAMES[message[1]]
            self.messages[name] += 1
            msg = codec.decode(message)
            if isinstance(msg, codec.KeepAlive):
                echo = codec.KeepAlive(int(now * NS), msg.timestamp_ns, 0)
                replies.append(codec.encode(echo))
            elif isinstance(msg, codec.AddRoute | codec.RemoveRoute):
                for route in msg.routes:
                    if isinstance(msg, codec.AddRoute):
                        self.wants[route.group] = route
                    else:
                        self.wants.pop(route.group, None)
                    self.changes.append(
                        {"time": round(now - ORIGIN, 9), "message": name, **route_fields(route)}
                    )
            elif isinstance(msg, codec.IpData):
                self.data.add(msg.packet)
        return replies

    def report(self, status: dict[str, Any]) -> dict[str, Any]:
        peer = next((p for p in status["peers"] if p["name"] == self.name), {})
        routes = sorted(self.wants.values(), key=lambda r: (len(r.group), r.group))
        return {
            "name": self.name,
            "state": peer.get("state"),
            "role": "dial" if self.dials else "accept",
            "messages": dict(sorted(self.messages.items())),
            "routes": [route_fields(r) for r in routes],
            "route_changes": self.changes,
            "data": self.data.report(),
            "from_capture": dict(sorted(self.fed.items())),
        }


def route_fields(route: codec.Route) -> dict[str, Any]:
    return {
        "group": text(route.group),
        "overlay_address": route.overlay_address,
        "mode": route.mode,
        "sources": [text(s) for s in route.sources],
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
    """One node, its fake neighbours and a virtual clock, fed frame by frame."""

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
        self.opened: dict[FlowKey, str] = {}  # capture's peer streams -> the node that sent Open
        self.listeners = {
            (ipaddress.ip_address(n.listen[0]).packed, n.listen[1]): k for k, n in tree.nodes.items()
        }
        node = self.node = Node(tree, name, self.now)
        node.start(self.now)
        self.neighbours: dict[str, Neighbour] = {}
        for index, (peer, dials) in enumerate(node.neighbours.items()):
            link = node.new_link(peer if dials else None, self.now)
            flow = flow_for(tree, name, peer, dials, index)
            self.neighbours[peer] = Neighbour(peer, dials, link, flow)
            if self.out is not None:
                self.out.extend((start_ns, f) for f in flow.handshake())
            other = tree.nodes[peer]
            hello = codec.Open(
                node=peer,
                address_bits=tree.overlay.address_bits,
                mapping=tree.overlay.mapping,
                ttl_mode=tree.overlay.ttl,
                udp_port=other.udp or 0,
                dead_interval=max(1, round(tree.overlay.dead_interval)),
            )
            self.collect()  # the node's own Open goes first, as a dialer's would
            self.to_node(self.neighbours[peer], codec.encode(hello))
        self.collect()

    # -- time -----------------------------------------------------------------------

    def clock(self, ts_ns: int) -> float:
        return ORIGIN + (ts_ns - self.start_ns) / NS

    def stamp(self) -> int:
        return self.start_ns + round((self.now - ORIGIN) * NS)

    def advance(self, until: float) -> None:
        """Run every timer due up to `until`, each at its own deadline."""
        node = self.node
        while (due := node.next_deadline()) is not None and due <= until:
            t = max(self.now, due)
            for attempt in range(8):
                self.now = t
                node.expire(t)
                self.collect()
                after = node.next_deadline()
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
        if link.src in self.own_macs:
            self.frames["mcmw_output"] += 1  # a node's own writes seen on its TAP
            return
        if link.ethertype in (ETHERTYPE_IPV4, ETHERTYPE_IPV6) and self.peer_messages(link.payload):
            self.frames["peer_messages"] += 1
            return
        ethernet = ethernet_frame(frame)
        if ethernet is None:
            self.frames["not_ip"] += 1
            return
        self.frames["replayed"] += 1
        self.node.tap_frames([ethernet], self.now)
        self.collect()

    def peer_messages(self, packet: bytes) -> bool:
        """Feed the peer messages of a captured overlay segment; False if it is not one."""
        family = packet[0] >> 4 if packet else 0
        ends = ip_endpoints(packet)
        if ends is None or is_multicast(ends[1]) or is_membership(packet, family):
            return False  # peer messages travel unicast
        try:
            _, key, seg = self.streams.segment(packet, family)
        except Exception:  # noqa: BLE001 - anything dpkt cannot read is simply not ours
            return False
        if seg is None:
            return False
        sender, receiver = self.who(key, seg.messages) if key is not None else (None, None)
        for message in seg.messages:
            neighbour = self.neighbours.get(sender or "")
            if receiver == self.name and neighbour is not None and message[1] in FED_FROM_CAPTURE:
                neighbour.fed[codec.MESSAGE_NAMES[message[1]]] += 1
                self.to_node(neighbour, message)
        return True

    def who(self, key: FlowKey, messages: list[bytes]) -> tuple[str | None, str | None]:
        """Which nodes a captured peer stream runs between: by the Open it carried, else by
        the tree's listen addresses (the accepting end's address and port, the dialing
        end's address when only one node has it)."""
        for message in messages:
            if message[1] == codec.OP_OPEN:
                try:
                    opened = codec.decode(message)
                except codec.CodecError:
                    continue
                assert isinstance(opened, codec.Open)
                self.opened[key] = opened.node
        src, sport, dst, dport = key
        sender = self.opened.get(key) or self.listeners.get((src, sport))
        receiver = self.opened.get((dst, dport, src, sport)) or self.listeners.get((dst, dport))
        if sender is None and receiver is not None:
            sender = self.dialer(receiver, src)
        if receiver is None and sender is not None:
            receiver = self.dialer(sender, dst)
        return sender, receiver

    def dialer(self, node: str, address: bytes) -> str | None:
        names = [
            peer
            for peer, _ in self.tree.neighbours(node)
            if ipaddress.ip_address(self.tree.nodes[peer].listen[0]).packed == address
        ]
        return names[0] if len(names) == 1 else None

    def to_node(self, neighbour: Neighbour, data: bytes) -> None:
        self.record(neighbour, from_node=False, data=data)
        if neighbour.link.state != CLOSED:
            self.node.link_data(neighbour.link, data, self.now)

    # -- output -----------------------------------------------------------------------

    def record(self, neighbour: Neighbour, from_node: bool, data: bytes) -> None:
        if self.out is not None:
            stamp = self.stamp()
            from_client = from_node == neighbour.dials
            self.out.extend((stamp, f) for f in neighbour.flow.send(from_client, data))

    def collect(self) -> None:
        """Take everything the node queued, answering the neighbours' part, until quiet."""
        node = self.node
        busy = True
        while busy:
            busy = False
            for frame in node.tap_out:
                self.wrote(frame)
            node.tap_tx += len(node.tap_out)
            node.tap_out.clear()
            for neighbour in self.neighbours.values():
                tx = neighbour.link.tx
                if not tx:
                    continue
                data = bytes(tx)
                tx.clear()
                self.record(neighbour, from_node=True, data=data)
                for reply in neighbour.heard(data, self.now):
                    self.to_node(neighbour, reply)
                    busy = True

    def wrote(self, frame: bytes) -> None:
        """A frame the node wrote into its TAP: a query of its own, or a packet delivered."""
        self.tap_frames += 1
        if self.out is not None:
            self.out.append((self.stamp(), frame))
        packet = frame[14:]
        family = 4 if frame[12:14] == b"\x08\x00" else 6
        if len(packet) >= 40 and is_membership(packet, family):
            query = membership(packet, family)
            self.queries.append(
                {
                    "time": round(self.now - ORIGIN, 9),
                    **{k: query.get(k) for k in ("protocol", "version", "group", "sources", "max_resp_s")},
                    "s_flag": query.get("s_flag"),
                }
            )
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
            "neighbours": [n.report(status) for n in self.neighbours.values()],
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
    if getattr(args, "live", False):
        if args.out:
            raise UsageError("--out and --live do not go together: a live replay writes no capture")
        return live(args, tree)
    replay: Replay | None = None
    damage: CaptureError | None = None
    with CaptureReader(args.file) as reader:
        progress = Progress("replay", reader.size)
        try:
            for frame in reader.frames():
                if replay is None:
                    replay = Replay(tree, args.node, frame.ts_ns, record=bool(args.out))
                replay.feed(frame)
                progress.update(reader.position, f"frame {frame.number}")
        except CaptureError as exc:
            damage = exc  # replay what could be read, then report the damage
        finally:
            progress.close()
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
    print(json.dumps(result, indent=2) if args.json else format_report(result))
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
    with sock, CaptureReader(args.file) as reader:
        progress = Progress("replay", reader.size)
        try:
            for frame in reader.frames():
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
                progress.update(reader.position, f"frame {frame.number}")
        finally:
            progress.close()
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
        lines.append(f"  {n['name']} ({n['state']}): sent {sent}")
        for route in n["routes"]:
            lines.append(f"    asks for {route['group']} {route['mode']} {{{', '.join(route['sources'])}}}")
        for d in n["data"]:
            lines.append(f"    data {d['source']} > {d['group']}: {d['packets']} packets, {d['bytes']} bytes")
    tap = rep["tap"]
    lines.append(f"tap: wrote {tap['frames']} frames, {tap['queries']} of them queries")
    for d in tap["data"]:
        lines.append(f"  data {d['source']} > {d['group']}: {d['packets']} packets, {d['bytes']} bytes")
    for q in rep["queries"]:
        what = "general" if q["group"] in ("0.0.0.0", "::") else q["group"]
        srcs = f" sources [{', '.join(q['sources'])}]" if q["sources"] else ""
        lines.append(f"  {q['time']:>12.3f}s {q['protocol']} v{q['version']} query {what}{srcs}")
    counters = "  ".join(f"{k} {v}" for k, v in sorted(rep["counters"].items()))
    lines.append(f"counters: {counters}")
    drops = rep["membership_drops"]
    lines.append("membership drops: " + ("  ".join(f"{p} {d}" for p, d in drops.items() if d) or "none"))
    if "out" in rep:
        lines.append(f"wrote {rep['out']['frames']} frames to {rep['out']['file']}")
    return "\n".join(lines)
