"""The forwarding table: per group, which links and whether the local segment get a packet."""

from __future__ import annotations

from dataclasses import dataclass, field

from overlay.interest import Filter
from overlay.link import PeerLink


@dataclass
class GroupRoute:
    """Outputs of one group, laid out for the per-packet path.

    `links_any` want every source; `links_some` want the sources their filter admits;
    `local` is the segment's filter (None: no local member).
    """

    group: bytes
    overlay_address: int
    eth_header: bytes
    links_any: list[PeerLink] = field(default_factory=list)
    links_some: list[tuple[PeerLink, Filter]] = field(default_factory=list)
    local: Filter | None = None
    local_any: bool = False  # the segment wants every source: no per-packet source test
    # IP-Data heads for packets of one size (the last seen): size, plain, with Integrity.
    prefixes: tuple[int, bytes, bytes] = (-1, b"", b"")

    @property
    def idle(self) -> bool:
        return not self.links_any and not self.links_some and self.local is None
