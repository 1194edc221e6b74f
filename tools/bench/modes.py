"""The three paths a multicast stream takes from namespace A to namespace B.

Each mode is a context manager that builds its namespaces, starts its forwarders and
yields a `BenchPath`: where to run the sender and the receiver, which processes do the
forwarding (their CPU time is what we charge per packet) and a hook for the path's own
counters. Leaving the context tears everything down, also on failure.

Addresses: veths in 198.18.0.0/15 (RFC 2544 benchmark range), TAPs in 169.254/16.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import REPO, Lab, LabError, stop, wait_for

GROUP = "239.1.1.1"
VETH_A, VETH_B = "198.18.0.1", "198.18.0.2"
TAP_A, TAP_B = "169.254.1.1", "169.254.1.2"
# How to run mcmw; run.py's --mcmw replaces it (e.g. another checkout, for before/after).
MCMW_COMMAND: list[str] = [str(REPO / ".venv" / "bin" / "python"), "-m", "mcmw"]


@dataclass
class BenchPath:
    mode: str
    ns_send: str
    ns_recv: str
    recv_ifaddr: str | None  # interface address the receiver joins on; None = by route
    forwarders: dict[str, int] = field(default_factory=dict)  # name -> PID
    counters: Callable[[], dict[str, Any]] | None = None  # the path's own counters
    describe: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # filled at teardown


def hold_group(lab: Lab, bins: dict[str, Path], ns: str, ifaddr: str | None) -> None:
    """Keep GROUP joined in ns for the whole mode (a socket on another port that never
    reads), so per-trial receivers joining and leaving cause no IGMP churn."""
    argv = [str(bins["mcrecv"]), "-g", GROUP, "-H"]
    if ifaddr:
        argv += ["-i", ifaddr]
    lab.start_ready(ns, argv)


@contextmanager
def kernel_path(lab: Lab, bins: dict[str, Path]) -> Iterator[BenchPath]:
    """Sender in A, receiver in B, one veth, 224/4 routed onto it: the kernel carries
    the stream natively (veth xmit + softirq), no user space in between."""
    a, b = lab.ns("ka", cpu=0), lab.ns("kb", cpu=1)
    va, vb = lab.veth(a, f"{VETH_A}/24", b, f"{VETH_B}/24")
    lab.exec(a, ["ip", "route", "add", "224.0.0.0/4", "dev", va])
    lab.exec(b, ["ip", "route", "add", "224.0.0.0/4", "dev", vb])
    hold_group(lab, bins, b, VETH_B)
    yield BenchPath("kernel", a, b, VETH_B, describe=f"A --veth {va}/{vb}--> B, kernel only")


@contextmanager
def crelay_path(lab: Lab, bins: dict[str, Path], transport: str = "udp") -> Iterator[BenchPath]:
    """A: app -> TAP -> relay.c -UDP (or TCP) over veth-> relay.c -> TAP -> app: B."""
    a, b = lab.ns("ra", cpu=0), lab.ns("rb", cpu=1)
    lab.veth(a, f"{VETH_A}/24", b, f"{VETH_B}/24")
    tap = lab.ifname("t")
    relays: dict[str, subprocess.Popen[Any]] = {}
    path: BenchPath | None = None
    # TCP: b accepts, a dials, so b starts first (as in the mcmw tree).
    roles = {"a": "tcp-dial", "b": "tcp-accept"} if transport == "tcp" else {"a": "udp", "b": "udp"}
    try:
        for name, ns, mine, peer, addr in (
            ("relay-b", b, VETH_B, VETH_A, TAP_B),
            ("relay-a", a, VETH_A, VETH_B, TAP_A),
        ):
            role = roles[name[-1]]
            relays[name] = lab.start_ready(
                ns, [str(bins["relay"]), tap, f"{mine}:7100", f"{peer}:7100", role]
            )
            lab.exec(ns, ["ip", "addr", "add", f"{addr}/16", "dev", tap])
            lab.exec(ns, ["ip", "link", "set", tap, "up"])
            lab.exec(ns, ["ip", "route", "add", "224.0.0.0/4", "dev", tap])
            # The stream's source (A's TAP address) arrives on B's TAP; keep the reverse
            # path filter out of the way, as mcmw does on its own TAP.
            lab.sysctl(ns, **{"net.ipv4.conf.all.rp_filter": 0, f"net.ipv4.conf.{tap}.rp_filter": 0})
        hold_group(lab, bins, b, TAP_B)
        path = BenchPath(
            "c-relay" if transport == "udp" else f"c-relay-{transport}",
            a,
            b,
            TAP_B,
            forwarders={n: p.pid for n, p in sorted(relays.items())},
            describe=f"A --TAP {tap}--> relay.c --{transport}/veth--> relay.c --TAP--> B",
        )
        yield path
    finally:
        # The relays print their own counters on SIGTERM: keep them as diagnostics.
        for name, proc in relays.items():
            stop(proc)
            out = (proc.stdout.read() if proc.stdout else "").strip()
            try:
                final = json.loads(out.splitlines()[-1]) if out else {}
            except ValueError:
                final = {"stdout": out[-500:]}
            if path is not None:
                path.extra[name] = final


def mcmw_status(sock: Path) -> dict[str, Any] | None:
    """`mcmw status --socket SOCK --json`, or None while the node does not answer."""
    try:
        proc = subprocess.run(
            [*MCMW_COMMAND, "status", "--socket", str(sock), "--json"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=REPO,
        )
    except subprocess.TimeoutExpired:
        return None
    if proc.returncode != 0:
        return None
    try:
        value = json.loads(proc.stdout)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def mcmw_tree(transport: str) -> str:
    """The two-node tree file; with transport 'udp' both nodes announce a UDP data port."""
    udp = "    udp: 7001\n" if transport == "udp" else ""
    return (
        "overlay:\n"
        "  address_bits: 24\n"
        "  mapping: modulo\n"
        "nodes:\n"
        "  a:\n"
        f"    listen: {VETH_A}:7000\n{udp}"
        f"    tap: {{name: mcmw0, address: {TAP_A}/16}}\n"
        "  b:\n"
        f"    listen: {VETH_B}:7000\n{udp}"
        f"    tap: {{name: mcmw0, address: {TAP_B}/16}}\n"
        "links:\n"
        "  - [a, b]\n"
    )


@contextmanager
def mcmw_path(lab: Lab, bins: dict[str, Path], transport: str = "tcp") -> Iterator[BenchPath]:
    """Two `mcmw run` nodes, a in A and b in B, linked over a veth."""
    a, b = lab.ns("ma", cpu=0), lab.ns("mb", cpu=1)
    lab.veth(a, f"{VETH_A}/24", b, f"{VETH_B}/24")
    tree = lab.workdir / "tree.yaml"
    tree.write_text(mcmw_tree(transport))
    socks = {"a": lab.workdir / "a.sock", "b": lab.workdir / "b.sock"}
    nodes: dict[str, subprocess.Popen[Any]] = {}
    logs: dict[str, Path] = {}

    def log_tail(node: str) -> str:
        text = logs[node].read_text(errors="replace") if logs[node].exists() else ""
        return " | ".join(text.strip().splitlines()[-5:])

    def check_alive() -> None:
        for node, proc in nodes.items():
            if proc.poll() is not None:
                raise LabError(f"mcmw node {node} exited {proc.returncode}: {log_tail(node)}")

    def peer_up(node: str) -> bool:
        check_alive()
        st = mcmw_status(socks[node])
        return bool(st) and any(p.get("state") == "up" for p in st.get("peers", []))

    def group_of(node: str) -> dict[str, Any] | None:
        check_alive()
        st = mcmw_status(socks[node]) or {}
        return next((g for g in st.get("groups", []) if g.get("group") == GROUP), None)

    try:
        # b accepts, a dials ("first dials, second accepts"): start b first.
        for node, ns in (("b", b), ("a", a)):
            logs[node] = lab.workdir / f"{node}.log"
            with logs[node].open("w") as log:
                nodes[node] = lab.popen(
                    ns,
                    [
                        *MCMW_COMMAND,
                        "run",
                        "-c",
                        str(tree),
                        "--node",
                        node,
                        "--socket",
                        str(socks[node]),
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                )
        for node in ("a", "b"):
            wait_for(f"mcmw {node}: peer up", lambda n=node: peer_up(n), 30, 0.2)
        # The receiver joins by route: 224/4 dev mcmw0 is mcmw's own route in B.
        hold_group(lab, bins, b, None)
        wait_for(
            f"mcmw b: {GROUP} joined locally",
            lambda: (g := group_of("b")) is not None and bool(g.get("local")),
            30,
            0.2,
        )
        # Node a must have heard b's interest (Add-Route) before the sender starts.
        wait_for(
            f"mcmw a: route for {GROUP} towards b",
            lambda: (g := group_of("a")) is not None and "b" in g.get("peers", []),
            30,
            0.2,
        )

        def counters() -> dict[str, Any]:
            out: dict[str, Any] = {}
            for node in ("a", "b"):
                st = mcmw_status(socks[node]) or {}
                out[node] = {
                    "tap": st.get("tap"),
                    "counters": st.get("counters"),
                    "peers": [
                        {k: p.get(k) for k in ("transport", "tx_packets", "rx_packets")}
                        for p in st.get("peers", [])
                    ],
                }
            return out

        st_a = mcmw_status(socks["a"]) or {}
        used = {p.get("transport") for p in st_a.get("peers", [])}
        path = BenchPath(
            f"mcmw-{transport}" if transport != "tcp" else "mcmw",
            a,
            b,
            None,
            forwarders={"mcmw-a": nodes["a"].pid, "mcmw-b": nodes["b"].pid},
            counters=counters,
            describe=f"A --TAP--> mcmw a --{'/'.join(sorted(map(str, used)))}/veth--> mcmw b --TAP--> B",
        )
        path.extra["peer_transport"] = sorted(map(str, used))
        yield path
    finally:
        for node, proc in nodes.items():
            stop(proc)
            if proc.returncode not in (0, None, -15):
                print(
                    f"bench: mcmw {node} exited {proc.returncode}: {log_tail(node)}",
                    file=sys.stderr,
                )


MODES: dict[str, Callable[..., Any]] = {
    "kernel": kernel_path,
    "c-relay": crelay_path,
    "c-relay-tcp": lambda lab, bins: crelay_path(lab, bins, "tcp"),
    "mcmw": mcmw_path,
    "mcmw-udp": lambda lab, bins: mcmw_path(lab, bins, "udp"),
}
