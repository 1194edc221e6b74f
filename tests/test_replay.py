"""`mcmw replay`: captures through the node's real core on the capture's clock.

Synthetic hosts (tools/mkcapture.py) of every IGMP and MLD version end in the membership
they should; timers run between frames at their deadlines; drops are counted; routes a
neighbour asked for in a captured overlay stream make the node forward to it; the same
capture gives the same bytes on every run; `--out` reads in tshark and `mcmw decode`.
With root: a live two-node run captured on a TAP and replayed into a fresh node ends in
the state the live node had, and `--live` feeds a running node's TAP."""

from __future__ import annotations

import ipaddress
import json
import os
import pty
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import ARP, Ether

from igmp import codec_igmp
from igmp.checksum import inet_checksum
from igmp.messages import CHANGE_TO_EXCLUDE_MODE, GroupRecord
from mcmw.capture import CaptureError, CaptureReader, Frame, TcpFlow, udp_frame, write_pcap
from mcmw.cli import main
from mcmw.lab import Lab, wait_for
from overlay import codec
from tap.ethernet import frame_for_ip, router_mac
from tests.sites import make_sites
from tests.test_decode import Capture, assert_agree, decode
from tools import mkcapture

ROOT = Path(__file__).resolve().parent.parent

T0 = 1_700_000_000 * 10**9
HOST_MAC = b"\x02\x00\x00\x00\x00\x09"
HOST_MAC_TEXT = "02:00:00:00:00:09"
TREE = """
overlay: {{address_bits: 24, mapping: modulo{extra}}}
nodes:
  a: {{listen: "198.18.1.1:7000", tap: {{name: mcmw0, address: 169.254.1.1/16}}{udp}}}
  b: {{listen: "198.18.1.2:7000", tap: {{name: mcmw0, address: 169.254.1.2/16}}{udp}}}
  c: {{listen: "198.18.2.2:7000", tap: {{name: mcmw0, address: 169.254.1.3/16}}{udp}}}
links: [[a, b], [b, c]]
"""


def tree(tmp_path: Path, udp: bool = False, key: bool = False) -> Path:
    extra = ""
    if key:
        (tmp_path / "psk.key").write_text("1 0123456789abcdef0123456789abcdef\n")
        (tmp_path / "psk.key").chmod(0o600)
        extra = ", secret_file: psk.key"
    path = tmp_path / "tree.yaml"
    path.write_text(TREE.format(extra=extra, udp=", udp: 7001" if udp else ""))
    return path


def replay(
    capsys: pytest.CaptureFixture[str], capture: Path, config: Path, *extra: str, node: str = "b"
) -> dict[str, Any]:
    assert main(["replay", str(capture), "-c", str(config), "--node", node, "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def local_state(report: dict[str, Any]) -> dict[str, tuple[str, list[str]]]:
    return {g["group"]: (g["local"]["mode"], g["local"]["sources"]) for g in report["groups"] if g["local"]}


def join(host: str, group: str, sources: tuple[str, ...] = (), kind: int = CHANGE_TO_EXCLUDE_MODE) -> bytes:
    record = GroupRecord(kind, _ip(group), tuple(_ip(s) for s in sources))
    return frame_for_ip(codec_igmp.build_report(3, _ip(host), records=[record]), HOST_MAC)


def _ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def datagram(src: str, group: str, ttl: int = 16) -> bytes:
    return bytes(
        Ether(src="02:00:00:00:00:09")
        / IP(src=src, dst=group, ttl=ttl)
        / UDP(sport=9, dport=5004)
        / (b"x" * 64)
    )


def read(path: Path) -> list[Frame]:
    with CaptureReader(str(path)) as reader:
        return list(reader.frames())


def frames_in(path: Path) -> int:
    """How many whole frames a capture being written holds so far."""
    count = 0
    with CaptureReader(str(path)) as reader:
        try:
            for _ in reader.frames():
                count += 1
        except CaptureError:
            pass  # the writer is in the middle of a record
    return count


def write(path: Path, timed: list[tuple[float, bytes]]) -> Path:
    write_pcap(str(path), [(T0 + round(t * 1e9), frame) for t, frame in timed])
    return path


# -- membership ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        ["--version", "1"],
        ["--version", "2", "--link", "sll"],
        ["--version", "3", "--sources", "2", "--data", "2"],
        ["--protocol", "mld", "--version", "1", "--link", "raw"],
        ["--protocol", "mld", "--version", "2", "--sources", "1", "--link", "sll2"],
    ],
)
def test_synthetic_hosts_end_in_the_membership_they_should(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str]
) -> None:
    path = tmp_path / "hosts.pcap"
    made = mkcapture.build(
        ["-o", str(path), "--hosts", "30", "--groups", "4", "--duration", "1800", *options]
    )
    report = replay(capsys, path, tree(tmp_path))
    sources = int(options[options.index("--sources") + 1]) if "--sources" in options else 0
    got = local_state(report)
    if options == ["--version", "1"]:  # IGMPv1 hosts leave silently: their groups time out
        assert set(got) >= set(made["members_at_end"])
    else:
        assert set(got) == set(made["members_at_end"])
    for mode, listed in got.values():
        assert (mode, len(listed)) == (("include", sources) if sources else ("exclude", 0))
    # Both neighbours were asked for exactly what the segment holds at the end.
    for neighbour in report["neighbours"]:
        assert neighbour["state"] == "up"
        assert {r["group"] for r in neighbour["routes"]} == set(got)
    assert report["frames"]["read"] == report["frames"]["replayed"] == made["frames"]
    assert report["duration_s"] == pytest.approx(1800, abs=60)


def test_timers_run_between_frames_at_their_deadlines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One join, then nothing for an hour: the group expires at the Group Membership
    Interval (2 x 125 + 10 s), its routes are withdrawn then, general queries go out every
    Query Interval, and keep-alives keep both links up all along."""
    arp = bytes(Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="169.254.100.1", pdst="169.254.1.2"))
    capture = write(tmp_path / "hour.pcap", [(0.0, join("169.254.100.1", "239.5.5.5")), (3600.0, arp)])
    report = replay(capsys, capture, tree(tmp_path))
    assert report["groups"] == []
    changes = report["neighbours"][0]["route_changes"]
    assert [(c["message"], c["group"]) for c in changes] == [
        ("add-route", "239.5.5.5"),
        ("remove-route", "239.5.5.5"),
    ]
    assert changes[1]["time"] == pytest.approx(260.0, abs=0.01)
    general = [q["time"] for q in report["queries"] if q["protocol"] == "igmp" and q["group"] == "0.0.0.0"]
    assert general[:3] == [0.0, 31.25, 156.25]  # startup queries at a quarter of the interval
    assert all(b - a == pytest.approx(125.0) for a, b in zip(general[1:], general[2:], strict=False))
    assert general[-1] > 3600 - 125
    assert all(n["state"] == "up" and n["messages"]["keepalive"] >= 1199 for n in report["neighbours"])
    assert report["duration_s"] == 3600.0


def test_drops_are_counted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = join("169.254.100.1", "239.5.5.5")
    bad_checksum = bytearray(good)
    bad_checksum[-1] ^= 0xFF
    ttl_two = bytearray(good)  # TTL 2: a router must not accept it (RFC 3376 4)
    ttl_two[22] = 2
    ttl_two[24:26] = b"\0\0"
    ttl_two[24:26] = inet_checksum(bytes(ttl_two[14:38])).to_bytes(2, "big")
    short = datagram("169.254.100.1", "239.5.5.5")[:30]
    capture = write(
        tmp_path / "drops.pcap", [(0.0, bytes(bad_checksum)), (0.1, bytes(ttl_two)), (0.2, short)]
    )
    report = replay(capsys, capture, tree(tmp_path))
    assert report["membership_drops"]["igmp"] == {"checksum": 1, "bad_ttl": 1}
    assert report["counters"]["dropped_malformed"] == 1
    assert report["groups"] == []


def test_routes_asked_for_in_a_captured_overlay_stream_make_the_node_forward(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A capture of both sides merged: a's overlay stream asks b for 239.6.6.6, and a
    carries it a packet of 239.7.7.7 (on the stream, or on the UDP data channel); a host on
    b's segment sends to the one and listens to the other. b forwards to a, per source,
    and delivers to its TAP."""
    flow = TcpFlow(("198.18.1.1", 40000), ("198.18.1.2", 7000), (router_mac("a"), router_mac("b")), (7, 9))
    ask = codec.encode(codec.AddRoute((codec.Route(0x060606, _ip("239.6.6.6")),)))
    carried = bytes(IP(src="169.254.1.1", dst="239.7.7.7", ttl=15) / UDP(sport=9, dport=5004) / (b"y" * 64))
    timed = [(0.0, f) for f in flow.handshake()]
    timed += [(0.0, f) for f in flow.send(True, codec.encode(codec.Open("a", 24, "modulo")) + ask)]
    timed.append((0.5, join("169.254.100.1", "239.7.7.7")))
    timed += [(1.0 + i / 10, datagram("169.254.100.1", "239.6.6.6")) for i in range(5)]
    timed += [(1.0 + i / 10, datagram("169.254.100.2", "239.6.6.6")) for i in range(3)]
    carry = codec.encode(codec.IpData(0x070707, 1, carried))
    for udp in (False, True):
        if udp:  # on the UDP data channel, from a's UDP port to b's
            ends = (("198.18.1.1", 7001), ("198.18.1.2", 7001))
            last = [(2.0, udp_frame(*ends, (router_mac("a"), router_mac("b")), carry))]
        else:
            last = [(2.0, f) for f in flow.send(True, carry)]
        capture = write(tmp_path / "merged.pcap", timed + last)
        report = replay(capsys, capture, tree(tmp_path, udp=udp), "--out", str(tmp_path / "out.pcap"))
        a = report["neighbours"][0]
        assert a["from_capture"] == {"add-route": 1, "ip-data": 1}
        assert a["transport"] == ("udp" if udp else "tcp")
        assert [(d["group"], d["source"], d["packets"]) for d in a["data"]] == [
            ("239.6.6.6", "169.254.100.1", 5),
            ("239.6.6.6", "169.254.100.2", 3),
        ]
        assert [(d["group"], d["source"], d["packets"]) for d in report["tap"]["data"]] == [
            ("239.7.7.7", "169.254.1.1", 1)
        ]
        assert report["frames"]["peer_messages"] == 2
        data = [o for o in decode(tmp_path / "out.pcap") if o["type"] == "ip-data"]
        assert all(o["protocol"] == "cops" for o in data)
        sent = [o for o in data if o["src"] == "198.18.1.2"]  # b to a; the rest is a's, fed in
        assert len(sent) == 8 and len(data) == 9
        assert {o["dport"] for o in sent} == ({7001} if udp else {40000})


# -- output --------------------------------------------------------------------------------


def test_the_same_capture_gives_the_same_bytes(tmp_path: Path) -> None:
    """Two runs, in fresh interpreters with different hash seeds, authenticated links."""
    capture = tmp_path / "hosts.pcap"
    mkcapture.build(
        ["-o", str(capture), "--hosts", "20", "--sources", "3", "--duration", "900", "--data", "1"]
    )
    config = tree(tmp_path, udp=True, key=True)
    outputs = []
    for seed in ("1", "2"):
        out = tmp_path / f"out{seed}.pcap"
        argv = [sys.executable, "-m", "mcmw", "replay", str(capture), "-c", str(config), "--node", "b"]
        env = {**os.environ, "PYTHONHASHSEED": seed}
        text = subprocess.run(
            [*argv, "--json", "--out", str(out)], capture_output=True, check=True, env=env
        ).stdout
        human = subprocess.run(argv, capture_output=True, check=True, env=env).stdout
        outputs.append((text.replace(str(out).encode(), b"OUT"), human, out.read_bytes()))
    assert outputs[0] == outputs[1]
    assert b"(up)" in outputs[0][1]


def test_out_reads_in_tshark_and_decode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capture = tmp_path / "hosts.pcap"
    mkcapture.build(["-o", str(capture), "--hosts", "10", "--sources", "2", "--duration", "400"])
    out = tmp_path / "out.pcap"
    report = replay(capsys, capture, tree(tmp_path), "--out", str(out))
    frames = assert_agree(out, "-d", "tcp.port==7000,cops")
    assert len(frames) == report["out"]["frames"]
    # Every message the node sent to each neighbour is in the file, on b's side of the
    # made-up flows (b listens on 198.18.1.2), and decode reads each one by its name.
    for neighbour in report["neighbours"]:
        peer = {"a": "198.18.1.1", "c": "198.18.2.2"}[neighbour["name"]]
        from_b = Counter(
            m["type"]
            for f in frames
            if f["protocol"] == "cops" and f["src"] == "198.18.1.2" and f["dst"] == peer
            for m in f["messages"]
        )
        assert from_b == Counter(neighbour["messages"]), (neighbour["name"], from_b)
    assert not any(f["malformed"] for f in frames)
    queries = [f for f in frames if f["protocol"] in ("igmp", "mld")]
    assert len(queries) == report["tap"]["queries"]


def on_terminal(argv: list[str]) -> tuple[bytes, bytes]:
    """Run `argv` with stderr on a pseudo-terminal and stdout in a pipe: (stdout, what
    the terminal got)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)  # ends with EIO once the child closed the terminal
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, seen
    return out, seen


def test_progress_bar_on_a_terminal_and_none_in_a_pipe(tmp_path: Path) -> None:
    capture = tmp_path / "hosts.pcap"
    made = mkcapture.build(["-o", str(capture), "--hosts", "40", "--duration", "600"])
    mcmw = [sys.executable, "-m", "mcmw"]
    for label, argv in (
        ("decode", [*mcmw, "decode", str(capture)]),
        ("replay", [*mcmw, "replay", str(capture), "-c", str(tree(tmp_path)), "--node", "b"]),
    ):
        out, terminal = on_terminal(argv)
        # A bar of the file read so far, redrawn in place, taken down at the end; none of
        # it in the output proper.
        assert re.search(rb"\r" + label.encode() + rb" \[#* *\] +\d+% frame \d+\x1b\[K", terminal), terminal
        assert terminal.endswith(b"\r\x1b[K") and b"\x1b" not in out and b"\r" not in out
        piped = subprocess.run(argv, capture_output=True, check=True, timeout=60)
        assert piped.stderr == b""
        assert piped.stdout == out
        if label == "decode":
            assert len(out.splitlines()) == made["frames"]


def test_a_damaged_capture_replays_up_to_the_damage_then_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capture = write(
        tmp_path / "two.pcap",
        [(0.0, join("169.254.100.1", "239.5.5.5")), (1.0, join("169.254.100.2", "239.5.5.6"))],
    )
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(capture.read_bytes()[:-10])
    config = tree(tmp_path)
    assert main(["replay", str(cut), "-c", str(config), "--node", "b", "--json"]) == 2
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert list(local_state(report)) == ["239.5.5.5"]
    assert report["damaged"] == err.strip().removeprefix("mcmw replay: ")
    assert err.strip().endswith("frame 2: truncated packet data: 44 of 54 bytes")
    assert main(["replay", str(capture), "-c", str(config), "--node", "b", "--live", "--out", "x.pcap"]) == 2
    assert "--out and --live" in capsys.readouterr().err
    assert main(["replay", str(capture), "-c", str(config), "--node", "zed"]) == 2
    assert "no node named 'zed'" in capsys.readouterr().err


# -- live -----------------------------------------------------------------------------------


@pytest.mark.privileged
def test_a_live_run_replayed_into_a_fresh_node_ends_in_the_live_state(lab: Lab, tmp_path: Path) -> None:
    """Two sites; b's TAP is captured while its host joins (any source, source-specific,
    IPv6) and a streams to it. Replaying the capture into a fresh b gives b's live
    membership and asks a for what the live b asked. Then `replay --live` feeds b's TAP."""
    sites = make_sites(lab, ["a", "b"], [("a", "b")])
    sites.wait_peers_up()
    capture = Capture(
        lab,
        sites.ns["b"],
        lab.workdir / "b.pcap",
        ["tcpdump", "-i", "mcmw0", "-U", "-w", str(lab.workdir / "b.pcap")],
        "listening on",
    )
    member = lab.popen(
        sites.ns["b"],
        [sys.executable, str(ROOT / "tests/apps/mc_member.py"), "mcmw0"],
        text=True,
        stdin=subprocess.PIPE,
    )
    assert member.stdin is not None and member.stdout is not None
    assert json.loads(member.stdout.readline())["ready"]
    for command in (
        "join 239.1.1.1",
        "source-join 232.1.1.1 169.254.1.1",
        "join ff0e::1:2",
        "join 239.1.1.9",
    ):
        member.stdin.write(command + "\n")
        member.stdin.flush()
        assert json.loads(member.stdout.readline())["ok"]
    wanted = {"239.1.1.1", "232.1.1.1", "ff0e::1:2", "239.1.1.9"}
    wait_for(
        lambda: {g["group"] for g in sites.status("a")["groups"] if "b" in g["peers"]} >= wanted,
        5,
        "a to learn b's groups",
    )
    sites.sender("a", "239.1.1.1", 20, rate=200).wait(timeout=10)
    member.stdin.write("leave 239.1.1.9\n")
    member.stdin.flush()
    assert json.loads(member.stdout.readline())["ok"]
    wait_for(lambda: sites.group("b", "239.1.1.9") is None, 5, "b to drop 239.1.1.9")
    live = sites.status("b")
    a_view = {g["group"] for g in sites.status("a")["groups"] if "b" in g["peers"]}
    # A last frame after the snapshot (to a link-local group, so not carried), so that the
    # replay's clock runs as far as the live node's had when its status was read.
    mark = (
        "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'end', ('224.0.0.251', 9))"
    )
    assert lab.python(sites.ns["b"], mark).wait(timeout=5) == 0
    wait_for(lambda: any(f.get("dst") == "224.0.0.251" for f in decode(capture.path)), 3, "the last frame")
    path = capture.stop()

    def state(groups: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            g["group"]: (g["local"]["mode"], g["local"]["sources"], g["local"]["compat_version"], g["peers"])
            for g in groups
            if g["local"]
        }

    argv = [sys.executable, "-m", "mcmw", "replay", str(path), "-c", str(sites.tree), "--node", "b", "--json"]
    report = json.loads(subprocess.run(argv, capture_output=True, check=True, text=True).stdout)
    assert state(report["groups"]) == state(live["groups"])
    assert set(state(report["groups"])) == wanted - {"239.1.1.9"}
    assert {r["group"] for r in report["neighbours"][0]["routes"]} == a_view
    assert report["frames"]["mcmw_output"] >= 20  # the stream b wrote, and its queries: not fed back

    # --live: synthetic hosts into the running b's TAP, flat out.
    synthetic = tmp_path / "live.pcap"
    mkcapture.build(
        [
            "-o",
            str(synthetic),
            "--first-group",
            "239.8.8.1",
            "--hosts",
            "4",
            "--groups",
            "2",
            "--duration",
            "5",
            "--leave",
            "0",
        ]
    )
    argv = [
        sys.executable,
        "-m",
        "mcmw",
        "replay",
        str(synthetic),
        "-c",
        str(sites.tree),
        "--node",
        "b",
        "--live",
        "--speed",
        "0",
        "--json",
    ]
    result = lab.exec(sites.ns["b"], argv)
    assert json.loads(result.stdout)["sent"] == 8
    wait_for(
        lambda: sites.group("b", "239.8.8.1") and sites.group("b", "239.8.8.2"), 5, "b to learn the hosts"
    )

    # --live at the capture's pace times --speed: five joins 0.4 s apart in the capture,
    # at speed 4, reach the TAP 0.1 s apart, as a capture on the TAP shows.
    joins = [(0.4 * i, join(f"169.254.101.{i + 1}", f"239.9.9.{i + 1}")) for i in range(5)]
    paced, on_tap_path = write(tmp_path / "paced.pcap", joins), lab.workdir / "paced-tap.pcap"
    tcpdump = ["tcpdump", "-i", "mcmw0", "-U", "-w", str(on_tap_path), "ether", "src", HOST_MAC_TEXT]
    on_tap = Capture(lab, sites.ns["b"], on_tap_path, tcpdump, "listening on")
    argv[argv.index(str(synthetic))] = str(paced)
    argv[argv.index("--speed") + 1] = "4"
    result = json.loads(lab.exec(sites.ns["b"], argv).stdout)
    assert result["sent"] == 5 and 0.4 <= result["seconds"] < 0.4 + 0.5, result
    groups = [f"239.9.9.{i + 1}" for i in range(5)]
    wait_for(lambda: all(sites.group("b", g) for g in groups), 5, "b to learn the paced joins")
    wait_for(lambda: frames_in(on_tap_path) == 5, 3, "the paced joins in the TAP capture")
    stamps = [frame.ts_ns / 1e9 for frame in read(on_tap.stop())]
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert all(abs(gap - 0.1) < 0.05 for gap in gaps), gaps
    member.stdin.write("quit\n")
    member.stdin.flush()
    member.wait(timeout=5)
