"""The node core on a virtual clock: nodes wired in memory, frames in, frames out."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path

import pytest
from scapy.layers.igmp import IGMPv3_MR, IGMPv3_MR_Group
from scapy.layers.inet import IP, UDP, IPOption_Router_Alert
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from mcmw.config import load_tree
from mcmw.node import Node, checksum_after_ttl_decrement
from overlay import codec
from overlay.link import PeerLink

TREE = """
overlay: {{address_bits: {bits}, mapping: modulo, ttl: {ttl}{secret}}}
nodes:
  a: {{listen: "198.18.1.1:7000", tap: {{name: mcmw0, address: 169.254.1.1/16}}{udp}}}
  b: {{listen: "198.18.1.2:7000", tap: {{name: mcmw0, address: 169.254.1.2/16}}{udp}}}
  c: {{listen: "198.18.2.2:7000", tap: {{name: mcmw0, address: 169.254.1.3/16}}{udp}}}
links: [[a, b], [b, c]]
"""
KEY = "1 0123456789abcdef0123456789abcdef\n"


class Net:
    """Three nodes a-b-c, their links carried in memory, one virtual clock."""

    def __init__(
        self, tmp_path: Path, bits: int = 24, ttl: str = "hop", udp: bool = False, key: str | None = None
    ) -> None:
        path = tmp_path / "tree.yaml"
        secret = ""
        if key is not None:
            (tmp_path / "psk.key").write_text(key)
            secret = ", secret_file: psk.key"
        path.write_text(TREE.format(bits=bits, ttl=ttl, secret=secret, udp=", udp: 7001" if udp else ""))
        tree = load_tree(path)
        self.now = 1000.0
        self.nodes = {name: Node(tree, name, self.now) for name in "abc"}
        for node in self.nodes.values():
            node.start(self.now)
        self.wires: list[tuple[Node, PeerLink, Node, PeerLink]] = []
        self.tap: dict[str, list[bytes]] = {name: [] for name in "abc"}
        self.connect("a", "b")
        self.connect("b", "c")

    def connect(self, dialer: str, acceptor: str) -> None:
        d, a = self.nodes[dialer], self.nodes[acceptor]
        link_d = d.new_link(acceptor, self.now, address=f"10.0.0.{acceptor}")
        link_a = a.new_link(None, self.now, address=f"10.0.0.{dialer}")
        self.wires.append((d, link_d, a, link_a))
        self.pump()

    def pump(self) -> None:
        """Move bytes between linked nodes until nothing is left in flight."""
        moved = True
        while moved:
            moved = False
            for x, lx, y, ly in self.wires:
                for ls, dst, ld in ((lx, y, ly), (ly, x, lx)):
                    if ls.has_output and ld.state != "closed":
                        dst.link_data(ld, ls.take_output(), self.now)
                        moved = True
                    for datagram in ls.datagrams:
                        dst.link_datagram(ld, datagram, self.now)
                        moved = True
                    ls.datagrams.clear()
            for name, node in self.nodes.items():
                self.tap[name].extend(node.tap_out)
                node.tap_out.clear()

    def advance(self, seconds: float, step: float = 0.25) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            for node in self.nodes.values():
                node.expire(self.now)
            self.pump()

    def frames(self, name: str, *frames: bytes) -> None:
        self.nodes[name].tap_frames(list(frames), self.now)
        self.pump()

    def data_out(self, name: str) -> list[bytes]:
        """Data frames written to `name`'s TAP (not queries), and forget them."""
        out = [f for f in self.tap[name] if f[12:14] == b"\x08\x00" and f[23] == 17]
        self.tap[name].clear()
        return out


def join(group: str, host: str = "169.254.1.2", rtype: int = 4, sources: tuple[str, ...] = ()) -> bytes:
    record = IGMPv3_MR_Group(rtype=rtype, maddr=group, srcaddrs=list(sources))
    return bytes(
        Ether(dst="01:00:5e:00:00:16", src="02:00:00:00:00:02")
        / IP(src=host, dst="224.0.0.22", ttl=1, options=[IPOption_Router_Alert()])
        / IGMPv3_MR(records=[record])
    )


def datagram(group: str, ttl: int = 16, src: str = "169.254.1.1", payload: bytes = b"x" * 100) -> bytes:
    return bytes(
        Ether(dst="01:00:5e:01:01:01", src="02:00:00:00:00:01")
        / IP(src=src, dst=group, ttl=ttl)
        / UDP(sport=4000, dport=5004)
        / payload
    )


def test_links_come_up_and_interest_flows_to_the_sender(tmp_path: Path) -> None:
    net = Net(tmp_path)
    assert all(len(n.links) == len(n.neighbours) for n in net.nodes.values())
    net.frames("c", join("239.1.1.1", host="169.254.1.3"))
    a_view = net.nodes["a"].status(net.now)
    assert a_view["groups"][0]["group"] == "239.1.1.1"
    assert a_view["groups"][0]["peers"] == ["b"]
    assert a_view["groups"][0]["overlay_address"] == 65793


def test_data_crosses_two_hops_with_ttl_decremented_per_hop(tmp_path: Path) -> None:
    net = Net(tmp_path)
    net.frames("c", join("239.1.1.1", host="169.254.1.3"))
    sent = datagram("239.1.1.1", ttl=16)
    net.frames("a", sent)
    (got,) = net.data_out("c")
    assert net.data_out("b") == []  # nobody in b's segment asked
    packet = IP(got[14:])
    assert packet.ttl == 14  # a and b each count one overlay hop
    original = IP(sent[14:])
    rebuilt = IP(bytes(packet))
    del rebuilt.chksum
    assert IP(bytes(rebuilt)).chksum == packet.chksum  # the incremental update is right
    assert bytes(packet.payload) == bytes(original.payload)
    assert got[:6] == bytes.fromhex("01005e010101")
    assert net.nodes["c"].status(net.now)["counters"]["delivered"] == 1


@pytest.mark.parametrize("ttl", [0x01, 0x02, 0x80, 0xFF])
def test_ttl_checksum_update_matches_full_checksum(ttl: int) -> None:
    for ident in range(0, 65536, 4099):
        packet = bytearray(bytes(IP(src="169.254.1.1", dst="239.1.1.1", ttl=ttl, id=ident) / UDP()))
        checksum = checksum_after_ttl_decrement(int.from_bytes(packet[10:12], "big"))
        packet[8] -= 1
        packet[10:12] = checksum.to_bytes(2, "big")
        expected = IP(bytes(packet))
        del expected.chksum
        assert IP(bytes(expected)).chksum == IP(bytes(packet)).chksum
        assert packet[8] == ttl - 1


def test_ttl_that_would_reach_zero_is_never_forwarded(tmp_path: Path) -> None:
    net = Net(tmp_path)
    net.frames("c", join("239.1.1.1", host="169.254.1.3"))
    net.frames("b", join("239.1.1.1"))
    net.frames("a", datagram("239.1.1.1", ttl=1))  # a would send it with TTL 0
    assert net.data_out("b") == [] and net.data_out("c") == []
    assert net.nodes["a"].counters["dropped_ttl"] == 1
    net.frames("a", datagram("239.1.1.1", ttl=2))  # reaches b with 1; b may not pass it on
    assert len(net.data_out("b")) == 1
    assert net.data_out("c") == []
    assert net.nodes["b"].counters["dropped_ttl"] == 1


def test_ttl_link_mode_treats_the_overlay_as_one_link(tmp_path: Path) -> None:
    net = Net(tmp_path, ttl="link")
    net.frames("c", join("239.1.1.1", host="169.254.1.3"))
    net.frames("a", datagram("239.1.1.1", ttl=1))
    (got,) = net.data_out("c")
    assert IP(got[14:]).ttl == 1


def test_link_local_groups_are_never_carried(tmp_path: Path) -> None:
    net = Net(tmp_path)
    net.frames("c", join("224.0.0.251", host="169.254.1.3"))
    assert net.nodes["a"].status(net.now)["groups"] == []
    net.frames("a", datagram("224.0.0.251"))
    assert net.nodes["a"].status(net.now)["counters"]["forwarded"] == 0


def test_groups_sharing_an_overlay_address_never_leak(tmp_path: Path) -> None:
    net = Net(tmp_path, bits=8)  # 239.1.1.1 and 239.2.2.1 both map to 1
    net.frames("c", join("239.1.1.1", host="169.254.1.3"))
    net.frames("b", join("239.2.2.1"))
    a_groups = {g["group"]: g for g in net.nodes["a"].status(net.now)["groups"]}
    assert a_groups["239.1.1.1"]["overlay_address"] == a_groups["239.2.2.1"]["overlay_address"] == 1
    net.frames("a", datagram("239.1.1.1"), datagram("239.2.2.1"))
    assert [IP(f[14:]).dst for f in net.data_out("c")] == ["239.1.1.1"]
    assert [IP(f[14:]).dst for f in net.data_out("b")] == ["239.2.2.1"]


def test_source_specific_join_delivers_only_that_source(tmp_path: Path) -> None:
    net = Net(tmp_path)
    net.frames("c", join("232.1.1.1", host="169.254.1.3", rtype=1, sources=("169.254.1.1",)))
    net.frames("a", datagram("232.1.1.1", src="169.254.1.1"), datagram("232.1.1.1", src="169.254.9.9"))
    assert [IP(f[14:]).src for f in net.data_out("c")] == ["169.254.1.1"]
    # The unwanted source did not even cross the first link.
    assert net.nodes["a"].links["b"].tx_packets == 1


def test_malformed_frames_are_counted_and_forwarding_goes_on(tmp_path: Path) -> None:
    net = Net(tmp_path)
    net.frames("c", join("239.1.1.1", host="169.254.1.3"))
    good = datagram("239.1.1.1")
    truncated = good[:30]
    bad_length = bytearray(good)
    bad_length[16:18] = (2000).to_bytes(2, "big")  # IPv4 total length past the frame
    bad_ihl = bytearray(good)
    bad_ihl[14] = 0x43
    six = bytes(Ether(dst="33:33:00:00:00:01") / IPv6(dst="ff0e::1", plen=900) / UDP())
    net.frames("a", truncated, bytes(bad_length), bytes(bad_ihl), six[:40], good)
    assert net.nodes["a"].counters["dropped_malformed"] == 4
    assert len(net.data_out("c")) == 1


def test_garbage_from_a_peer_closes_the_link_with_a_reason(tmp_path: Path) -> None:
    net = Net(tmp_path)
    b, link = net.nodes["b"], net.nodes["b"].links["a"]
    b.link_data(link, b"\x10\x03\x8c\xa5\xff\xff\xff\xff", net.now)
    assert link.state == "closed"
    assert "out of range" in link.close_reason
    status = b.status(net.now)
    assert next(p for p in status["peers"] if p["name"] == "a")["state"] == "down"
    assert status["counters"]["dropped_malformed"] == 1
    # b told a why before closing.
    reply = codec.decode(link.take_output())
    assert isinstance(reply, codec.Close) and "out of range" in reply.reason


def test_silent_peer_is_closed_after_the_dead_interval_and_routes_withdrawn(tmp_path: Path) -> None:
    net = Net(tmp_path)
    net.frames("c", join("239.1.1.1", host="169.254.1.3"))
    assert net.nodes["a"].routes
    a_link = net.nodes["a"].links["b"]
    net.wires = [w for w in net.wires if w[1] is not a_link]  # cut a-b silently
    net.advance(9.5)
    assert "b" in net.nodes["a"].links
    net.advance(1.0)
    assert "b" not in net.nodes["a"].links
    assert "nothing heard" in a_link.close_reason
    assert net.nodes["a"].routes == {}
    assert net.nodes["a"].status(net.now)["groups"] == []


def test_keepalives_keep_links_up_and_measure_rtt(tmp_path: Path) -> None:
    net = Net(tmp_path)
    net.advance(60)
    link = net.nodes["a"].links["b"]
    assert link.up and link.rtt_ms == 0.0


def test_open_with_another_mapping_is_refused_with_a_reason(tmp_path: Path) -> None:
    net = Net(tmp_path)
    a = net.nodes["a"]
    foreign = codec.Open("b", 24, "hash")
    link = a.new_link("b", net.now)
    a.link_data(link, codec.encode(foreign), net.now)
    assert link.state == "closed"
    assert "expected modulo/24" in link.close_reason
    assert "b" in a.links  # the established link is untouched


def test_unknown_node_cannot_open_a_link(tmp_path: Path) -> None:
    net = Net(tmp_path)
    b = net.nodes["b"]
    link = b.new_link(None, net.now)
    b.link_data(link, codec.encode(codec.Open("mallory", 24, "modulo")), net.now)
    assert link.state == "closed" and "not a neighbour" in link.close_reason


def test_leave_withdraws_interest_along_the_tree(tmp_path: Path) -> None:
    net = Net(tmp_path)
    net.frames("c", join("239.1.1.1", host="169.254.1.3"))
    net.frames("c", join("239.1.1.1", host="169.254.1.3", rtype=3))  # TO_IN {}: leave
    net.advance(3)  # Last Member Query Time: 2 x 1 s
    assert net.nodes["a"].routes == {}
    assert net.nodes["c"].status(net.now)["groups"] == []


def test_udp_channel_carries_data_and_counts_loss(tmp_path: Path) -> None:
    net = Net(tmp_path, udp=True)
    a_link = net.nodes["a"].links["b"]
    assert a_link.transport == "udp"
    net.frames("c", join("239.1.1.1", host="169.254.1.3"))
    net.frames("a", datagram("239.1.1.1"))
    assert len(net.data_out("c")) == 1
    net.nodes["a"].tap_frames([datagram("239.1.1.1")], net.now)
    a_link.datagrams.clear()  # lost on the way
    net.frames("a", datagram("239.1.1.1"))
    assert len(net.data_out("c")) == 1
    assert net.nodes["b"].links["a"].rx_lost == 1
    # Too big for one datagram: it crosses in fragments and arrives whole.
    net.frames("a", datagram("239.1.1.1", payload=b"y" * 8000))
    (big,) = net.data_out("c")
    assert len(big) == 14 + 20 + 8 + 8000 and big.endswith(b"y" * 8000)
    assert all(len(d) <= 1400 for d in a_link.datagrams)


def test_authenticated_links_come_up_and_carry_data(tmp_path: Path) -> None:
    net = Net(tmp_path, udp=True, key=KEY)
    assert all(len(n.links) == len(n.neighbours) for n in net.nodes.values())
    net.frames("c", join("239.1.1.1", host="169.254.1.3"))
    net.frames("a", datagram("239.1.1.1"), datagram("239.1.1.1", payload=b"z" * 8000))
    assert [len(f) for f in net.data_out("c")] == [142, 8042]
    net.advance(30)
    assert all(link.up for link in net.nodes["b"].links.values())
    assert net.nodes["b"].counters["dropped_auth"] == 0


def test_peer_with_another_key_cannot_open_a_link(tmp_path: Path) -> None:
    net = Net(tmp_path, key=KEY)
    b = net.nodes["b"]
    stranger = PeerLink(codec.Open("a", 24, "modulo"), "b", True, 3, 10, net.now,
                        keys={1: b"another-secret-of-16+"})
    link = b.new_link(None, net.now)
    b.link_data(link, stranger.take_output(), net.now)
    assert link.state == "closed" and "bad HMAC" in link.close_reason
    assert b.counters["dropped_auth"] == 1
    assert b.links["a"].up  # the real a is untouched


def test_replayed_and_forged_messages_are_refused(tmp_path: Path) -> None:
    net = Net(tmp_path, udp=True, key=KEY)
    net.frames("c", join("239.1.1.1", host="169.254.1.3"))
    a_link, b = net.nodes["a"].links["b"], net.nodes["b"]
    b_link = b.links["a"]
    net.nodes["a"].tap_frames([datagram("239.1.1.1")], net.now)
    (sealed,) = a_link.datagrams
    net.pump()
    assert len(net.data_out("c")) == 1
    b.link_datagram(b_link, sealed, net.now)  # the same datagram again
    forged = bytearray(sealed)
    forged[40] ^= 1
    b.link_datagram(b_link, bytes(forged), net.now)
    net.pump()
    assert net.data_out("c") == []
    assert b.counters["dropped_auth"] == 2 and b_link.up
    # A recorded Open replayed on a new connection never displaces the working link.
    replay = b.new_link(None, net.now)
    opener = PeerLink(codec.Open("a", 24, "modulo"), "b", True, 3, 10, net.now,
                      keys={1: KEY.split()[1].encode()})
    b.link_data(replay, opener.take_output(), net.now)
    assert replay.state == "confirming" and b.links["a"] is b_link
    b.link_data(replay, sealed, net.now)  # not sealed with this connection's session key
    assert replay.state == "closed" and b.links["a"] is b_link


def test_a_slow_link_drops_data_but_never_control(tmp_path: Path) -> None:
    net = Net(tmp_path)
    net.frames("c", join("239.1.1.1", host="169.254.1.3"))
    a = net.nodes["a"]
    link = a.links["b"]
    for _ in range(40):  # the socket takes nothing: the data queue fills
        a.tap_frames([datagram("239.1.1.1", payload=b"q" * 1400)] * 100, net.now)
    assert link.dropped_queue > 0 and link.data_bytes <= link.DATA_LIMIT + 2000
    link.send(codec.encode(codec.KeepAlive(1, 0, 0)))
    out = link.take_output()
    assert isinstance(codec.decode(out[: codec.check_header(out, 0)[1]]), codec.KeepAlive)


def test_boundaries_keep_scoped_groups_inside_the_site(tmp_path: Path) -> None:
    net = Net(tmp_path)
    b = net.nodes["b"]
    b.config = replace(b.config, boundaries=(ipaddress.ip_network("239.192.0.0/14"),))
    net.frames("c", join("239.192.1.1", host="169.254.1.3"), join("239.1.1.1", host="169.254.1.3"))
    assert [g["group"] for g in net.nodes["a"].status(net.now)["groups"]] == ["239.1.1.1"]
    assert b.counters["ignored_boundary"] == 1


def test_fragments_arrive_in_any_order_and_reassembly_is_bounded(tmp_path: Path) -> None:
    net = Net(tmp_path, udp=True)
    net.frames("c", join("239.1.1.1", host="169.254.1.3"))
    a, b = net.nodes["a"], net.nodes["b"]
    a.tap_frames([datagram("239.1.1.1", payload=bytes(range(256)) * 20)], net.now)
    pieces = list(a.links["b"].datagrams)
    a.links["b"].datagrams.clear()
    assert len(pieces) == 4
    for piece in reversed(pieces):
        b.link_datagram(b.links["a"], piece, net.now)
    net.pump()
    (whole,) = net.data_out("c")
    assert whole[14 + 28 :] == bytes(range(256)) * 20
    # Pieces whose siblings never come are dropped after the timeout, and counted.
    for _ in range(100):
        a.tap_frames([datagram("239.1.1.1", payload=b"w" * 3000)], net.now)
        b.link_datagram(b.links["a"], a.links["b"].datagrams[0], net.now)
        a.links["b"].datagrams.clear()
    reassembly = b.links["a"].reassembly
    assert len(reassembly.partial) <= 64 and reassembly.drops["fragment_evicted"] == 36
    net.advance(3)
    assert reassembly.partial == {} and reassembly.drops["fragment_timeout"] == 64
