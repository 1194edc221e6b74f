"""Faults in a running tree: a killed middle node, a hung one, and a link that flaps.

    a ── m ── b
         └─── c

a sends; b and c receive through the middle node m. Links use a 1 s keep-alive and a 3 s
dead interval so that failures show quickly.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mcmw.lab import Lab, wait_for
from tests.netlab import require_privileged
from tests.sites import (
    Sites,
    Stream,
    Want,
    check_streams,
    expected_groups,
    make_sites,
    report,
    wait_route_state,
)

NODES = ["a", "m", "b", "c"]
LINKS = [("a", "m"), ("m", "b"), ("m", "c")]
KEEPALIVE, DEAD = 1.0, 3.0
G, G2 = "239.1.1.1", "239.2.2.2"
RATE = 300.0
FLAPS = 20


@pytest.fixture(scope="module")
def sites() -> Iterator[Sites]:
    require_privileged()
    with Lab() as lab:
        overlay = {"keepalive_interval": f"{KEEPALIVE:g}s", "dead_interval": f"{DEAD:g}s"}
        sites = make_sites(lab, NODES, LINKS, overlay=overlay)
        sites.wait_peers_up()
        yield sites


def delivered_at(sites: Sites, node: str) -> int:
    return sites.status(node)["counters"].get("delivered", 0)


def wait_growing(sites: Sites, nodes: list[str], timeout: float, what: str) -> None:
    before = {node: delivered_at(sites, node) for node in nodes}
    wait_for(lambda: all(delivered_at(sites, n) > before[n] for n in nodes), timeout, what)


def wait_settled(sites: Sites, nodes: list[str]) -> None:
    """Until nothing more reaches the nodes' TAPs (two reads 0.3 s apart agree)."""
    last: list[Any] = [None]

    def same() -> bool:
        now = [delivered_at(sites, n) for n in nodes]
        done, last[0] = now == last[0], now
        return done

    wait_for(same, 10, "the stream to drain", interval=0.3)


def runs(seqs: list[int]) -> list[tuple[int, int]]:
    """The contiguous runs [first, last] of a list of sequence numbers."""
    result: list[tuple[int, int]] = []
    for seq in seqs:
        if result and seq == result[-1][1] + 1:
            result[-1] = (result[-1][0], seq)
        else:
            result.append((seq, seq))
    return result


def stream_through(sites: Sites, receivers: list[str], fault: Callable[[], None]) -> dict[str, list[int]]:
    """a streams G to receivers (any source) while `fault` runs; the sequence numbers each
    receiver got, once the stream stopped and drained."""
    procs: dict[str, subprocess.Popen[str]] = {n: sites.source_receiver(n, G, idle=60) for n in receivers}
    wait_route_state(sites, [Want(n, G) for n in receivers])
    sender = sites.sender("a", G, 10_000_000, RATE)
    try:
        wait_growing(sites, receivers, 5, "the stream to reach every receiver")
        fault()
        wait_growing(sites, receivers, 1, "the stream to flow after the fault")
    finally:
        sender.terminate()
        sender.wait(timeout=5)
        wait_settled(sites, receivers)
        got = {n: report(p, stop=True) for n, p in procs.items()}
    source = sites.tap_address("a")
    for node, result in got.items():
        assert set(result["by_source"]) == {source}, f"{node} heard someone other than a"
    return {n: result["by_source"][source] for n, result in got.items()}


def assert_once_with_one_gap(seqs: dict[str, list[int]]) -> None:
    for node, got in seqs.items():
        assert len(got) == len(set(got)), f"{node}: duplicates after the fault"
        assert got == sorted(got), f"{node}: reordered after the fault"
        assert len(runs(got)) <= 2, f"{node}: more than the one outage: {runs(got)}"
    ends = {node: got[-1] for node, got in seqs.items()}
    assert len(set(ends.values())) == 1, f"receivers stopped at different points: {ends}"


def test_killed_middle_node_cuts_the_sites_behind_it_and_restart_resumes_without_duplicates(
    sites: Sites, record_property: Callable[[str, object], None]
) -> None:
    timings: dict[str, float] = {}

    def kill_and_restart() -> None:
        killed = time.monotonic()
        sites.procs["m"].send_signal(signal.SIGKILL)
        sites.procs["m"].wait(timeout=5)
        for node in ("a", "b", "c"):
            wait_for(
                lambda n=node: sites.peer(n, "m")["state"] == "down",
                DEAD,
                f"{node} to show its link to the killed m down within the dead interval",
            )
        timings["down_s"] = time.monotonic() - killed
        for node in ("a", "b", "c"):
            assert sites.peer(node, "m").get("last_error"), f"{node} shows why its link to m went down"
        assert sites.group("a", G) is None, "a still routes G towards the dead m"
        stalled = {n: delivered_at(sites, n) for n in ("b", "c")}
        time.sleep(0.5)  # a window to see that nothing arrives any more (not a wait)
        assert {n: delivered_at(sites, n) for n in ("b", "c")} == stalled, "sites behind m still receive"

        restarted = time.monotonic()
        sites.start("m")
        wait_growing(sites, ["b", "c"], 6, "the stream to resume after m restarted")
        timings["resume_s"] = time.monotonic() - restarted

    seqs = stream_through(sites, ["b", "c"], kill_and_restart)
    record_property("timings", timings)
    print(f"\nkilled middle: links down after {timings['down_s']:.2f}s, resumed {timings['resume_s']:.2f}s")
    assert timings["resume_s"] < 5, "streams resume within a few seconds of the restart"
    assert_once_with_one_gap(seqs)
    for node in ("b", "c"):
        assert len(runs(seqs[node])) == 2, f"{node} saw no outage at all: {runs(seqs[node])}"


def test_hung_middle_node_is_declared_dead_after_the_dead_interval_and_recovers(
    sites: Sites, record_property: Callable[[str, object], None]
) -> None:
    timings: dict[str, float] = {}

    def hang_and_resume() -> None:
        stopped = time.monotonic()
        sites.procs["m"].send_signal(signal.SIGSTOP)  # silent: its kernel still holds the TCP
        try:
            for node in ("a", "b", "c"):
                wait_for(
                    lambda n=node: sites.peer(n, "m")["state"] == "down",
                    DEAD + 1,
                    f"{node} to declare the hung m dead",
                )
                timings[f"{node}_down_s"] = time.monotonic() - stopped
                assert "nothing heard" in sites.peer(node, "m").get("last_error", ""), (
                    f"{node}: the link to m closed for another reason than silence"
                )
        finally:
            resumed = time.monotonic()
            sites.procs["m"].send_signal(signal.SIGCONT)
        wait_growing(sites, ["b", "c"], 8, "the stream to resume after m woke up")
        timings["resume_s"] = time.monotonic() - resumed

    seqs = stream_through(sites, ["b", "c"], hang_and_resume)
    record_property("timings", timings)
    print(f"\nhung middle: {timings}")
    for node in ("a", "b", "c"):
        # Silence is measured from the last thing heard, at most one keep-alive before the stop.
        assert DEAD - KEEPALIVE - 0.2 <= timings[f"{node}_down_s"] <= DEAD + 0.5
    assert timings["resume_s"] < 6
    assert_once_with_one_gap(seqs)
    sites.wait_peers_up()


def kill_connection(sites: Sites, node: str) -> None:
    """Reset every established TCP connection of `node`'s listen port (ss -K): both ends
    see the link fail at once, as after a path failure with a reset."""
    port = sites.doc["nodes"][node]["listen"].rsplit(":", 1)[1]
    sites.lab.exec(
        sites.ns[node], ["ss", "-K", "-t", "state", "established", "(", "sport", "=", f":{port}", ")"]
    )


def test_link_flapping_twenty_times_ends_in_the_fresh_start_route_state(
    sites: Sites, record_property: Callable[[str, object], None]
) -> None:
    """m-b flaps (connections reset, and twice the veth taken down as well) while b's
    membership in G2 changes between flaps; c's stream, not behind the link, never drops a
    packet; at the end every node's route state equals the fresh start's and a stream
    again reaches exactly the sites that want it."""
    wants = [Want("b", G), Want("c", G)]
    holders = {n: sites.source_receiver(n, G, idle=120) for n in ("b", "c")}
    try:
        wait_route_state(sites, wants)
        fresh = {node: sites.route_state(node) for node in NODES}
        assert fresh == {
            node: {"groups": expected_groups(sites.doc["links"], node, wants), "peers": fresh[node]["peers"]}
            for node in NODES
        }
        assert all(state == "up" for f in fresh.values() for state in f["peers"].values())

        churn: subprocess.Popen[str] | None = None
        c_before = delivered_at(sites, "c")
        sender = sites.sender("a", G, 10_000_000, RATE)
        dev_b = sites.veths[("m", "b")][1]
        started = time.monotonic()
        try:
            for flap in range(FLAPS):
                if flap % 10 == 9:
                    sites.lab.exec(sites.ns["b"], ["ip", "link", "set", dev_b, "down"])
                    kill_connection(sites, "b")
                    sites.lab.exec(sites.ns["b"], ["ip", "link", "set", dev_b, "up"])
                else:
                    kill_connection(sites, "b")
                # m redials after at least 0.375 s (backoff 0.5 s, jitter 25 %): long
                # enough to see the link down before it comes back.
                wait_for(lambda: sites.peer("m", "b")["state"] == "down", 2, f"flap {flap + 1}: m-b down")
                if flap % 2 == 0:  # b joins G2 on even flaps, leaves it again on odd ones
                    if churn is None:
                        churn = sites.source_receiver("b", G2, idle=120)
                    else:
                        report(churn, stop=True)
                        churn = None
                wait_for(
                    lambda: sites.peer("m", "b")["state"] == "up" and sites.peer("b", "m")["state"] == "up",
                    8,
                    f"flap {flap + 1}: m-b up again",
                )
        finally:
            flapping_s = time.monotonic() - started
            if churn is not None:
                report(churn, stop=True)
            sender.terminate()
            sender.wait(timeout=5)
        print(f"\n{FLAPS} flaps in {flapping_s:.1f}s")
        record_property("flapping_s", flapping_s)
        assert delivered_at(sites, "c") > c_before

        def final() -> dict[str, Any]:
            return {node: sites.route_state(node) for node in NODES}

        try:
            wait_for(lambda: final() == fresh, 10, "the route state of a fresh start")
        except TimeoutError:
            assert final() == fresh, "route state after the flaps differs from a fresh start's"
    finally:
        wait_settled(sites, ["b", "c"])
        got = {n: report(p, stop=True) for n, p in holders.items()}
    source = sites.tap_address("a")
    c_seqs = got["c"]["by_source"][source]
    assert c_seqs == list(range(len(c_seqs))), "c, not behind the flapping link, lost or doubled a packet"
    b_seqs = got["b"]["by_source"][source]
    assert len(b_seqs) == len(set(b_seqs)), "b got a packet twice across the flaps"

    # And the routes work: exactly the wanted traffic on every link, once.
    check_streams(
        sites, [Want("b", G2), Want("c", G)], [Stream("a", source, G, 300), Stream("a", source, G2, 200)]
    )
