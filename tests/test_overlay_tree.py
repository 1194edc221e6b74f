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

from collections.abc import Iterator

import pytest

from mcmw.lab import Lab
from tests.netlab import require_privileged
from tests.sites import Sites, Stream, Want, check_streams, make_sites

NODES = ["r", "c1", "c2", "l1", "l2", "l3", "l4"]
LINKS = [("r", "c1"), ("r", "c2"), ("c1", "l1"), ("c1", "l2"), ("c2", "l3"), ("c2", "l4")]
FAST_LINKS = {"keepalive_interval": "1s", "dead_interval": "3s"}
# Streams of different lengths, every subset summing differently: a link's IP-Data count
# then tells exactly which streams crossed it.
N1, N2, N3 = 400, 300, 200


@pytest.fixture(scope="module")
def tree() -> Iterator[Sites]:
    require_privileged()
    with Lab() as lab:
        sites = make_sites(lab, NODES, LINKS, overlay=FAST_LINKS)
        sites.wait_peers_up()
        yield sites


def test_any_source_receivers_in_several_leaves_get_senders_at_root_and_leaf_once(tree: Sites) -> None:
    g1, g2 = "239.1.1.1", "239.2.2.2"
    root, leaf = tree.tap_address("r"), tree.tap_address("l2")
    wants = [Want("l1", g1), Want("l3", g1), Want("l4", g2)]
    streams = [
        Stream("r", root, g1, N1),
        Stream("l2", leaf, g1, N2),
        Stream("r", root, g2, N3),
    ]
    carried = check_streams(tree, wants, streams)

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
    carried = check_streams(tree, wants, streams)

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
