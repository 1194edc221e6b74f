"""End to end: real sockets in separate sites, joined only by unicast veths, through mcmw."""

from __future__ import annotations

import signal

import pytest

from mcmw.lab import Lab, wait_for
from tests.sites import make_sites, received

GROUP = "239.1.1.1"
COUNT = 2000


def wants(sites, node: str, peer: str) -> bool:  # noqa: ANN001
    group = sites.group(node, GROUP)
    return group is not None and peer in group["peers"]


@pytest.mark.parametrize("igmp_version", [3, 2])
def test_two_sites_stream_exactly_once_in_order_and_stops_after_leave(lab: Lab, igmp_version: int) -> None:
    sites = make_sites(lab, ["a", "b"], [("a", "b")])
    sites.wait_peers_up()
    if igmp_version != 3:
        lab.exec(
            sites.ns["b"],
            ["sysctl", "-qw", f"net.ipv4.conf.mcmw0.force_igmp_version={igmp_version}"],
        )

    receiver = sites.receiver("b", GROUP, COUNT, timeout=5)
    wait_for(lambda: (g := sites.group("b", GROUP)) and g["local"], 3, "b to see the join")
    wait_for(lambda: wants(sites, "a", "b"), 3, "a to learn b wants the group")
    sites.sender("a", GROUP, COUNT, rate=4000).wait(timeout=30)

    result = received(receiver)
    assert result["received"] == list(range(COUNT))
    assert result["sources"] == ["169.254.1.1"]
    assert sites.status("b")["counters"]["delivered"] == COUNT

    # The receiver left when it closed its socket: the stream must stop reaching b's TAP.
    sender = sites.sender("a", GROUP, 100_000, rate=500)
    try:
        wait_for(lambda: sites.group("b", GROUP) is None, 3.5, "b to drop the group after the leave")
        stopped_at = sites.status("b")["tap"]["tx_frames"]
        wait_for(lambda: sites.status("a")["counters"]["forwarded"] > 0, 1, "a keeps sending")
        before = sites.status("a")["tap"]["rx_frames"]
        wait_for(
            lambda: sites.status("a")["tap"]["rx_frames"] > before + 100,
            3,
            "a still hears the sender",
        )
        assert sites.status("b")["tap"]["tx_frames"] - stopped_at <= 2  # a query at most
        assert sites.group("a", GROUP) is None or "b" not in sites.group("a", GROUP)["peers"]
    finally:
        sender.terminate()


def test_line_of_three_sites_with_a_branch_delivers_once_and_only_where_wanted(lab: Lab) -> None:
    sites = make_sites(lab, ["a", "b", "c", "d"], [("a", "b"), ("b", "c"), ("b", "d")])
    sites.wait_peers_up()
    receivers = [sites.receiver(node, GROUP, 1000, timeout=5) for node in ("b", "c")]
    wait_for(lambda: wants(sites, "a", "b"), 5, "a to learn b's site wants the group")
    wait_for(lambda: wants(sites, "b", "c"), 5, "b to learn c wants the group")
    sites.sender("a", GROUP, 1000, rate=3000).wait(timeout=30)

    for proc in receivers:
        assert received(proc)["received"] == list(range(1000))
    # d has no receiver: nothing of the stream crosses b-d, nothing reaches d's TAP.
    d = sites.status("d")
    assert d["counters"]["delivered"] == 0
    assert next(p for p in d["peers"] if p["name"] == "b")["rx_packets"] == 0
    b_to_d = next(p for p in sites.status("b")["peers"] if p["name"] == "d")
    assert b_to_d["tx_packets"] == 0


def test_udp_data_channel_with_authentication(lab: Lab) -> None:
    (lab.workdir / "psk.key").write_text("7 a-shared-secret-for-tests-0123\n")
    udp = {name: {"udp": 7100} for name in ("a", "b")}
    sites = make_sites(lab, ["a", "b"], [("a", "b")], overlay={"secret_file": "psk.key"}, node_options=udp)
    sites.wait_peers_up()
    assert [p["transport"] for p in sites.status("a")["peers"]] == ["udp"]
    receiver = sites.receiver("b", GROUP, 1000, timeout=5)
    wait_for(lambda: wants(sites, "a", "b"), 5, "a to learn b wants the group")
    sites.sender("a", GROUP, 1000, rate=3000).wait(timeout=30)
    assert received(receiver)["received"] == list(range(1000))
    b_peer = sites.status("b")["peers"][0]
    assert b_peer["rx_packets"] == 1000 and b_peer["rx_lost"] == 0
    assert sites.status("b")["counters"].get("dropped_auth", 0) == 0


def test_sighup_adds_a_leaf_without_disturbing_running_streams(lab: Lab) -> None:
    sites = make_sites(lab, ["a", "b"], [("a", "b")])
    sites.wait_peers_up()
    receiver = sites.receiver("b", GROUP, 3000, timeout=5)
    wait_for(lambda: wants(sites, "a", "b"), 5, "a to learn b wants the group")
    sender = sites.sender("a", GROUP, 3000, rate=1000)  # 3 s of stream across the reload

    sites.add_node("c")
    sites.add_link("b", "c")
    sites.write()
    for node in ("a", "b"):
        sites.procs[node].send_signal(signal.SIGHUP)
    sites.start("c")
    wait_for(lambda: sites.status("c")["peers"][0]["state"] == "up", 10, "the new leaf's link up")
    late = sites.receiver("c", GROUP, 100, timeout=3)

    sender.wait(timeout=30)
    assert received(receiver)["received"] == list(range(3000))  # nothing lost or doubled
    got = received(late)["received"]
    assert got and got == sorted(set(got))  # the new leaf receives, once each, in order
    assert "reloaded" in lab.node_log("a") and "reloaded" in lab.node_log("b")
    # Datagrams bigger than the path: the kernel fragments them at the TAP, and the
    # overlay fragments its own messages on the UDP channel; every one arrives whole.
    receiver = sites.receiver("b", GROUP, 200, timeout=5, port=5006)
    sites.sender("a", GROUP, 200, rate=500, port=5006, size=8000).wait(timeout=30)
    assert received(receiver)["received"] == list(range(200))


def test_sigterm_tells_peers_and_removes_the_tap_and_its_routes(lab: Lab) -> None:
    sites = make_sites(lab, ["a", "b"], [("a", "b")])
    sites.wait_peers_up()
    assert "224.0.0.0/4 dev mcmw0" in lab.exec(sites.ns["b"], ["ip", "route"]).stdout
    sites.procs["b"].send_signal(signal.SIGTERM)
    assert sites.procs["b"].wait(timeout=5) == 0
    peer = wait_for(
        lambda: (p := sites.status("a")["peers"][0])["state"] == "down" and p, 2, "a to see b leave"
    )
    assert peer["last_error"] == "peer closed: node shutting down"  # told, not timed out
    assert lab.exec(sites.ns["b"], ["ip", "link", "show", "mcmw0"], check=False).returncode != 0
    assert "mcmw0" not in lab.exec(sites.ns["b"], ["ip", "route"]).stdout
    assert not (lab.workdir / "b.sock").exists()
