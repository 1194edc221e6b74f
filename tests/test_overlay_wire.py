"""The overlay on the wire: what Wireshark's COPS dissector makes of a captured peer stream,
and 8000-byte datagrams (IPv4 and IPv6, fragmented by the sender's kernel) across a chain.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from collections import Counter

import pytest

from mcmw.lab import Lab, wait_for
from tests.sites import Sites, Want, make_sites, report, wait_route_state

PORT = 7000  # every acceptor listens on its veth at this port (tests/sites.py)
G = "239.1.1.1"

# The objects (C-Nums) each message carries, by op-code (docs/protocol.md, "Messages").
OBJECTS = {
    6: [11, 10, 9],  # Open: PEPID, KA Timer, ClientSI
    9: [9],  # Keep-Alive
    1: [9],  # Add-Route: one ClientSI per route (here one group)
    4: [9],  # Remove-Route
    3: [9],  # IP-Data
    8: [8, 9],  # Close: Error, ClientSI
}


def tshark(*args: str) -> str:
    proc = subprocess.run(["tshark", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def cops_pdus(verbose: str) -> list[dict[str, object]]:
    """Each COPS PDU of `tshark -V` output: op-code, message length, C-Nums in order."""
    pdus: list[dict[str, object]] = []
    for block in verbose.split("\nCommon Open Policy Service\n")[1:]:
        body = block.split("\nFrame ", 1)[0]
        body = body.split("\nCommon Open Policy Service", 1)[0]
        opcode = re.search(r"^    Op Code: .*\((\d+)\)$", body, re.M)
        length = re.search(r"^    Message Length: (\d+)$", body, re.M)
        cnums = [int(c) for c in re.findall(r"^        C-Num: .*\((\d+)\)$", body, re.M)]
        pdus.append(
            {
                "op": int(opcode.group(1)) if opcode else None,
                "length": int(length.group(1)) if length else None,
                "cnums": cnums,
            }
        )
    return pdus


@pytest.mark.parametrize("authenticated", [False, True], ids=["plain", "authenticated"])
def test_a_captured_peer_stream_decodes_as_cops_without_malformed_or_expert_errors(
    lab: Lab, authenticated: bool
) -> None:
    if not (shutil.which("tcpdump") and shutil.which("tshark")):
        pytest.skip("needs tcpdump and tshark")
    sites = Sites(lab, lab.workdir / "tree.yaml")
    sites.doc["overlay"].update(keepalive_interval="1s", dead_interval="3s")
    if authenticated:
        (lab.workdir / "psk.key").write_text("7 a-shared-secret-for-tests-0123\n")
        sites.doc["overlay"]["secret_file"] = "psk.key"
    sites.add_node("a")
    sites.add_node("b", {"igmp": {"last_member_query_interval": "200ms"}})
    sites.add_link("a", "b")
    sites.write()
    capture = lab.workdir / "peer.pcap"
    dump = lab.popen(
        sites.ns["b"],
        # -Z root: write where the test can read it; --immediate-mode: nothing held back.
        ["tcpdump", "-i", sites.veths[("a", "b")][1], "-U", "--immediate-mode", "-Z", "root", "-s", "0"]
        + ["-c", "5000", "-w", str(capture), "tcp", "port", str(PORT)],
        text=True,
    )
    assert dump.stderr is not None and "listening on" in dump.stderr.readline()
    try:
        sites.start("b")  # the acceptor first, so that the capture holds no refused SYN
        sites.start("a")
        sites.wait_peers_up()
        # Routes exchanged (Add-Route b -> a), data (IP-Data, small and near the MTU),
        # the receiver leaves (Remove-Route), then a stops (Close, code 1).
        receiver = sites.source_receiver("b", G, idle=5, count=100)
        wait_route_state(sites, [Want("b", G)])
        for size in (64, 1400):
            assert sites.sender("a", G, 50, 500, size=size).wait(timeout=30) == 0
        got = report(receiver)["by_source"][sites.tap_address("a")]
        assert sorted(got) == sorted(list(range(50)) * 2), "each of the two 50-packet streams once"
        wait_for(lambda: sites.group("a", G) is None, 5, "b's Remove-Route to reach a")
        wait_for(lambda: sites.peer("a", "b")["rtt_ms"] is not None, 5, "a keep-alive round trip")
        sites.procs["a"].send_signal(signal.SIGTERM)
        assert sites.procs["a"].wait(timeout=10) == 0
        wait_for(lambda: sites.peer("b", "a")["state"] == "down", 5, "b to see a's Close")
        assert "peer closed: node shutting down" in sites.peer("b", "a").get("last_error", "")
    finally:
        dump.send_signal(signal.SIGINT)
        dump.communicate(timeout=10)

    decode = ["-r", str(capture), "-d", f"tcp.port=={PORT},cops"]
    verbose = tshark(*decode, "-V")
    assert "Malformed" not in verbose
    experts = re.findall(r"\[Expert Info \((\w+)/(\w+)\): ([^\]]*)\]", verbose)
    serious = [e for e in experts if e[0] in ("Error", "Warning")]
    assert not serious, f"expert infos: {serious}"

    pdus = cops_pdus(verbose)
    ops = Counter(p["op"] for p in pdus)
    assert ops[6] == 2, "an Open each way"
    assert ops[1] >= 1 and ops[4] >= 1, "Add-Route and Remove-Route"
    assert ops[3] == 100, "every packet as one IP-Data (no UDP channel here)"
    assert ops[9] >= 2 and ops[8] >= 1, "Keep-Alives and a's Close"
    assert set(ops) == set(OBJECTS), f"unexpected op-codes: {ops}"
    integrity = [16] if authenticated else []
    for pdu in pdus:
        assert pdu["cnums"] == OBJECTS[pdu["op"]] + integrity, f"objects of {pdu}"  # type: ignore[index]

    # Every byte of both directions is inside a COPS PDU: nothing left undissected.
    tcp_bytes = sum(int(n) for n in tshark(*decode, "-T", "fields", "-e", "tcp.len").split() if n)
    assert sum(p["length"] for p in pdus) == tcp_bytes  # type: ignore[misc]


def fragments(size: int, mtu: int, family: int) -> int:
    """How many fragments the kernel makes of a UDP datagram of `size` payload bytes."""
    data = size + 8
    per = (mtu - 20) & ~7 if family == 4 else (mtu - 48) & ~7
    return -(-data // per)


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_8000_byte_datagrams_cross_a_chain_intact_ipv4_and_ipv6(lab: Lab, transport: str) -> None:
    """a -- b -- c: the sender's kernel fragments each datagram at the TAP MTU (1500);
    every fragment crosses both links (on UDP, each again split into IP-Data fragments
    that fit `udp_max_message`), and c's kernel reassembles every datagram intact."""
    options = {name: {"udp": 7100} for name in "abc"} if transport == "udp" else None
    sites = make_sites(lab, ["a", "b", "c"], [("a", "b"), ("b", "c")], node_options=options)
    sites.wait_peers_up()
    assert {p["transport"] for p in sites.status("b")["peers"]} == {transport}
    count, size = 40, 8000
    for family, group in ((4, "239.8.8.8"), (6, "ff0e::1:1")):
        receiver = sites.source_receiver("c", group, idle=5, count=count, port=5010)
        wait_route_state(sites, [Want("c", group)])
        tx_before = sites.peer("a", "b")["tx_packets"]
        delivered_before = sites.status("c")["counters"]["delivered"]
        assert sites.sender("a", group, count, 200, size=size, port=5010).wait(timeout=30) == 0
        got = report(receiver)
        seqs = [s for seqs in got["by_source"].values() for s in seqs]
        assert sorted(seqs) == list(range(count)), f"IPv{family}: {len(seqs)} of {count} datagrams"
        assert got["sizes"] == [size] and got["corrupt"] == 0, f"IPv{family}: {got['sizes']}"
        pieces = count * fragments(size, 1500, family)
        assert sites.peer("a", "b")["tx_packets"] - tx_before == pieces, f"IPv{family}: fragments sent on a-b"
        wait_for(
            lambda d=delivered_before, p=pieces: sites.status("c")["counters"]["delivered"] - d == p,
            3,
            f"IPv{family}: every fragment written into c's TAP",
        )
    for node in ("a", "b", "c"):
        assert "Traceback" not in lab.node_log(node)
