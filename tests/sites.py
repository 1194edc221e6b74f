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
        self.lab.veth(self.ns[dialer], f"198.18.{index}.1/24", self.ns[acceptor], f"198.18.{index}.2/24")
        self.doc["nodes"][acceptor]["listen"] = f"198.18.{index}.2:7000"
        self.doc["links"].append([dialer, acceptor])

    def write(self) -> None:
        self.tree.write_text(yaml.safe_dump(self.doc, sort_keys=False))

    def start(self, name: str) -> None:
        self.procs[name], self.sockets[name] = self.lab.start_node(self.ns[name], self.tree, name)

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
