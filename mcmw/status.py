"""The status document of a node (SPEC.md "Status") and its human-readable form.

Beyond SPEC.md's keys (docs/operations.md lists them all), for scripts:

- `peers[].last_error`: for a neighbour that is down, why its last connection closed,
  whether it had been up (dead interval, Close with the peer's reason) or failed before
  (a mismatched Open, refused either way, failed Integrity, the peer hanging up), or
  for a neighbour not reached since the start, why dialing it fails.
- `connection_errors`: `{REMOTE_ADDRESS: {node, role, reason, count, last_s_ago}}`, newest
  first, for connections that closed before their link came up; the only trace of an
  unknown or unauthenticated peer. `node` is the neighbour dialed or the name the peer's
  Open gave (null when no Open was read), `role` is `dial` or `accept`, `count` how many
  such connections that address made so far. At most 64 addresses are kept (the oldest go).
- `counters.connection_errors`: all connections that closed before their link came up.
- `counters.ignored_route_limit`: Add-Route entries ignored because the neighbour already
  had 65536 groups, or the entry named more than 4096 sources (a flood, not a need).
- `counters.widened_routes`: routes asked as "every source" because the sources wanted
  did not fit one route object (4094 IPv6, 16379 IPv4).
- `peers[].key_id` (up links): the id of the pre-shared key the link's session key derives
  from (the dialer's signing key), null when the tree is not authenticated; during a key
  roll it shows which links still run on the old key.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mcmw.node import Node


def address_text(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


def _address_key(text: str) -> tuple[int, int]:
    """IPv4 before IPv6, each in address order."""
    address = ipaddress.ip_address(text)
    return address.version, int(address)


def node_status(node: Node, now: float) -> dict[str, Any]:
    local_state: dict[str, dict[str, Any]] = {}
    queriers = {}
    for family, querier in (("igmp", node.igmp), ("mld", node.mld)):
        snapshot = querier.status(now)
        for group in snapshot["groups"]:
            local_state[group["group"]] = group
        queriers[family] = {k: v for k, v in snapshot.items() if k != "groups"}
    groups = []
    for group in sorted(node.interest.groups(), key=lambda g: (len(g), g)):
        text = address_text(group)
        local = node.interest.local.get(group)
        entry: dict[str, Any] = {
            "group": text,
            "overlay_address": node.map_group(group),
            "local": None,
            "peers": sorted(peer for peer, asks in node.interest.requested.items() if group in asks),
        }
        if local is not None:
            learned = local_state.get(text, {})
            entry["local"] = {
                "mode": local.mode,
                "sources": sorted(address_text(s) for s in local.sources),
                "compat_version": learned.get("compat_version"),
                **{
                    k: v
                    for k, v in learned.items()
                    if k not in ("group", "mode", "sources", "compat_version")
                },
            }
        groups.append(entry)
    # Groups the segment wants that this node keeps inside its site (`boundaries`): no
    # route, so not above, but a local member an operator looks for. (Link-local groups,
    # which every host joins, are never carried by any node and not listed.)
    listed = {entry["group"] for entry in groups}
    for text, learned in local_state.items():
        address = ipaddress.ip_address(text)
        if text in listed or not any(address in prefix for prefix in node.config.boundaries):
            continue
        if learned["mode"] == "include" and not learned["sources"]:
            continue  # nobody on the segment wants it any more
        groups.append(
            {
                "group": text,
                "overlay_address": node.map_group(address.packed),
                "local": {k: v for k, v in learned.items() if k != "group"},
                "peers": [],
                "boundary": True,  # inside this node's boundaries: never carried
            }
        )
    groups.sort(key=lambda entry: _address_key(entry["group"]))
    peers = []
    for peer, dials in node.neighbours.items():
        link = node.links.get(peer)
        entry = {
            "name": peer,
            "state": "up" if link is not None else "down",
            "role": "dial" if dials else "accept",
            "transport": link.transport if link is not None else "tcp",
        }
        if link is not None:
            entry.update(
                rtt_ms=None if link.rtt_ms is None else round(link.rtt_ms, 3),
                tx_packets=link.tx_packets,
                rx_packets=link.rx_packets,
                rx_bytes=link.rx_bytes,
                rx_lost=link.rx_lost,
                rx_reordered=link.rx_reordered,
                dropped_queue=link.dropped_queue,
                dropped_auth=link.dropped_auth,
                **link.reassembly.drops,
                authenticated=link.auth is not None,
                key_id=link.session_key_id if link.auth is not None else None,
                up_s=round(now - link.opened_at, 1),
            )
        else:
            entry.update(rtt_ms=None, tx_packets=0, rx_packets=0)
            if peer in node.last_errors:
                entry["last_error"] = node.last_errors[peer]
        peers.append(entry)
    # Connections that closed before their link came up, by remote address, newest first:
    # the one place that shows why an unknown or unauthenticated peer, or a neighbour whose
    # Open did not match, never got a link (a neighbour's shows as its last_error too).
    connection_errors = {
        address: {
            "node": failed.node,
            "role": failed.role,
            "reason": failed.reason,
            "count": failed.count,
            "last_s_ago": round(now - failed.at, 1),
        }
        for address, failed in reversed(node.connection_errors.items())
    }
    return {
        "node": node.name,
        "uptime_s": round(now - node.started, 1),
        "tap": {
            "name": node.config.tap.name,
            "address": str(node.config.tap.address),
            "rx_frames": node.tap_rx,
            "tx_frames": node.tap_tx,
        },
        "groups": groups,
        "peers": peers,
        "counters": {"forwarded": node.forwarded, "delivered": node.delivered, **node.counters},
        "connection_errors": connection_errors,
        "queriers": queriers,
        "membership_drops": {
            "igmp": dict(node.igmp.drops),
            "mld": dict(node.mld.drops),
        },
    }


def format_status(status: dict[str, Any]) -> str:
    """A few lines for a terminal."""
    tap = status["tap"]
    lines = [
        f"node {status['node']}  up {status['uptime_s']}s  tap {tap['name']} "
        f"rx {tap['rx_frames']} tx {tap['tx_frames']}",
        "peers:",
    ]
    for peer in status["peers"]:
        rtt = "" if peer.get("rtt_ms") is None else f" rtt {peer['rtt_ms']}ms"
        why = f"  ({peer['last_error']})" if peer.get("last_error") else ""
        lines.append(
            f"  {peer['name']:<12} {peer['state']:<5} tx {peer['tx_packets']} "
            f"rx {peer['rx_packets']}{rtt}{why}"
        )
    if status.get("connection_errors"):
        lines.append("failed connections (before up):")
    for address, failed in status.get("connection_errors", {}).items():
        # repr: the name comes from whoever connected; it must not break the lines.
        who = f" ({failed['node']!r})" if failed.get("node") else ""
        lines.append(
            f"  {address}{who}: {failed['count']} failed connection(s), last {failed['last_s_ago']}s ago: "
            f"{failed['reason']}"
        )
    lines.append("groups:")
    for group in status["groups"]:
        local = group["local"]
        here = "-" if local is None else f"{local['mode']} {','.join(local['sources']) or '{}'}"
        where = (
            "(boundary: not carried)" if group.get("boundary") else f"peers {','.join(group['peers']) or '-'}"
        )
        lines.append(
            f"  {group['group']:<20} overlay {group['overlay_address']:<10} local {here:<20} {where}"
        )
    counters = "  ".join(f"{k} {v}" for k, v in sorted(status["counters"].items()))
    lines.append(f"counters: {counters}")
    return "\n".join(lines)
