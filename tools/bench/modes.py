"""The paths a multicast stream takes from namespace A to namespace B.

Each mode is a context manager that builds its namespaces (with mcmw.lab, the test bed
the tests use too), starts its forwarders and yields a `BenchPath`: where to run the
sender and the receiver, which processes do the forwarding (their CPU time is what we
charge per packet) and a hook for the path's own counters. Leaving the context tears
everything down, also on failure.

mcmw modes are named `mcmw[-udp][-auth][-N]`: the UDP data channel, authentication on
(a `secret_file` in the tree), and N groups besides the stream's in node a's routing
table towards b (receivers in B join them), e.g. `mcmw-udp-auth-1000`.
"""

from __future__ import annotations

import functools
import json
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from topology import GROUP, TAP_A, TAP_B, VETH_A, VETH_B, mcmw_tree, other_groups

from mcmw.lab import Lab, LabError, run, status_or_none, stop, wait_for
from tap.device import TX_QUEUE_FRAMES

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
C_PROGRAMS = ("mcsend", "mcrecv", "relay")
# How to run mcmw; run.py's --mcmw replaces it (e.g. another checkout, for before/after).
DEFAULT_MCMW = [str(REPO / ".venv" / "bin" / "python"), "-m", "mcmw"]
MCMW_COMMAND: list[str] = list(DEFAULT_MCMW)

# Joins groups on B's segment and holds them (a process per mode, killed at teardown).
# Linux allows 20 memberships per socket by default (net.ipv4.igmp_max_memberships), so
# one socket per 20 groups; the interface is the one 224.0.0.0/4 is routed to (mcmw0).
JOIN_GROUPS = """
import json, socket, sys, time
sockets = []
for index, group in enumerate(sys.argv[1:]):
    if index % 20 == 0:
        sockets.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    request = socket.inet_aton(group) + socket.inet_aton("0.0.0.0")
    sockets[-1].setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, request)
print(json.dumps({"ready": True}), flush=True)
while True:
    time.sleep(3600)
"""


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


def build_helpers(dest: Path) -> dict[str, Path]:
    """Compile the C helpers with gcc -O2 into dest (a temp dir: no binaries in the repo)."""
    bins = {}
    for name in C_PROGRAMS:
        out = dest / name
        libs = ["-lcrypto"] if name == "relay" else []  # its udp-auth transport's HMAC
        run(["gcc", "-O2", "-Wall", "-o", str(out), str(HERE / f"{name}.c"), *libs], timeout=120)
        bins[name] = out
    return bins


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
    """A: app -> TAP -> relay.c -UDP (or TCP) over veth-> relay.c -> TAP -> app: B.
    `udp-auth`: UDP with every datagram sealed and checked with HMAC-SHA256."""
    a, b = lab.ns("ra", cpu=0), lab.ns("rb", cpu=1)
    lab.veth(a, f"{VETH_A}/24", b, f"{VETH_B}/24")
    tap = lab.ifname("t")
    relays: dict[str, subprocess.Popen[Any]] = {}
    path: BenchPath | None = None
    # TCP: b accepts, a dials, so b starts first (as in the mcmw tree).
    roles = {"a": "tcp-dial", "b": "tcp-accept"} if transport == "tcp" else {"a": transport, "b": transport}
    # `env` execs in place, so the PID is still the relay's (its CPU is what is charged).
    key = ["env", f"RELAY_KEY={secrets.token_hex(16)}"] if transport == "udp-auth" else []
    try:
        for name, ns, mine, peer, addr in (
            ("relay-b", b, VETH_B, VETH_A, TAP_B),
            ("relay-a", a, VETH_A, VETH_B, TAP_A),
        ):
            role = roles[name[-1]]
            relays[name] = lab.start_ready(
                ns, [*key, str(bins["relay"]), tap, f"{mine}:7100", f"{peer}:7100", role]
            )
            lab.exec(ns, ["ip", "addr", "add", f"{addr}/16", "dev", tap])
            # The same queue as mcmw gives its own TAP: the paths differ only in the relay.
            lab.exec(ns, ["ip", "link", "set", tap, "up", "txqueuelen", str(TX_QUEUE_FRAMES)])
            lab.exec(ns, ["ip", "route", "add", "224.0.0.0/4", "dev", tap])
            # The stream's source (A's TAP address) arrives on B's TAP; keep the reverse
            # path filter out of the way, as mcmw does on its own TAP.
            lab.sysctl(ns, **{"net.ipv4.conf.all.rp_filter": 0, f"net.ipv4.conf.{tap}.rp_filter": 0})
        hold_group(lab, bins, b, TAP_B)
        path = BenchPath(
            {"udp": "c-relay", "tcp": "c-relay-tcp", "udp-auth": "c-relay-auth"}[transport],
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


@contextmanager
def mcmw_path(
    lab: Lab,
    bins: dict[str, Path],
    mode: str = "mcmw",
    transport: str = "tcp",
    auth: bool = False,
    groups: int = 0,
) -> Iterator[BenchPath]:
    """Two `mcmw run` nodes, a in A and b in B, linked over a veth; optionally over the
    UDP data channel, authenticated, and with `groups` more groups routed from a to b."""
    a, b = lab.ns("ma", cpu=0), lab.ns("mb", cpu=1)
    lab.veth(a, f"{VETH_A}/24", b, f"{VETH_B}/24")
    secret = None
    if auth:
        key = lab.workdir / "psk.key"
        key.write_text(f"1 {secrets.token_hex(24)}\n")
        key.chmod(0o600)
        secret = key.name  # relative to the tree file, as an operator would write it
    tree = lab.workdir / "tree.yaml"
    tree.write_text(mcmw_tree(transport, secret))
    # This checkout's mcmw runs from the repository; another command (--mcmw) from the
    # scratch directory, so that `-m mcmw` finds its own checkout, not the one in cwd.
    cwd = REPO if MCMW_COMMAND == DEFAULT_MCMW else lab.workdir
    nodes: dict[str, subprocess.Popen[Any]] = {}
    socks: dict[str, str] = {}

    def status(node: str) -> dict[str, Any]:
        if nodes[node].poll() is not None:
            raise LabError(f"mcmw node {node} exited {nodes[node].returncode}: {lab.node_log(node)}")
        return status_or_none(socks[node]) or {}

    def peer_up(node: str) -> bool:
        return any(p.get("state") == "up" for p in status(node).get("peers", []))

    def group_of(node: str) -> dict[str, Any] | None:
        return next((g for g in status(node).get("groups", []) if g.get("group") == GROUP), None)

    def routes_to_b() -> int:
        """Groups in node a's table that b asked for."""
        return sum("b" in g.get("peers", []) for g in status("a").get("groups", []))

    try:
        # b accepts, a dials ("first dials, second accepts"): start b first.
        for node, ns in (("b", b), ("a", a)):
            nodes[node], socks[node] = lab.start_node(ns, tree, node, MCMW_COMMAND, cwd)
        for node in ("a", "b"):
            wait_for(lambda n=node: peer_up(n), 30, f"mcmw {node}: peer up", 0.2)
        # The receiver joins by route: 224/4 dev mcmw0 is mcmw's own route in B.
        hold_group(lab, bins, b, None)
        if groups:
            lab.start_ready(b, [sys.executable, "-c", JOIN_GROUPS, *other_groups(groups)], timeout=30)
        wait_for(
            lambda: (g := group_of("b")) is not None and bool(g.get("local")),
            30,
            f"mcmw b: {GROUP} joined locally",
            0.2,
        )
        # Node a must have heard b's interest (Add-Route) before the sender starts.
        wait_for(
            lambda: (g := group_of("a")) is not None and "b" in g.get("peers", []),
            30,
            f"mcmw a: route for {GROUP} towards b",
            0.2,
        )
        routes = wait_for(
            lambda: (n := routes_to_b()) >= groups + 1 and n,
            60,
            f"mcmw a: {groups + 1} routes towards b",
            0.5,
        )

        def counters() -> dict[str, Any]:
            out: dict[str, Any] = {}
            for node in ("a", "b"):
                st = status_or_none(socks[node]) or {}
                out[node] = {
                    "tap": st.get("tap"),
                    "counters": st.get("counters"),
                    "peers": [
                        {k: p.get(k) for k in ("transport", "tx_packets", "rx_packets", "key_id")}
                        for p in st.get("peers", [])
                    ],
                }
            return out

        used = sorted(str(p.get("transport")) for p in status("a").get("peers", []))
        path = BenchPath(
            mode,
            a,
            b,
            None,
            forwarders={"mcmw-a": nodes["a"].pid, "mcmw-b": nodes["b"].pid},
            counters=counters,
            describe=(
                f"A --TAP--> mcmw a --{'/'.join(used)}/veth--> mcmw b --TAP--> B"
                f"{', authenticated' if auth else ''}, {routes} routes a->b"
            ),
        )
        path.extra.update(peer_transport=used, authenticated=auth, routes_a_to_b=routes)
        yield path
    finally:
        for node, proc in nodes.items():
            stop(proc)
            if proc.returncode not in (0, None, -15):
                print(f"bench: mcmw {node} exited {proc.returncode}: {lab.node_log(node)}", file=sys.stderr)


PathFactory = Callable[[Lab, dict[str, Path]], AbstractContextManager[BenchPath]]

MODES: dict[str, PathFactory] = {
    "kernel": kernel_path,
    "c-relay": crelay_path,
    "c-relay-tcp": functools.partial(crelay_path, transport="tcp"),
    "c-relay-auth": functools.partial(crelay_path, transport="udp-auth"),
}
# The mcmw modes listed in --help; any other `mcmw[-udp][-auth][-N]` works too.
MCMW_MODES = ("mcmw", "mcmw-udp", "mcmw-udp-auth-1000")


def mode_path(name: str) -> PathFactory | None:
    """The path of a mode name, or None for a name that is not one."""
    if name in MODES:
        return MODES[name]
    parts = name.split("-")
    if parts[0] != "mcmw":
        return None
    options: dict[str, Any] = {}
    for part in parts[1:]:
        if part == "udp" and "transport" not in options:
            options["transport"] = "udp"
        elif part == "auth" and "auth" not in options:
            options["auth"] = True
        elif part.isdigit() and "groups" not in options:
            options["groups"] = int(part)
        else:
            return None
    return functools.partial(mcmw_path, mode=name, **options)
