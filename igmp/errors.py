"""The one exception the packet parsers raise, and the drop reasons it carries.

Reasons (also the keys of `Querier.drops`):
  truncated        shorter than its headers or counts say
  checksum         IPv4 header, IGMP or ICMPv6 checksum fails
  bad_header       not the IP version expected, or an impossible header length
  fragment         a fragment; membership messages are never fragmented
  unknown_type     not IGMP/MLD, or a message type a router does not process
  bad_source       source address not allowed (e.g. MLD from a non-link-local address)
  bad_destination  destination does not fit the message (RFC 3376 4.2.14, RFC 3810 5)
  bad_ttl          TTL / hop limit is not 1
  no_router_alert  MLD without the hop-by-hop Router Alert (RFC 3810 5.2.13)
  bad_group        group field not a multicast address of the right scope
  over_limit       a new group or source beyond max_groups / max_sources
"""

from __future__ import annotations

from typing import Any


class Malformed(ValueError):
    """A packet a router must drop; `reason` is one of the keys above.

    `message` holds what could be read before the problem was found (a parsed
    message whose checksum failed, for example), so a decoder can still show it.
    """

    def __init__(self, reason: str, detail: str = "", message: Any = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.message = message
