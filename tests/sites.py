"""Sites for end-to-end tests: a line or star of namespaces, each with a running mcmw."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mcmw.lab import Lab, status_or_none, wait_for

APPS = Path(__file__).resolve().parent / "apps"


@dataclass
class Sites:
    lab: Lab
    tree: Path
    ns: dict[str, str] = field(default_factory=dict)
    sockets: dict[str, str] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[Any]] = field(default_factory=dict)
    veths: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)  # link -> devices
    trees: dict[str, Path] = field(default_factory=dict)  # nodes with a tree file of their own
    doc: dict[str, Any] = field(
        default_factory=lambda: {
            "overlay": {"address_bits": 24, "mapping": "modulo"},
            "nodes": {},
            "links": [],
        }
    )

    def add_node(self, name: str, options: dict[str, Any] | None = None) -> None:
        """A namespace for `name` and its entry in the tree (written by `write`)."""
        index = len(self.ns) + 1
        self.ns[name] = self.lab.ns(name)
        self.doc["nodes"][name] = {
            "listen": f"127.0.0.1:{7000 + index}",  # an acceptor listens on its veth instead
            "tap": {"name": "mcmw0", "address": f"169.254.1.{index}/16"},
            **(options or {}),
        }

    def add_link(self, dialer: str, acceptor: str) -> None:
        """A veth between the two sites and the tree link; the acceptor listens on it."""
        index = len(self.doc["links"]) + 1
        self.veths[(dialer, acceptor)] = self.lab.veth(
            self.ns[dialer], f"198.18.{index}.1/24", self.ns[acceptor], f"198.18.{index}.2/24"
        )
        self.doc["nodes"][acceptor]["listen"] = f"198.18.{index}.2:7000"
        self.doc["links"].append([dialer, acceptor])

    def write(self) -> None:
        self.tree.write_text(yaml.safe_dump(self.doc, sort_keys=False))

    def own_tree(self, name: str, overlay: dict[str, Any] | None = None, key: str | None = None) -> Path:
        """A tree file for `name` alone, as on another host: the shared tree with `overlay`
        changed, in a folder of its own, with its own key file when `key` is given. `start`
        uses it from now on."""
        folder = self.lab.workdir / f"host-{name}"
        folder.mkdir(exist_ok=True)
        doc = {**self.doc, "overlay": {**self.doc["overlay"], **(overlay or {})}}
        if key is not None:
            (folder / "psk.key").write_text(key)
            (folder / "psk.key").chmod(0o600)
            doc["overlay"]["secret_file"] = "psk.key"
        path = folder / "tree.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        self.trees[name] = path
        return path

    def start(self, name: str) -> None:
        tree = self.trees.get(name, self.tree)
        self.procs[name], self.sockets[name] = self.lab.start_node(self.ns[name], tree, name)

    def status(self, node: str) -> dict[str, Any]:
        status = status_or_none(self.sockets[node])
        assert status is not None, f"node {node} does not answer: {self.lab.node_log(node)}"
        return status

    def group(self, node: str, group: str) -> dict[str, Any] | None:
        return next((g for g in self.status(node)["groups"] if g["group"] == group), None)

    def wait_peers_up(self, timeout: float = 15) -> None:
        for node in self.ns:
            wait_for(
                lambda n=node: all(p["state"] == "up" for p in self.status(n)["peers"]),
                timeout,
                f"every link of {node} up",
            )

    def receiver(
        self,
        node: str,
        group: str,
        count: int,
        timeout: float,
        source: str | None = None,
        port: int = 5004,
    ) -> subprocess.Popen[str]:
        args = [
            sys.executable,
            str(APPS / "mc_recv.py"),
            group,
            str(port),
            str(count),
            str(timeout),
        ]
        if source:
            args.append(source)
        proc = self.lab.popen(self.ns[node], args, text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "joined"
        return proc

    def sender(
        self,
        node: str,
        group: str,
        count: int,
        rate: float,
        ttl: int = 16,
        port: int = 5004,
        size: int = 200,
    ) -> subprocess.Popen[str]:
        args = [
            sys.executable,
            str(APPS / "mc_send.py"),
            group,
            str(port),
            str(count),
            str(rate),
            str(ttl),
            str(size),
        ]
        return self.lab.popen(self.ns[node], args, text=True)

    def source_receiver(
        self,
        node: str,
        group: str,
        idle: float,
        count: int = 0,
        include: tuple[str, ...] = (),
        exclude: tuple[str, ...] = (),
        port: int = 5004,
    ) -> subprocess.Popen[str]:
        """tests/apps/mc_recv_src.py in `node`'s site: per-source sequence numbers; stops on
        `count`, after `idle` seconds without data, or on SIGTERM (see `report`)."""
        args = [sys.executable, str(APPS / "mc_recv_src.py"), group, str(port), str(idle)]
        if count:
            args += ["--count", str(count)]
        if include:
            args += ["--include", *include]
        if exclude:
            args += ["--exclude", *exclude]
        proc = self.lab.popen(self.ns[node], args, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "joined":
            proc.wait(timeout=5)
            error = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"receiver in {node} did not join: {line!r} {error}")
        return proc

    def peer(self, node: str, name: str) -> dict[str, Any]:
        """`node`'s status entry for its neighbour `name`."""
        return next(p for p in self.status(node)["peers"] if p["name"] == name)

    def tap_address(self, node: str) -> str:
        return str(self.doc["nodes"][node]["tap"]["address"]).split("/")[0]

    def route_state(self, node: str) -> dict[str, Any]:
        """What a fresh start must reproduce: per group the local filter and the neighbours
        that asked for it, and which links are up."""
        status = self.status(node)
        groups = {
            g["group"]: (
                None if not g["local"] else (g["local"]["mode"], tuple(g["local"]["sources"])),
                tuple(g["peers"]),
            )
            for g in status["groups"]
        }
        return {"groups": groups, "peers": {p["name"]: p["state"] for p in status["peers"]}}


def report(proc: subprocess.Popen[str], timeout: float = 60, stop: bool = False) -> dict[str, Any]:
    """The JSON report of a `Sites.source_receiver`; with `stop`, SIGTERM it first."""
    if stop and proc.poll() is None:
        proc.terminate()
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def received(proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def make_sites(
    lab: Lab,
    names: list[str],
    links: list[tuple[str, str]],
    overlay: dict[str, Any] | None = None,
    node_options: dict[str, dict[str, Any]] | None = None,
) -> Sites:
    """A namespace per node, a veth per link (dialer -> acceptor), mcmw started in each."""
    sites = Sites(lab, lab.workdir / "tree.yaml")
    sites.doc["overlay"].update(overlay or {})
    for name in names:
        sites.add_node(name, (node_options or {}).get(name))
    for dialer, acceptor in links:
        sites.add_link(dialer, acceptor)
    sites.write()
    for name in names:
        sites.start(name)
    return sites


# -- an analytic model of a tree: what a fresh start must converge to -------------------


@dataclass(frozen=True)
class Want:
    """A receiver application in `node`'s site: `group` in `mode` with `sources`."""

    node: str
    group: str
    mode: str = "exclude"
    sources: tuple[str, ...] = ()

    def admits(self, source: str) -> bool:
        return (source in self.sources) == (self.mode == "include")


@dataclass(frozen=True)
class Stream:
    """`count` packets of `group` sent in `node`'s site, from its TAP address `source`."""

    node: str
    source: str
    group: str
    count: int


def behind(links: list[list[str]], node: str, peer: str) -> set[str]:
    """The sites reached through `node`'s neighbour `peer` (its side of the tree)."""
    seen, todo = {node, peer}, [peer]
    while todo:
        here = todo.pop()
        for a, b in links:
            for x, y in ((a, b), (b, a)):
                if x == here and y not in seen:
                    seen.add(y)
                    todo.append(y)
    return seen - {node}


def expected_groups(
    links: list[list[str]], node: str, wants: list[Want]
) -> dict[str, tuple[tuple[str, tuple[str, ...]] | None, tuple[str, ...]]]:
    """`node`'s route state for the wanted groups (the shape of `Sites.route_state`):
    the local filter, and every neighbour with a receiver of the group behind it."""
    neighbours = sorted({y for a, b in links for x, y in ((a, b), (b, a)) if x == node})
    result: dict[str, tuple[tuple[str, tuple[str, ...]] | None, tuple[str, ...]]] = {}
    for group in sorted({w.group for w in wants}):
        local = [w for w in wants if w.group == group and w.node == node]
        assert len(local) <= 1, "the model keeps one receiver per site and group"
        peers = tuple(
            peer
            for peer in neighbours
            if any(w.group == group and w.node in behind(links, node, peer) for w in wants)
        )
        if local or peers:
            result[group] = ((local[0].mode, tuple(sorted(local[0].sources))) if local else None, peers)
    return result


def expected_link_packets(
    links: list[list[str]], wants: list[Want], streams: list[Stream]
) -> dict[tuple[str, str], int]:
    """IP-Data messages each directed link (sender, receiver) carries for `streams`: a
    packet crosses a link only towards a receiver that admits its source."""
    counts: dict[tuple[str, str], int] = {}
    for a, b in links:
        for u, v in ((a, b), (b, a)):
            far = behind(links, u, v)
            counts[(u, v)] = sum(
                s.count
                for s in streams
                if s.node not in far
                and any(w.group == s.group and w.node in far and w.admits(s.source) for w in wants)
            )
    return counts


def expected_delivered(wants: list[Want], streams: list[Stream]) -> dict[str, int]:
    """Packets each site's node writes into its TAP for `streams`."""
    delivered: dict[str, int] = {}
    for s in streams:
        for node in {w.node for w in wants if w.group == s.group and w.admits(s.source)} - {s.node}:
            delivered[node] = delivered.get(node, 0) + s.count
    return delivered


# -- checks against the model ------------------------------------------------------------

Counters = dict[tuple[str, str], int]


def wait_route_state(sites: Sites, wants: list[Want], timeout: float = 10) -> None:
    """Every running node's state for the wanted groups equals the model's; assert (with
    the diff) if it does not within `timeout`."""
    groups = {w.group for w in wants}
    links = sites.doc["links"]

    def actual() -> dict[str, object]:
        return {
            node: {g: v for g, v in sites.route_state(node)["groups"].items() if g in groups}
            for node in sites.sockets
        }

    expected = {node: expected_groups(links, node, wants) for node in sites.sockets}
    try:
        wait_for(lambda: actual() == expected, timeout, "the route state of every node")
    except TimeoutError:
        assert actual() == expected, "route state (local filter, peers) differs from the model"


def link_counters(sites: Sites) -> tuple[Counters, Counters]:
    """IP-Data per directed link (u, v): as counted by u (tx) and by v (rx)."""
    tx: Counters = {}
    rx: Counters = {}
    for node in sites.sockets:
        for peer in sites.status(node)["peers"]:
            tx[(node, peer["name"])] = peer["tx_packets"]
            rx[(peer["name"], node)] = peer["rx_packets"]
    return tx, rx


def delivered(sites: Sites) -> dict[str, int]:
    return {node: sites.status(node)["counters"].get("delivered", 0) for node in sites.sockets}


def receive_count(want: Want, streams: list[Stream]) -> int:
    return sum(
        s.count for s in streams if s.group == want.group and want.admits(s.source) and s.node != want.node
    )


def check_streams(sites: Sites, wants: list[Want], streams: list[Stream], rate: float = 1000.0) -> Counters:
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

    senders = [sites.sender(s.node, s.group, s.count, rate) for s in streams]
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
    got_delivered = {node: after[node] - delivered_before[node] for node in sites.sockets}
    want_delivered = {node: expected_delivered(wants, streams).get(node, 0) for node in sites.sockets}
    assert got_delivered == want_delivered, "packets written into each TAP"
    return tx
