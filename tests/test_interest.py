"""Interest propagation: neighbours hear the union of what the segment and others want."""

from __future__ import annotations

from overlay.interest import ANY_SOURCE, EXCLUDE, INCLUDE, Filter, Interest, union

G = bytes([239, 1, 1, 1])
S1, S2, S3 = b"\x01\x01\x01\x01", b"\x02\x02\x02\x02", b"\x03\x03\x03\x03"


def inc(*s: bytes) -> Filter:
    return Filter(INCLUDE, frozenset(s))


def exc(*s: bytes) -> Filter:
    return Filter(EXCLUDE, frozenset(s))


def test_union_follows_rfc3376_merge_rules() -> None:
    assert union(inc(S1), inc(S2)) == inc(S1, S2)
    assert union(exc(S1, S2), exc(S2, S3)) == exc(S2)
    assert union(inc(S1), exc(S1, S2)) == exc(S2)
    assert union(exc(S1, S2), inc(S2)) == exc(S1)


def test_admits() -> None:
    assert inc(S1).admits(S1) and not inc(S1).admits(S2)
    assert exc(S1).admits(S2) and not exc(S1).admits(S1)
    assert ANY_SOURCE.any_source and inc().empty


def test_local_interest_reaches_every_up_neighbour() -> None:
    interest = Interest()
    assert interest.peer_up("b") == []
    interest.peer_up("c")
    assert sorted(interest.set_local(G, ANY_SOURCE)) == [("b", G, ANY_SOURCE), ("c", G, ANY_SOURCE)]
    assert interest.set_local(G, ANY_SOURCE) == []  # no change, nothing said
    assert sorted(interest.set_local(G, None)) == [("b", G, None), ("c", G, None)]


def test_neighbour_interest_is_never_echoed_back() -> None:
    interest = Interest()
    interest.peer_up("b")
    interest.peer_up("c")
    assert interest.set_requested("b", G, inc(S1)) == [("c", G, inc(S1))]
    assert interest.set_requested("c", G, inc(S2)) == [("b", G, inc(S2))]
    assert interest.wanted_by(None, G) == inc(S1, S2)


def test_peer_up_hears_existing_state_and_peer_down_withdraws() -> None:
    interest = Interest()
    interest.peer_up("b")
    interest.set_requested("b", G, ANY_SOURCE)
    assert interest.peer_up("c") == [("c", G, ANY_SOURCE)]
    assert interest.peer_down("b") == [("c", G, None)]
    assert interest.groups() == set()


def test_requests_from_a_down_peer_are_ignored() -> None:
    interest = Interest()
    assert interest.set_requested("ghost", G, ANY_SOURCE) == []
    assert interest.groups() == set()
