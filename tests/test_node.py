"""The node core on a virtual clock: nodes wired in memory, frames in, frames out."""

from __future__ import annotations

import ipaddress
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.igmp import IGMPv3_MR, IGMPv3_MR_Group
from scapy.layers.inet import IP, UDP, IPOption_Router_Alert
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether

from mcmw.config import load_tree
from mcmw.node import Node, checksum_after_ttl_decrement
from mcmw.status import format_status
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
        self,
        tmp_path: Path,
        bits: int = 24,
        ttl: str = "hop",
        udp: bool = False,
        key: str | None = None,
        overlay: str = "",
    ) -> None:
        path = tmp_path / "tree.yaml"
        secret = overlay  # more overlay keys, e.g. ", udp_max_message: 600"
        if key is not None:
            (tmp_path / "psk.key").write_text(key)
            secret += ", secret_file: psk.key"
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


@pytest.mark.parametrize("limit", [1400, 600])
@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "authenticated"])
def test_no_datagram_exceeds_udp_max_message_integrity_included(
    tmp_path: Path, limit: int, key: str | None
) -> None:
    net = Net(tmp_path, udp=True, key=key, overlay=f", udp_max_message: {limit}")
    net.frames("c", join("239.1.1.1", host="169.254.1.3"))
    a, a_link = net.nodes["a"], net.nodes["a"].links["b"]
    for size in [*range(limit - 120, limit + 40, 4), 1472, 8000]:
        payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
        a.tap_frames([datagram("239.1.1.1", payload=payload)], net.now)
        sizes = [len(d) for d in a_link.datagrams]
        assert max(sizes) <= limit, f"a {size}-byte payload left in datagrams of {sizes}"
        net.pump()
        (got,) = net.data_out("c")
        assert got[14 + 28 :] == payload


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
    stranger = PeerLink(
        codec.Open("a", 24, "modulo"), "b", True, 3, 10, net.now, keys={1: b"another-secret-of-16+"}
    )
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
    opener = PeerLink(
        codec.Open("a", 24, "modulo"), "b", True, 3, 10, net.now, keys={1: KEY.split()[1].encode()}
    )
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


# -- Opens that do not match, and what each side shows ------------------------------------

LINKS_ABC = "[[a, b], [b, c]]"


def lone_node(tmp_path: Path, name: str, sub: str, key: str | None = None, **changes: str) -> Node:
    """Node `name` of a tree file of its own (in `sub`), as another host would have it:
    TREE with `changes` (bits, ttl, links, mapping) and its own key file."""
    folder = tmp_path / sub
    folder.mkdir(exist_ok=True)
    fields = {"bits": "24", "ttl": "hop", "udp": "", "secret": "", "links": LINKS_ABC, "mapping": "modulo"}
    fields.update(changes)
    if key is not None:
        (folder / "psk.key").write_text(key)
        fields["secret"] = ", secret_file: psk.key"
    text = TREE.replace("links: [[a, b], [b, c]]", "links: {links}")
    text = text.replace("mapping: modulo", "mapping: {mapping}")
    (folder / "tree.yaml").write_text(text.format(**fields))
    node = Node(load_tree(folder / "tree.yaml"), name, 1000.0)
    node.start(1000.0)
    return node


def connect(dialer: Node, dialed: str, acceptor: Node, now: float = 1000.0) -> tuple[PeerLink, PeerLink]:
    """A TCP connection from `dialer` to `acceptor`, carried in memory until both ends are
    quiet; an end that closed hangs up, and the other sees the connection go."""
    d = dialer.new_link(dialed, now, address="10.0.0.2")
    a = acceptor.new_link(None, now, address="10.0.0.1")
    moved = True
    while moved:
        moved = False
        for link_s, dst, link_d in ((d, acceptor, a), (a, dialer, d)):
            if link_s.has_output and link_d.state != "closed":
                dst.link_data(link_d, link_s.take_output(), now)
                moved = True
            link_s.take_output()
    for node, link, other in ((dialer, d, a), (acceptor, a, d)):
        if other.state == "closed" and link.state != "closed":
            node.link_lost(link, "connection closed by peer", now)
    return d, a


def peer_entry(node: Node, name: str) -> dict[str, object]:
    return next(p for p in node.status(1000.0)["peers"] if p["name"] == name)


@pytest.mark.parametrize(
    "change, a_sees, b_sees",
    [
        (
            {"mapping": "hash"},
            "overlay hash/24 bits, expected modulo/24 bits",
            "overlay modulo/24 bits, expected hash/24 bits",
        ),
        ({"bits": "16"}, "overlay modulo/16 bits, expected modulo/24 bits", "expected modulo/16 bits"),
        ({"ttl": "link"}, "ttl mode link, expected hop", "ttl mode hop, expected link"),
        ({"version": "2"}, "protocol version 2, expected 1", "protocol version 1, expected 2"),
    ],
    ids=["mapping", "address_bits", "ttl", "version"],
)
@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "authenticated"])
def test_a_mismatched_open_is_refused_with_a_close_naming_the_reason_logged_and_shown_on_both_sides(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    change: dict[str, str],
    a_sees: str,
    b_sees: str,
    key: str | None,
) -> None:
    a = lone_node(tmp_path, "a", "host-a", key)
    change = dict(change)  # shared by the parametrized runs
    version = change.pop("version", None)
    b = lone_node(tmp_path, "b", "host-b", key, **change)
    if version is not None:
        b.local_open = replace(b.local_open, version=int(version))
    caplog.set_level("INFO", logger="mcmw.node")
    d, acc = connect(a, "b", b)
    assert d.state == acc.state == "closed" and not a.links and not b.links
    # Each end found the mismatch and sent Close code 3 with its reason; each heard the
    # other's (the one that came second finds its link closed already).
    assert (d.close_code, acc.close_code) == (codec.CLOSE_MISMATCH, codec.CLOSE_MISMATCH)
    assert d.close_reason == a_sees and b_sees in acc.close_reason
    for node, peer, seen in ((a, "b", a_sees), (b, "a", b_sees)):
        entry = peer_entry(node, peer)
        assert entry["state"] == "down" and seen in str(entry["last_error"]), entry
        status = node.status(1000.0)
        failed = next(iter(status["connection_errors"].values()))
        assert failed["node"] == peer and seen in failed["reason"] and failed["count"] == 1
        assert status["counters"]["connection_errors"] == 1
        assert status["counters"].get("dropped_auth", 0) == 0
    logged = [r.getMessage() for r in caplog.records]
    assert any("refused link from 'b'" in m and a_sees in m for m in logged), logged
    assert any("refused link from 'a'" in m and b_sees in m for m in logged), logged


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "authenticated"])
def test_a_dialer_the_acceptor_does_not_expect_hears_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, key: str | None
) -> None:
    """b's tree file has no link from a: b refuses a's Open; a, whose tree says a dials b,
    accepts b's Open, and must hear b's reason (authenticated, b's Close comes sealed with
    the pre-shared key as b never started a session) and show it."""
    a = lone_node(tmp_path, "a", "host-a", key)
    b = lone_node(tmp_path, "b", "host-b", key, links="[[a, c], [c, b]]")
    caplog.set_level("INFO", logger="mcmw.node")
    d, acc = connect(a, "b", b)
    why = "node 'a' is not a neighbour that dials 'b'"
    assert acc.close_reason == why
    assert d.state == "closed" and d.close_reason == f"peer closed: {why}"
    assert peer_entry(a, "b")["last_error"] == f"peer closed: {why}"
    assert a.status(1000.0)["counters"].get("dropped_auth", 0) == 0
    failed = b.status(1000.0)["connection_errors"]["10.0.0.1"]
    assert failed == {"node": "a", "role": "accept", "reason": why, "count": 1, "last_s_ago": 0.0}
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"refused link from 'a' at 10.0.0.1: {why}" in logged
    assert f"peer closed: {why}" in logged  # a's side of the story


def test_the_dialer_refuses_an_acceptor_with_another_name(tmp_path: Path) -> None:
    net = Net(tmp_path)
    a, c = net.nodes["a"], net.nodes["c"]
    d, acc = connect(a, "b", c)  # a dials b's address, but c answers
    assert d.close_reason == "node 'c' answered, expected 'b'"
    assert "peer closed" in acc.close_reason or "not a neighbour" in acc.close_reason
    assert a.status(net.now)["connection_errors"]["10.0.0.2"]["reason"] == d.close_reason
    assert a.links["b"].up  # the working link to the real b is untouched


def test_connections_that_fail_before_up_are_kept_by_address_bounded(tmp_path: Path) -> None:
    net = Net(tmp_path, key=KEY)
    b = net.nodes["b"]

    def attempt(address: str, data: bytes) -> PeerLink:
        link = b.new_link(None, net.now, address=address)
        b.link_data(link, data, net.now)
        assert link.state == "closed"
        return link

    stranger = PeerLink(
        codec.Open("mallory", 24, "modulo"), "b", True, 3, 10, net.now, keys={1: b"another-secret-of-16+"}
    )
    sealed_by_stranger = stranger.take_output()
    for _ in range(3):
        attempt("192.0.2.66", sealed_by_stranger)
    attempt("192.0.2.67", b"\x00" * 64)  # garbage before any Open
    status = b.status(net.now)
    assert status["connection_errors"]["192.0.2.66"] == {
        "node": None,  # the Open failed its Integrity check: its name is not to be believed
        "role": "accept",
        "reason": "integrity: bad HMAC on open",
        "count": 3,
        "last_s_ago": 0.0,
    }
    assert "COPS version 0" in status["connection_errors"]["192.0.2.67"]["reason"]
    assert list(status["connection_errors"]) == ["192.0.2.67", "192.0.2.66"]  # newest first
    assert status["counters"]["connection_errors"] == 4
    assert all(p["state"] == "up" for p in status["peers"])  # nothing else disturbed
    # Anyone can make connections fail: the status keeps the 64 latest addresses only.
    for i in range(100):
        attempt(f"198.51.100.{i}", b"\x00" * 64)
    errors = b.status(net.now)["connection_errors"]
    assert len(errors) == 64 and next(iter(errors)) == "198.51.100.99" and "192.0.2.66" not in errors
    assert b.status(net.now)["counters"]["connection_errors"] == 104
    # A connection that closes twice (node, then transport) counts once.
    link = attempt("192.0.2.68", b"\x00" * 64)
    b.link_lost(link, "connection closed by peer", net.now)
    assert b.status(net.now)["connection_errors"]["192.0.2.68"]["count"] == 1


# -- keys ------------------------------------------------------------------------------------

OLD, NEW = "1 the-old-key-0123456789", "2 the-new-key-0123456789"


@pytest.mark.parametrize(
    "a_keys, b_keys, up",
    [
        ([OLD], [OLD], True),
        ([OLD, NEW], [OLD], True),  # a added the new key second: it still signs with the old
        ([NEW, OLD], [OLD, NEW], True),  # a signs with the new key, b still with the old
        ([NEW], [NEW, OLD], True),
        ([NEW], [OLD], False),  # a node that missed the roll cannot open a link
    ],
)
def test_keys_roll_with_two_key_ids_accepted_during_the_change(
    tmp_path: Path, a_keys: list[str], b_keys: list[str], up: bool
) -> None:
    a = lone_node(tmp_path, "a", "host-a", "\n".join(a_keys) + "\n")
    b = lone_node(tmp_path, "b", "host-b", "\n".join(b_keys) + "\n")
    d, acc = connect(a, "b", b)
    assert (d.up, acc.up) == (up, up)
    if up:  # both ends derive the session from the key a (the dialer) signed its Open with
        assert d.session_key_id == acc.session_key_id == int(a_keys[0].split()[0])
        assert peer_entry(b, "a")["key_id"] == d.session_key_id
    else:
        assert "unknown key id" in b.status(1000.0)["connection_errors"]["10.0.0.1"]["reason"]


def test_a_reload_rolls_the_keys_without_touching_up_links(tmp_path: Path) -> None:
    a = lone_node(tmp_path, "a", "host-a", OLD + "\n")
    b = lone_node(tmp_path, "b", "host-b", OLD + "\n")
    first, _ = connect(a, "b", b)
    assert first.up
    for node, host in ((a, "host-a"), (b, "host-b")):
        (tmp_path / host / "psk.key").write_text(f"{NEW}\n")
        node.reconfigure(load_tree(tmp_path / host / "tree.yaml"), 1001.0)
        assert list(node.keys or {}) == [2]
    assert first.up and a.links["b"] is first  # its session key stands
    second, _ = connect(a, "b", b, now=1002.0)  # e.g. after a restart of the path
    assert second.up and second.auth is not None and second.auth.signing_id == 2
    tree = load_tree(tmp_path / "host-b" / "tree.yaml")
    (tmp_path / "host-b" / "psk.key").write_text("1 short\n")  # spoilt after the file was read
    with pytest.raises(ValueError, match="shorter than 16"):
        b.reconfigure(tree, 1003.0)
    assert list(b.keys or {}) == [2]  # a refused reload changes nothing


# -- IPv6, sequence accounting, RTT, scope, reassembly, reload, status shape ----------------


def mld_join(group: str, host: str = "fe80::3", sources: tuple[str, ...] = ()) -> bytes:
    """An MLDv2 report: EXCLUDE {} (any source), or INCLUDE `sources` when given."""
    from scapy.layers.inet6 import ICMPv6MLDMultAddrRec, ICMPv6MLReport2, IPv6ExtHdrHopByHop, RouterAlert

    record = ICMPv6MLDMultAddrRec(rtype=1 if sources else 4, dst=group, sources=list(sources))
    return bytes(
        Ether(src="02:00:00:00:00:03", dst="33:33:00:00:00:16")
        / IPv6(src=host, dst="ff02::16", hlim=1)
        / IPv6ExtHdrHopByHop(options=[RouterAlert()])
        / ICMPv6MLReport2(records=[record])
    )


def datagram6(group: str, hlim: int = 16, src: str = "fe80::1") -> bytes:
    return bytes(
        Ether(dst="33:33:00:00:00:01", src="02:00:00:00:00:01")
        / IPv6(src=src, dst=group, hlim=hlim)
        / UDP(sport=4000, dport=5004)
        / (b"s" * 64)
    )


def data6_out(net: Net, name: str) -> list[bytes]:
    out = [f for f in net.tap[name] if f[12:14] == b"\x86\xdd" and f[20] == 17]
    net.tap[name].clear()
    return out


def test_ipv6_hop_limit_is_decremented_per_hop_and_never_reaches_zero(tmp_path: Path) -> None:
    net = Net(tmp_path)
    net.frames("c", mld_join("ff0e::1:1"))
    net.frames("b", mld_join("ff0e::1:1", host="fe80::2"))
    assert [g["group"] for g in net.nodes["a"].status(net.now)["groups"]] == ["ff0e::1:1"]
    net.frames("a", datagram6("ff0e::1:1", hlim=16))
    (got,) = data6_out(net, "c")
    assert IPv6(got[14:]).hlim == 14 and bytes(IPv6(got[14:]).payload)[8:] == b"s" * 64
    assert IPv6(data6_out(net, "b")[0][14:]).hlim == 15
    net.frames("a", datagram6("ff0e::1:1", hlim=2))  # b gets it with 1 and may not pass it on
    assert len(data6_out(net, "b")) == 1 and data6_out(net, "c") == []
    assert net.nodes["b"].counters["dropped_ttl"] == 1
    net.frames("a", datagram6("ff0e::1:1", hlim=1))
    assert data6_out(net, "b") == [] and net.nodes["a"].counters["dropped_ttl"] == 1


@pytest.mark.parametrize("group", ["ff02::1:3", "ff01::5", "ff12::9", "224.0.0.251", "224.0.0.100"])
def test_link_local_groups_of_both_families_are_never_carried(tmp_path: Path, group: str) -> None:
    net = Net(tmp_path)
    join_frame = mld_join(group) if ":" in group else join(group, host="169.254.1.3")
    net.frames("c", join_frame)
    for node in net.nodes.values():
        assert node.status(net.now)["groups"] == [] and node.routes == {}
    net.frames("a", datagram6(group) if ":" in group else datagram(group))
    a = net.nodes["a"]
    assert a.forwarded == 0 and all(link.tx_packets == 0 for link in a.links.values())


def test_reordered_and_lost_datagrams_are_counted_per_link(tmp_path: Path) -> None:
    net = Net(tmp_path, udp=True)
    net.frames("c", join("239.1.1.1", host="169.254.1.3"))
    a, b = net.nodes["a"], net.nodes["b"]
    a_link, b_link = a.links["b"], b.links["a"]
    a.tap_frames([datagram("239.1.1.1", payload=bytes([i]) * 20) for i in range(6)], net.now)
    d = list(a_link.datagrams)
    a_link.datagrams.clear()
    for index in (0, 2, 1, 4, 5):  # 2 before 1; 3 never comes
        b.link_datagram(b_link, d[index], net.now)
    net.pump()
    assert len(net.data_out("c")) == 5
    peer = next(p for p in b.status(net.now)["peers"] if p["name"] == "a")
    assert (peer["rx_packets"], peer["rx_lost"], peer["rx_reordered"]) == (5, 1, 1)
    c_peer = next(p for p in net.nodes["c"].status(net.now)["peers"] if p["name"] == "b")
    assert (c_peer["rx_lost"], c_peer["rx_reordered"]) == (0, 0)  # per link: b-c saw neither


def test_data_takes_the_stream_when_only_one_end_has_a_udp_port(tmp_path: Path) -> None:
    a = lone_node(tmp_path, "a", "host-a", udp=", udp: 7001")
    b = lone_node(tmp_path, "b", "host-b")
    d, acc = connect(a, "b", b)
    assert d.up and acc.up and (d.transport, acc.transport) == ("tcp", "tcp")
    b.tap_frames([join("239.1.1.1")], 1000.0)
    a.link_data(d, acc.take_output(), 1000.0)
    a.tap_frames([datagram("239.1.1.1")], 1000.0)
    assert d.datagrams == [] and d.tx_packets == 1
    b.link_data(acc, d.take_output(), 1000.0)
    assert b.delivered == 1


def test_keepalives_measure_the_round_trip_less_the_time_the_peer_held_it(tmp_path: Path) -> None:
    net = Net(tmp_path)
    a, b = net.nodes["a"], net.nodes["b"]
    a_link, b_link = a.links["b"], b.links["a"]
    a_link.take_output(), b_link.take_output()
    t = net.now
    a_link.keepalive(t)
    b.link_data(b_link, a_link.take_output(), t + 0.020)  # 20 ms one way
    b_link.keepalive(t + 0.520)  # b holds the timestamp 500 ms (its own keep-alive timer)
    a.link_data(a_link, b_link.take_output(), t + 0.550)  # 30 ms back
    assert a_link.rtt_ms == pytest.approx(50.0, abs=0.01)
    assert next(p for p in a.status(t)["peers"] if p["name"] == "b")["rtt_ms"] == pytest.approx(50.0)


def test_a_boundary_keeps_scoped_groups_off_every_link_of_its_node(tmp_path: Path) -> None:
    net = Net(tmp_path)
    b = net.nodes["b"]
    b.config = replace(b.config, boundaries=(ipaddress.ip_network("239.192.0.0/14"),))
    scoped = "239.192.1.1"
    net.frames("b", join(scoped))  # b's own segment: kept inside b's site
    net.frames("a", join(scoped, host="169.254.1.1"))  # from a's side: b does not pass it on
    net.frames("c", join(scoped, host="169.254.1.3"))
    # b lists its own member, marked as kept inside the site; nobody asks b for it.
    (kept,) = b.status(net.now)["groups"]
    assert (kept["group"], kept["boundary"], kept["peers"]) == (scoped, True, [])
    assert kept["local"]["mode"] == "exclude" and kept["local"]["compat_version"] == 3
    assert f"{scoped}" in format_status(b.status(net.now)) and "(boundary: not carried)" in format_status(
        b.status(net.now)
    )
    assert_spec_status(b.status(net.now), "b")
    for name in ("a", "c"):  # each still serves its own segment, but hears nothing from b
        assert [(g["group"], g["peers"]) for g in net.nodes[name].status(net.now)["groups"]] == [(scoped, [])]
    net.frames("a", datagram(scoped))
    net.frames("c", datagram(scoped, src="169.254.1.3"))
    assert net.data_out("b") == [] and net.data_out("c") == [] and net.data_out("a") == []
    assert net.nodes["a"].forwarded == net.nodes["c"].forwarded == 0
    assert b.counters["ignored_boundary"] == 2


def test_reassembly_is_bounded_in_count_bytes_and_time() -> None:
    from overlay.reassembly import MAX_BYTES, MAX_PACKETS, TIMEOUT, Reassembler

    r = Reassembler()
    big = 60_000  # 17 of these fit 1 MiB
    for packet_id in range(30):
        assert r.add(packet_id, 0, big, b"x" * 1000, now=0.0) is None
        assert r.bytes <= MAX_BYTES and len(r.partial) <= MAX_PACKETS
    assert len(r.partial) == MAX_BYTES // big and r.drops["fragment_evicted"] == 30 - MAX_BYTES // big
    assert list(r.partial)[0] == 30 - MAX_BYTES // big  # the oldest went first
    r.expire(TIMEOUT - 0.01)
    assert r.partial and not r.drops["fragment_timeout"]
    r.expire(TIMEOUT)
    assert r.partial == {} and r.bytes == 0 and r.drops["fragment_timeout"] == MAX_BYTES // big


def test_reassembly_refuses_pieces_that_do_not_tile_the_packet() -> None:
    from overlay.reassembly import Reassembler

    r = Reassembler()
    assert r.add(1, 8, 24, b"b" * 16, 0.0) is None
    assert r.add(1, 0, 24, b"a" * 8, 0.0) == b"a" * 8 + b"b" * 16  # any order
    # 0-16 and 8-24 and 24-32: 40 bytes for 32, a hole hidden behind the overlap
    assert r.add(2, 0, 32, b"x" * 16, 0.0) is None
    assert r.add(2, 16, 32, b"y" * 8, 0.0) is None
    assert r.add(2, 8, 32, b"z" * 8, 0.0) is None  # 32 bytes, but 8-16 twice and 24-32 never
    assert r.drops["fragment_invalid"] == 1 and 2 not in r.partial
    assert r.add(3, 0, 16, b"q" * 8, 0.0) is None
    assert r.add(3, 0, 16, b"q" * 8, 0.0) is None and r.drops["fragment_duplicate"] == 1
    assert r.add(3, 8, 20, b"q" * 8, 0.0) is None  # another total for the same packet
    assert r.add(4, 10, 16, b"q" * 8, 0.0) is None  # past the end
    assert r.add(5, 0, 70_000, b"q", 0.0) is None  # larger than any IP packet
    assert r.drops["fragment_invalid"] == 4


def test_a_reload_adds_and_removes_links_and_nothing_else(tmp_path: Path) -> None:
    net = Net(tmp_path)
    b, c = net.nodes["b"], net.nodes["c"]
    net.frames("c", join("239.1.1.1", host="169.254.1.3"))
    net.frames("a", join("239.2.2.2", host="169.254.1.1"))
    a_link = b.links["a"]
    # b-c removed from the tree (c then hangs off a): b closes its link to c with a reason
    path = tmp_path / "tree.yaml"
    path.write_text(path.read_text().replace("links: [[a, b], [b, c]]", "links: [[a, b], [a, c]]"))
    tree = load_tree(path)
    assert b.reconfigure(tree, net.now) == []
    net.pump()
    assert "c" not in b.links and b.links["a"] is a_link  # the other link untouched
    assert "c" not in b.neighbours
    assert "link removed from the tree" in c.status(net.now)["peers"][0]["last_error"]
    assert [g["group"] for g in net.nodes["a"].status(net.now)["groups"]] == ["239.2.2.2"]  # c's withdrawn
    # a and c reloaded too: c dials a now
    net.nodes["a"].reconfigure(tree, net.now)
    assert net.nodes["a"].neighbours == {"b": True, "c": True}
    c.reconfigure(tree, net.now)
    net.connect("a", "c")
    assert net.nodes["a"].links["c"].up
    net.frames("a", datagram("239.1.1.1"))
    assert len(net.data_out("c")) == 1
    with pytest.raises(ValueError, match="overlay settings changed"):
        b.reconfigure(replace(tree, overlay=replace(tree.overlay, mapping="hash")), net.now)


def test_a_reload_also_closes_a_connection_still_opening_to_a_removed_neighbour(tmp_path: Path) -> None:
    """b has just dialed c again (its Open on the wire) when a reload removes b-c: that
    connection is closed too, not left to come up as a link the tree no longer has."""
    net = Net(tmp_path)
    b, c = net.nodes["b"], net.nodes["c"]
    redial = b.new_link("c", net.now, address="10.0.0.c")
    net.wires.append((b, redial, c, c.new_link(None, net.now, address="10.0.0.b")))
    path = tmp_path / "tree.yaml"
    path.write_text(path.read_text().replace("links: [[a, b], [b, c]]", "links: [[a, b], [a, c]]"))
    b.reconfigure(load_tree(path), net.now)
    net.pump()
    assert redial.state == "closed" and redial not in b.pending
    assert "c" not in b.links and "b" not in c.links
    assert redial.close_reason == "link removed from the tree"


def test_status_has_the_keys_and_types_spec_md_promises(tmp_path: Path) -> None:
    net = Net(tmp_path, udp=True)
    net.frames("c", join("239.1.1.1", host="169.254.1.3"))
    net.frames("a", datagram("239.1.1.1"))
    net.advance(4)
    status = net.nodes["b"].status(net.now)
    assert_spec_status(status, "b")
    group = next(g for g in net.nodes["c"].status(net.now)["groups"] if g["group"] == "239.1.1.1")
    assert group == {
        **group,
        "overlay_address": 65793,
        "local": {**group["local"], "mode": "exclude", "sources": [], "compat_version": 3},
        "peers": [],
    }
    a_view = net.nodes["a"].status(net.now)
    assert [(g["group"], g["local"], g["peers"]) for g in a_view["groups"]] == [("239.1.1.1", None, ["b"])]
    assert {p["name"]: p["transport"] for p in a_view["peers"]} == {"b": "udp"}
    assert a_view["peers"][0]["tx_packets"] == 1 and status["counters"]["forwarded"] == 1


def assert_spec_status(status: dict[str, object], node: str) -> None:
    """The keys of SPEC.md's status example, with their types (more keys are allowed)."""
    number = (int, float)
    assert status["node"] == node and isinstance(status["uptime_s"], number)
    tap = status["tap"]
    assert isinstance(tap, dict) and isinstance(tap["name"], str)
    assert isinstance(tap["rx_frames"], int) and isinstance(tap["tx_frames"], int)
    assert isinstance(status["groups"], list)
    for group in status["groups"]:
        assert str(ipaddress.ip_address(group["group"])) == group["group"]  # canonical text
        assert isinstance(group["overlay_address"], int)
        assert isinstance(group["peers"], list) and group["peers"] == sorted(group["peers"])
        local = group.get("local")
        if local is not None:
            assert local["mode"] in ("include", "exclude") and isinstance(local["sources"], list)
            assert all(str(ipaddress.ip_address(s)) == s for s in local["sources"])
            assert local["compat_version"] in (1, 2, 3)
    assert isinstance(status["peers"], list) and status["peers"]
    for peer in status["peers"]:
        assert isinstance(peer["name"], str) and peer["state"] in ("up", "down")
        assert peer["transport"] in ("tcp", "udp")
        assert peer["rtt_ms"] is None or isinstance(peer["rtt_ms"], number)
        assert isinstance(peer["tx_packets"], int) and isinstance(peer["rx_packets"], int)
    counters = status["counters"]
    assert isinstance(counters, dict)
    for key in ("forwarded", "delivered", "dropped_ttl", "dropped_malformed"):
        assert isinstance(counters[key], int), key


def test_a_neighbour_asking_for_too_much_is_bounded_and_counted(tmp_path: Path) -> None:
    net = Net(tmp_path)
    a, b = net.nodes["a"], net.nodes["b"]
    b.max_peer_groups, b.max_peer_sources = 50, 8
    routes = [codec.Route(0, bytes([239, 9, i // 256, i % 256])) for i in range(80)]
    many = codec.Route(0, bytes([239, 8, 0, 1]), "include", tuple(bytes([10, 0, 0, i]) for i in range(9)))
    a_link = a.links["b"]
    for message in codec.encode_routes(True, [*routes, many]):
        a_link.send(message)
    net.pump()
    assert len(b.interest.requested["a"]) == 50
    assert b.counters["ignored_route_limit"] == 31
    assert b.links["a"].up and a_link.up  # ignored, not a reason to drop a neighbour
    # Asks it already holds may still change, and withdrawals always apply.
    a_link.send(codec.encode(codec.AddRoute((replace(routes[0], mode="include", sources=(bytes(4),)),))))
    a_link.send(codec.encode(codec.RemoveRoute(tuple(routes[1:11]))))
    net.pump()
    assert len(b.interest.requested["a"]) == 40 and b.counters["ignored_route_limit"] == 31


def test_a_union_of_sources_too_big_for_one_route_is_asked_as_every_source(tmp_path: Path) -> None:
    """c asks b for 4094 sources of an IPv6 group (as many as one route object lists) and
    b's own segment for two more: b asks a for every source, and says so."""
    net = Net(tmp_path)
    group = "ff0e::1:2"
    many = tuple(ipaddress.IPv6Address((0x20010DB8 << 96) + i).packed for i in range(4094))
    route = codec.Route(0, ipaddress.IPv6Address(group).packed, "include", many)
    net.nodes["c"].links["b"].send(codec.encode(codec.AddRoute((route,))))
    net.pump()
    wanted = net.nodes["a"].interest.requested["b"][route.group]
    assert (wanted.mode, len(wanted.sources)) == ("include", 4094)
    net.frames("b", mld_join(group, host="fe80::2", sources=("2001:db8:1::1", "2001:db8:1::2")))
    wanted = net.nodes["a"].interest.requested["b"][route.group]
    assert (wanted.mode, wanted.sources) == ("exclude", frozenset())
    assert net.nodes["b"].counters["widened_routes"] == 1
    assert net.nodes["a"].links["b"].up and net.nodes["b"].links["a"].up


def test_sequence_numbers_wrap_without_counting_loss_or_reordering(tmp_path: Path) -> None:
    net = Net(tmp_path, udp=True)
    net.frames("c", join("239.1.1.1", host="169.254.1.3"))
    a, b = net.nodes["a"], net.nodes["b"]
    a.links["b"].seq = 2**32 - 4  # as after four billion messages
    for _ in range(6):  # seq 2^32 - 3 ... 2^32 - 1, then 0, 1, 2
        net.frames("a", datagram("239.1.1.1"))
    b_link = b.links["a"]
    assert (b_link.rx_lost, b_link.rx_reordered) == (0, 0)
    a.tap_frames([datagram("239.1.1.1")], net.now)
    a.links["b"].datagrams.clear()  # seq 3 lost
    for _ in range(2):
        net.frames("a", datagram("239.1.1.1"))
    assert (b_link.rx_lost, b_link.rx_reordered) == (1, 0)
    assert len(net.data_out("c")) == 8


@pytest.mark.parametrize("udp", [False, True], ids=["tcp", "udp"])
def test_an_authenticated_link_renews_its_session_before_sequence_numbers_wrap(
    tmp_path: Path, udp: bool
) -> None:
    """After a wrap the replay checks would refuse everything (and a recorded message would
    be new again): the link closes first, with the reason, and a new connection has a new
    session key and sequence numbers from 1."""
    from overlay.link import SEQ_LIMIT

    net = Net(tmp_path, udp=udp, key=KEY)
    net.frames("c", join("239.1.1.1", host="169.254.1.3"))
    a, b = net.nodes["a"], net.nodes["b"]
    link = a.links["b"]
    assert link.auth is not None
    if udp:
        link.seq = SEQ_LIMIT - 2
    else:
        link.auth.tx_seq = SEQ_LIMIT - 2
    net.frames("a", datagram("239.1.1.1"))
    assert len(net.data_out("c")) == 1 and link.up
    net.frames("a", datagram("239.1.1.1"))
    net.advance(0.25)
    net.data_out("c")
    assert link.state == "closed" and "b" not in a.links and "a" not in b.links
    assert "reconnect for a new session key" in link.close_reason
    assert "a" not in b.links and "reconnect for a new session key" in peer_entry(b, "a")["last_error"]
    net.connect("a", "b")  # the dialer redials
    assert a.links["b"].up and a.links["b"].seq == 0 and a.links["b"].auth.tx_seq < 10
    net.frames("c", join("239.1.1.1", host="169.254.1.3"))
    net.frames("a", datagram("239.1.1.1"))
    assert len(net.data_out("c")) == 1


def numbered(group: str, number: int, src: str = "169.254.1.1") -> bytes:
    return datagram(group, src=src, payload=number.to_bytes(4, "big") * 25)


def numbers(frames: list[bytes]) -> list[int]:
    return [int.from_bytes(f[-100:-96], "big") for f in frames]


def test_a_read_of_two_groups_interleaved_is_carried_once_and_in_order(tmp_path: Path) -> None:
    """One TAP read with frames of two groups interleaved and a malformed frame among
    them (the node carries such a read in runs of one group): every packet crosses
    once, each group's in order."""
    net = Net(tmp_path)
    net.frames("c", join("239.1.1.1", host="169.254.1.3"))
    net.frames("c", join("239.1.1.2", host="169.254.1.3"))
    g1 = [numbered("239.1.1.1", n) for n in range(6)]
    g2 = [numbered("239.1.1.2", 100 + n) for n in range(6)]
    bad = bytearray(g1[0])
    bad[14] = 0x43
    read = [g1[0], g1[1], g2[0], g2[1], g2[2], bytes(bad), g1[2], g2[3], g1[3], g1[4], g2[4], g2[5], g1[5]]
    net.frames("a", *read)
    got = numbers(net.data_out("c"))
    assert [n for n in got if n < 100] == list(range(6))
    assert [n for n in got if n >= 100] == list(range(100, 106))
    assert len(got) == 12
    assert net.nodes["a"].counters["dropped_malformed"] == 1
    assert net.nodes["a"].links["b"].tx_packets == 12


def test_datagrams_of_one_receive_carry_around_a_bad_one(tmp_path: Path) -> None:
    net = Net(tmp_path, udp=True)
    net.frames("c", join("239.1.1.1", host="169.254.1.3"))
    a, b = net.nodes["a"], net.nodes["b"]
    a.tap_frames([numbered("239.1.1.1", n) for n in range(5)], net.now)
    datagrams = list(a.links["b"].datagrams)
    a.links["b"].datagrams.clear()
    assert len(datagrams) == 5
    broken = memoryview(bytearray(datagrams[2]))[:-3]  # cut short: its length says more
    receive = [memoryview(d) for d in datagrams[:2]] + [broken] + [memoryview(d) for d in datagrams[3:]]
    b.link_datagrams(b.links["a"], receive, net.now)
    net.pump()
    assert numbers(net.data_out("c")) == [0, 1, 3, 4]
    assert b.counters["dropped_malformed"] == 1
    stream_bytes = b.links["a"].rx_bytes - sum(len(d) for d in receive)
    assert 0 < stream_bytes < 1000  # the Open exchange and keep-alives; the datagrams counted too
    assert b.links["a"].rx_lost == 1  # the sequence number it carried never arrived


def test_data_before_a_close_in_the_same_read_is_carried_and_none_after_it(tmp_path: Path) -> None:
    net = Net(tmp_path)
    net.frames("c", join("239.1.1.1", host="169.254.1.3"))
    a, b = net.nodes["a"], net.nodes["b"]
    a.tap_frames([numbered("239.1.1.1", 0), numbered("239.1.1.1", 1)], net.now)
    before = a.links["b"].take_output()
    a.tap_frames([numbered("239.1.1.1", 2)], net.now)
    after = a.links["b"].take_output()
    close = codec.encode(codec.Close(codec.CLOSE_BAD_MESSAGE, "going away"))
    link = b.links["a"]
    b.link_data(link, before + close + after, net.now)
    assert link.state == "closed" and "a" not in b.links
    net.pump()
    assert numbers(net.data_out("c")) == [0, 1]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=3000), min_size=1, max_size=40))
def test_a_stream_cut_anywhere_arrives_whole(cuts: list[int]) -> None:
    """Reads end anywhere in a message (in its header too): every packet still crosses
    once and in order, whatever the cuts."""
    with tempfile.TemporaryDirectory() as tmp:
        net = Net(Path(tmp))
        net.frames("c", join("239.1.1.1", host="169.254.1.3"))
        a, b = net.nodes["a"], net.nodes["b"]
        a.tap_frames([numbered("239.1.1.1", n) for n in range(20)], net.now)
        a.links["b"].ctrl.append(codec.encode(codec.KeepAlive(1, 0)))  # a control message too
        a.tap_frames([numbered("239.1.1.1", n) for n in range(20, 30)], net.now)
        stream, position = a.links["b"].take_output(), 0
        for cut in cuts + [len(stream)]:
            b.link_data(b.links["a"], memoryview(stream)[position : position + cut], net.now)
            position += cut
            if position >= len(stream):
                break
        net.pump()
        assert numbers(net.data_out("c")) == list(range(30))
        assert b.links["a"].state == "up" and not b.links["a"].rx
