"""The querier of one interface: IGMP (family 4) or MLD (family 6), sans-IO.

Composes the codec of the family, the shared group table (state.py) and the
interface-wide timers: general queries (startup, then every Query Interval) and
querier election with the Other Querier Present timer (RFC 3376 6.6.2, RFC 3810 7.6.2).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections import Counter
from typing import Any

from igmp import codec_igmp, codec_mld
from igmp.actions import Action, MembershipChange, SendQuery
from igmp.errors import Malformed
from igmp.messages import MODE_IS_EXCLUDE, RECORD_NAMES, Message
from igmp.params import QuerierParams
from igmp.state import EXCLUDE, INCLUDE, GroupTable, QueryRequest


def _text(addr: bytes) -> str:
    return str(ipaddress.ip_address(addr))


class Querier:
    """Router-side membership for one link. Time is float seconds, passed in."""

    mtu = 1500  # queries are split so that none is larger

    def __init__(self, family: int, params: QuerierParams, address: bytes, now: float) -> None:
        if family not in (4, 6):
            raise ValueError(f"family must be 4 or 6, not {family}")
        if len(address) != (4 if family == 4 else 16):
            raise ValueError(f"address of {len(address)} bytes for family {family}")
        top = 3 if family == 4 else 2
        if not 1 <= params.version <= top:
            raise ValueError(f"{'IGMP' if family == 4 else 'MLD'} version {params.version}")
        self.family = family
        self.address = bytes(address)
        self.configured = params
        self.params = params  # in effect: a non-querier adopts the querier's QRV and QQI
        self.codec = codec_igmp if family == 4 else codec_mld
        self.proto = "igmp" if family == 4 else "mld"
        self.drops: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()
        # Compatibility levels are IGMP-numbered; MLDv1 behaves as IGMPv2, MLDv2 as v3.
        level = params.version if family == 4 else params.version + 1
        self.table = GroupTable(params, level, self.drops)
        self.table.query_groups = level >= 2  # IGMPv1 has no group-specific query
        self.table.query_sources = level >= 3
        self.is_querier = True
        self.querier_address = self.address
        self.created = now
        self._general_next: float | None = None
        self._startup_left = 0
        self._other_querier_until: float | None = None
        self._unspecified = bytes(len(address))
        self._v3 = self.codec.FAMILY.record_version  # the version whose reports carry records

    # -- interface ------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """Begin as querier: the first of the startup general queries goes out now."""
        self._become_querier()
        self._startup_left = self.params.startup_count
        return self._general_query(now)

    def stop(self, now: float) -> list[Action]:
        """Stop querying and forget all members; returns their withdrawal."""
        self._general_next = None
        self._other_querier_until = None
        changes: list[Action] = [MembershipChange(g, INCLUDE, frozenset())
                                 for g in self.table.groups]
        self.table.clear()
        return changes

    def handle(self, packet: bytes, now: float) -> list[Action]:
        """Process one IP packet from the link. Never raises; drops are counted."""
        try:
            return self._handle(bytes(packet), now)
        except Exception:  # a bug must not take the router down; count it instead
            self.drops["internal_error"] += 1
            return []

    def expire(self, now: float) -> list[Action]:
        """Run every timer due by `now`."""
        out: list[Action] = []
        if self._other_querier_until is not None and self._other_querier_until <= now:
            # RFC 3376 6.6.2: the other querier went silent; take over.
            self._become_querier()
            self._general_next = now
        if self.is_querier and self._general_next is not None and self._general_next <= now:
            out += self._general_query(now)
        return out + self._flush(now)

    def next_deadline(self) -> float | None:
        times = [t for t in (self._general_next if self.is_querier else None,
                             self._other_querier_until, self.table.next_deadline())
                 if t is not None]
        return min(times) if times else None

    def forwarding(self) -> list[MembershipChange]:
        """The current forwarding state of every group with listeners."""
        return [MembershipChange(g, *grp.forwarding()) for g, grp in self.table.groups.items()]

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        """Per group, for status display: mode and sources in forwarding terms
        (include: forwarded; exclude: blocked), the requested list X, timers left."""
        out = []
        for g in sorted(self.table.groups.values(), key=lambda g: g.group):
            mode, fwd = g.forwarding()
            level = self.table.level(g, now)
            out.append({
                "group": _text(g.group),
                "mode": mode,
                "sources": sorted(_text(s) for s in fwd),
                "requested": sorted(_text(s) for s in g.requested()) if mode == EXCLUDE else [],
                "source_timers": {_text(s): _left(t, now) for s, t in sorted(g.sources.items())},
                "group_timer_s": _left(g.timer, now) if mode == EXCLUDE else None,
                "compat_version": level if self.family == 4 else level - 1,
                "older_host_timers_s": {"v1": _left(g.v1_until, now),
                                        "v2": _left(g.v2_until, now)},
            })
        return out

    def status(self, now: float) -> dict[str, Any]:
        """Interface-wide querier state, plus the groups of `snapshot`."""
        return {
            "protocol": self.proto,
            "version": self.configured.version,
            "address": _text(self.address),
            "is_querier": self.is_querier,
            "querier": _text(self.querier_address),
            "other_querier_present_s": _left(self._other_querier_until, now),
            "next_general_query_s": _left(self._general_next, now) if self.is_querier else None,
            "robustness": self.params.robustness,
            "query_interval_s": self.params.query_interval,
            "groups": self.snapshot(now),
            "counters": dict(self.counters),
            "drops": dict(self.drops),
        }

    # -- input ----------------------------------------------------------------

    def _handle(self, packet: bytes, now: float) -> list[Action]:
        try:
            msg = self.codec.parse(packet)
        except Malformed as err:
            self.drops[err.reason] += 1
            return []
        reason = self.codec.validate(msg, self.address)
        if reason is not None:
            self.drops[reason] += 1
            return []
        self.counters[f"{self.proto}_v{msg.version}_{msg.type}"] += 1
        if msg.type == "query":
            self._on_query(msg, now)
        elif msg.type in ("leave", "done"):
            assert msg.group is not None
            self.table.leave(msg.group, now)
        elif msg.version == self._v3:
            self._on_records(msg, now)
        else:
            assert msg.group is not None
            # Older reports read as IS_EX({}) and start the group's host timer.
            level = msg.version if self.family == 4 else 2
            self.table.record(msg.group, MODE_IS_EXCLUDE, (), now)
            self.table.host_seen(msg.group, level, now)
        return self._flush(now)

    def _on_records(self, msg: Message, now: float) -> None:
        for rec in msg.records:
            if rec.type not in RECORD_NAMES:
                self.drops["unknown_type"] += 1  # RFC 3376 4.2.12: ignore the record
                continue
            if not self.codec.reportable(rec.group):
                self.drops["bad_group"] += 1
                continue
            self.table.record(rec.group, rec.type, rec.sources, now)

    def _on_query(self, msg: Message, now: float) -> None:
        src = msg.src
        if src == self.address:
            return  # our own query, looped back
        if src != self._unspecified and src < self.address:
            # RFC 3376 6.6.2: the lowest address is querier; equal-length bytes
            # compare like the numbers they spell.
            if self.is_querier:
                self.table.stop_queries()
            self.is_querier = False
            self.table.querier = False
            self.querier_address = src
            self._general_next = None
            self._adopt(msg)
            self._other_querier_until = now + self.params.other_querier_present_interval
        group = msg.group or self._unspecified
        if group != self._unspecified and not msg.s_flag:
            self.table.query_heard(group, msg.sources, now)

    def _adopt(self, msg: Message) -> None:
        """RFC 3376 4.1.6/4.1.7: a non-querier takes the querier's QRV and QQI."""
        changes: dict[str, Any] = {}
        if msg.qrv:
            changes["robustness"] = msg.qrv
        if msg.qqi_s:
            changes["query_interval"] = msg.qqi_s
        if changes:
            self._set_params(dataclasses.replace(self.params, **changes))

    def _set_params(self, params: QuerierParams) -> None:
        self.params = params
        self.table.params = params

    def _become_querier(self) -> None:
        self.is_querier = True
        self.table.querier = True
        self.querier_address = self.address
        self._other_querier_until = None
        self._set_params(self.configured)

    # -- output ---------------------------------------------------------------

    def _general_query(self, now: float) -> list[Action]:
        if self._startup_left > 0:
            self._startup_left -= 1
        interval = (self.params.startup_interval if self._startup_left > 0
                    else self.params.query_interval)
        due = self._general_next
        nxt = (due if due is not None else now) + interval
        self._general_next = nxt if nxt > now else now + interval
        return self._build(None, (), False)

    def _flush(self, now: float) -> list[Action]:
        queries, changes = self.table.flush(now)
        out: list[Action] = []
        for q in queries:
            out += self._build_request(q)
        out += changes
        return out

    def _build_request(self, q: QueryRequest) -> list[Action]:
        return self._build(q.group, q.sources, q.s_flag)

    def _build(self, group: bytes | None, sources: tuple[bytes, ...],
               s_flag: bool) -> list[Action]:
        p = self.params
        max_resp = p.query_response_interval if group is None else p.last_member_query_interval
        chunk = self.codec.max_sources(self.mtu)
        parts = [sources[i:i + chunk] for i in range(0, len(sources), chunk)] or [()]
        out: list[Action] = []
        for part in parts:
            packet, dst = self.codec.build_query(
                self.configured.version, self.address, group, part, max_resp, s_flag,
                p.robustness, p.query_interval)
            out.append(SendQuery(packet, dst))
        return out


def _left(deadline: float | None, now: float) -> float | None:
    return None if deadline is None else round(max(0.0, deadline - now), 3)
