"""A 7-site tree in network namespaces: every receiver gets every packet exactly once, and no
link carries a group or a source that nobody behind it wants.

    r            root
    ├── c1       middle
    │   ├── l1   leaf
    │   └── l2   leaf
    └── c2       middle
        ├── l3   leaf
        └── l4   leaf

Each expectation (route state of every node, IP-Data messages on every directed link,
packets delivered into every TAP) comes from the analytic model in tests/sites.py.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from mcmw.lab import Lab, wait_for
from tests.netlab import require_privileged
from tests.sites import (
    Sites,
    Stream,
    Want,
    expected_delivered,
    expected_groups,
    expected_link_packets,
    make_sites,
    report,
)

NODES = ["r", "c1", "c2", "l1", "l2", "l3", "l4"]
LINKS = [("r", "c1"), ("r", "c2"), ("c1", "l1"), ("c1", "l2"), ("c2", "l3"), ("c2", "l4")]
FAST_LINKS = {"keepalive_interval": "1s", "dead_interval": "3s"}
# Streams of different lengths, every subset summing differently: a link's IP-Data count
# then tells exactly which streams crossed it.
N1, N2, N3 = 400, 300, 200
RATE = 1000.0

Counters = dict[tuple[str, str], int]


@pytest.fixture(scope="module")
def tree() -> Iterator[Sites]:
    require_privileged()
    with Lab() as lab:
        sites = make_sites(lab, NODES, LINKS, overlay=FAST_LINKS)
        sites.wait_peers_up()
        yield sites


def wait_route_state(sites: Sites, wants: list[Want], timeout: float = 10) -> None:
    """Every node's state for the wanted groups equals the model's; assert (with the diff)
    if it does not within `timeout`."""
    groups = {w.group for w in wants}
    links = sites.doc["links"]

    def actual() -> dict[str, object]:
        return {
            node: {g: v for g, v in sites.route_state(node)["groups"].items() if g in groups}
            for node in sites.ns
        }

    expected = {node: expected_groups(links, node, wants) for node in sites.ns}
    try:
        wait_for(lambda: actual() == expected, timeout, "the route state of every node")
    except TimeoutError:
        assert actual() == expected, "route state (local filter, peers) differs from the model"


def link_counters(sites: Sites) -> tuple[Counters, Counters]:
    """IP-Data per directed link (u, v): as counted by u (tx) and by v (rx)."""
    tx: Counters = {}
    rx: Counters = {}
    for node in sites.ns:
        for peer in sites.status(node)["peers"]:
            tx[(node, peer["name"])] = peer["tx_packets"]
            rx[(peer["name"], node)] = peer["rx_packets"]
    return tx, rx


def delivered(sites: Sites) -> dict[str, int]:
    return {node: sites.status(node)["counters"].get("delivered", 0) for node in sites.ns}


def receive_count(want: Want, streams: list[Stream]) -> int:
    return sum(
        s.count for s in streams if s.group == want.group and want.admits(s.source) and s.node != want.node
    )


def run_streams(sites: Sites, wants: list[Want], streams: list[Stream]) -> Counters:
    """Receivers for `wants`, the route state converged, `streams` sent at once: check that
    every receiver got exactly what its filter admits, once each; that every TAP got what
    the model says; return the IP-Data each directed link carried meanwhile."""
    receivers: dict[Want, subprocess.Popen[str]] = {}
    for want in wants:
        options = {"include": want.sources} if want.mode == "include" else {"exclude": want.sources}
        receivers[want] = sites.source_receiver(
            want.node, want.group, idle=5, count=receive_count(want, streams), **options
        )
    wait_route_state(sites, wants)
    tx_before, rx_before = link_counters(sites)
    delivered_before = delivered(sites)

    senders = [sites.sender(s.node, s.group, s.count, RATE) for s in streams]
    for sender in senders:
        assert sender.wait(timeout=30) == 0

    for want, proc in receivers.items():
        got = report(proc)
        assert got["corrupt"] == 0
        expected = {
            s.source: list(range(s.count))
            for s in streams
            if s.group == want.group and want.admits(s.source) and s.node != want.node
        }
        by_source = {source: sorted(seqs) for source, seqs in got["by_source"].items()}
        assert by_source == expected, (
            f"receiver {want}: every admitted packet exactly once, nothing else "
            f"(got {{source: count}} = { {s: len(q) for s, q in got['by_source'].items()} })"
        )

    def carried() -> tuple[Counters, Counters]:
        tx, rx = link_counters(sites)
        return (
            {k: v - tx_before[k] for k, v in tx.items()},
            {k: v - rx_before[k] for k, v in rx.items()},
        )

    # Receivers may finish before the last packets reach the counters of a far link.
    wait_for(lambda: carried()[0] == carried()[1], 5, "every link's rx to match the other end's tx")
    tx, rx = carried()
    assert tx == rx, "IP-Data lost on a link"
    expected_links = expected_link_packets(sites.doc["links"], wants, streams)
    assert tx == expected_links, "a link carried a group or source nobody behind it wants (or missed one)"

    after = delivered(sites)
    got_delivered = {node: after[node] - delivered_before[node] for node in sites.ns}
    want_delivered = {node: expected_delivered(wants, streams).get(node, 0) for node in sites.ns}
    assert got_delivered == want_delivered, "packets written into each TAP"
    return tx


def test_any_source_receivers_in_several_leaves_get_senders_at_root_and_leaf_once(tree: Sites) -> None:
    g1, g2 = "239.1.1.1", "239.2.2.2"
    root, leaf = tree.tap_address("r"), tree.tap_address("l2")
    wants = [Want("l1", g1), Want("l3", g1), Want("l4", g2)]
    streams = [
        Stream("r", root, g1, N1),
        Stream("l2", leaf, g1, N2),
        Stream("r", root, g2, N3),
    ]
    carried = run_streams(tree, wants, streams)

    # Spelled out for a reader (the model already checked every link):
    assert carried[("r", "c1")] == N1, "r -> c1: g1 from r for l1; g2 is not wanted under c1"
    assert carried[("c1", "r")] == N2, "c1 -> r: g1 from l2, for l3"
    assert carried[("r", "c2")] == N1 + N2 + N3, "r -> c2: g1 from r and l2 for l3, g2 for l4"
    assert carried[("c2", "l3")] == N1 + N2, "c2 -> l3: g1 only"
    assert carried[("c2", "l4")] == N3, "c2 -> l4: g2 only"
    assert carried[("c1", "l1")] == N1 + N2, "c1 -> l1: g1 from r and from its sibling l2"
    assert carried[("c1", "l2")] == 0, "l2 wants nothing; its own packets never come back"
    assert carried[("c2", "r")] == 0 and carried[("l1", "c1")] == 0


def test_source_specific_include_and_exclude_pull_only_their_sources(tree: Sites) -> None:
    group = "239.3.3.3"
    s1, s2, s3 = tree.tap_address("r"), tree.tap_address("l2"), tree.tap_address("c2")
    wants = [
        Want("l1", group, "include", (s1,)),  # S1 only
        Want("l3", group, "exclude", (s2,)),  # anything but S2: S1 and S3
        Want("l4", group, "include", (s2,)),  # S2 only
    ]
    streams = [
        Stream("r", s1, group, N1),
        Stream("l2", s2, group, N2),
        Stream("c2", s3, group, N3),
    ]
    carried = run_streams(tree, wants, streams)

    # The route state (checked against the model before sending) showed l1's segment as
    # INCLUDE {S1}, l3's as EXCLUDE {S2}, l4's as INCLUDE {S2}. A link towards a site that
    # only wants S1 carries S1 only; towards S2's only receiver, S2 only; S3 (at c2) goes
    # down to l3 and nowhere else.
    assert carried[("c1", "l1")] == N1, "c1 -> l1 (INCLUDE S1) carries S1 only"
    assert carried[("r", "c1")] == N1, "r -> c1 carries S1 only (l2's S2 comes from below)"
    assert carried[("c1", "r")] == N2, "c1 -> r carries S2, for l4"
    assert carried[("r", "c2")] == N1 + N2, "r -> c2 carries S1 (for l3) and S2 (for l4)"
    assert carried[("c2", "l4")] == N2, "c2 -> l4 (INCLUDE S2) carries S2 only"
    assert carried[("c2", "l3")] == N1 + N3, "c2 -> l3 (EXCLUDE S2) carries S1 and S3"
    assert carried[("c2", "r")] == 0, "nobody above c2 wants S3"
    assert carried[("c1", "l2")] == 0
