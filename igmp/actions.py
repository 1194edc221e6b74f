"""What the querier asks its owner to do: send a packet, or update forwarding."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SendQuery:
    """A complete IP packet (IPv4+IGMP or IPv6+hop-by-hop+MLD) to send on the link.

    `destination` is the packet's IP destination (4 or 16 bytes), from which the
    sender derives the multicast MAC address.
    """

    packet: bytes
    destination: bytes


@dataclass(frozen=True)
class MembershipChange:
    """The segment's forwarding state for `group` after a change (RFC 3376 6.3).

    mode "include": forward exactly `sources`; mode "exclude": forward all but
    `sources`. No listener left: mode "include" with no sources.
    """

    group: bytes
    mode: str
    sources: frozenset[bytes]


Action = SendQuery | MembershipChange
