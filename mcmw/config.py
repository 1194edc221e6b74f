"""The tree file: load, validate, and describe one node's view of the tree."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from igmp.params import IGMP_DEFAULTS, MLD_DEFAULTS, QuerierParams

MAPPINGS = ("identity", "modulo", "hash")


class ConfigError(Exception):
    """A tree file is invalid. str() is one line: 'FILE:LINE: KEY: what is wrong'."""


@dataclass(frozen=True)
class TapConfig:
    name: str
    address: ipaddress.IPv4Interface
    mtu: int = 1500
    # IPv6 multicast scopes routed into the TAP (ff0X::/16 for each X listed).
    ipv6_scopes: tuple[int, ...] = (0x3, 0x4, 0x5, 0x8, 0xE)


@dataclass(frozen=True)
class NodeConfig:
    name: str
    listen: tuple[str, int]
    tap: TapConfig
    udp: int | None = None
    igmp: QuerierParams = IGMP_DEFAULTS
    mld: QuerierParams = MLD_DEFAULTS


@dataclass(frozen=True)
class OverlayConfig:
    address_bits: int = 24
    mapping: str = "modulo"
    secret_file: Path | None = None
    ttl: str = "hop"  # "hop": each overlay hop decrements; "link": the overlay is one link
    keepalive_interval: float = 3.0
    dead_interval: float = 10.0


@dataclass(frozen=True)
class Link:
    dialer: str
    acceptor: str


@dataclass(frozen=True)
class TreeConfig:
    path: Path
    overlay: OverlayConfig
    nodes: dict[str, NodeConfig]
    links: tuple[Link, ...] = field(default_factory=tuple)

    def neighbours(self, name: str) -> list[tuple[str, bool]]:
        """The peers of node `name`, each with True when `name` dials that link."""
        result: list[tuple[str, bool]] = []
        for link in self.links:
            if link.dialer == name:
                result.append((link.acceptor, True))
            elif link.acceptor == name:
                result.append((link.dialer, False))
        return result


def load_tree(path: str | Path) -> TreeConfig:
    """Read and validate a tree file; raise ConfigError with a one-line message."""
    raise NotImplementedError
