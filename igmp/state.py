"""Group and source state of one interface, shared by IGMPv3 and MLDv2 (RFC 3376 6,
RFC 3810 7): the filter-mode tables, source and group timers, older-host
compatibility and the retransmission state of group(-and-source)-specific queries.

Family-agnostic: addresses are opaque bytes, compatibility levels are in IGMP terms
(1, 2, 3; an MLDv1 host counts as level 2, since MLDv1 is IGMPv2 in IPv6). Time is
passed in. Mutations collect their effects; `flush(now)` runs due timers and returns
the queries to send and the forwarding changes since the previous flush.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from igmp.actions import MembershipChange
from igmp.messages import ALLOW, BLOCK, IS_EX, IS_IN, TO_EX, TO_IN
from igmp.params import QuerierParams
from igmp.timers import TimerQueue

INCLUDE = "include"
EXCLUDE = "exclude"
EPS = 1e-9  # float slack when comparing a remaining time with LMQT

Forwarding = tuple[str, frozenset[bytes]]
NO_LISTENER: Forwarding = (INCLUDE, frozenset())


@dataclass(frozen=True)
class QueryRequest:
    """A group-specific (no sources) or group-and-source-specific query to send."""

    group: bytes
    sources: tuple[bytes, ...]
    s_flag: bool


class Group:
    """One group record. Source deadlines are absolute times; None is a source timer
    of zero, i.e. in EXCLUDE mode a member of the exclude list Y (blocked)."""

    __slots__ = ("group", "mode", "timer", "sources", "v1_until", "v2_until",
                 "gq_left", "gq_next", "rexmit", "sq_next")

    def __init__(self, group: bytes) -> None:
        self.group = group
        self.mode = INCLUDE
        self.timer: float | None = None  # group timer, used in EXCLUDE mode only
        self.sources: dict[bytes, float | None] = {}
        self.v1_until: float | None = None  # older host present timers
        self.v2_until: float | None = None
        self.gq_left = 0  # group-specific queries still to send
        self.gq_next: float | None = None
        self.rexmit: dict[bytes, int] = {}  # source -> queries still to send
        self.sq_next: float | None = None

    def forwarding(self) -> Forwarding:
        if self.mode == INCLUDE:
            return INCLUDE, frozenset(self.sources)
        return EXCLUDE, frozenset(s for s, t in self.sources.items() if t is None)

    def requested(self) -> list[bytes]:
        """EXCLUDE mode's requested list X (sources with running timers)."""
        return [s for s, t in self.sources.items() if t is not None]

    def next_deadline(self) -> float | None:
        times = [t for t in self.sources.values() if t is not None]
        for t in (self.timer if self.mode == EXCLUDE else None, self.v1_until,
                  self.v2_until, self.gq_next, self.sq_next):
            if t is not None:
                times.append(t)
        return min(times) if times else None


class GroupTable:
    """All group records of one interface."""

    def __init__(self, params: QuerierParams, max_level: int = 3,
                 drops: Counter[str] | None = None) -> None:
        self.params = params
        self.max_level = max_level  # the querier's own version, in IGMP terms
        self.drops: Counter[str] = drops if drops is not None else Counter()
        self.querier = True  # only the querier acts on "Send Q(...)" (RFC 3376 6.6.3)
        self.query_groups = True  # can this querier's version express Q(G)?
        self.query_sources = True  # ... and Q(G,S)?
        self.groups: dict[bytes, Group] = {}
        self._timers = TimerQueue()
        self._before: dict[bytes, Forwarding] = {}
        self._queries: list[QueryRequest] = []

    # -- derived timers -------------------------------------------------------

    @property
    def gmi(self) -> float:
        return self.params.group_membership_interval

    @property
    def lmqt(self) -> float:
        return self.params.last_member_query_time

    def level(self, g: Group, now: float) -> int:
        """Group compatibility mode (RFC 3376 7.3.2), capped by our own version."""
        if g.v1_until is not None and g.v1_until > now:
            return min(1, self.max_level)
        if g.v2_until is not None and g.v2_until > now:
            return min(2, self.max_level)
        return self.max_level

    def forwarding(self, group: bytes) -> Forwarding:
        g = self.groups.get(group)
        return g.forwarding() if g else NO_LISTENER

    def next_deadline(self) -> float | None:
        return self._timers.next()

    # -- bookkeeping ----------------------------------------------------------

    def _touch(self, group: bytes) -> None:
        if group not in self._before:
            self._before[group] = self.forwarding(group)

    def _schedule(self, g: Group) -> None:
        if self.groups.get(g.group) is g:
            self._timers.set(g.group, g.next_deadline())

    def _create(self, group: bytes) -> Group | None:
        if len(self.groups) >= self.params.max_groups:
            self.drops["over_limit"] += 1
            return None
        g = self.groups[group] = Group(group)
        return g

    def _delete(self, g: Group) -> None:
        self._touch(g.group)
        self.groups.pop(g.group, None)
        self._timers.cancel(g.group)

    def _room(self, g: Group, new: int) -> int:
        """How many of `new` additional sources fit under max_sources."""
        room = self.params.max_sources - len(g.sources)
        if new > room:
            self.drops["over_limit"] += 1
        return max(0, min(new, room))

    def _limit(self, g: Group, fresh: list[bytes]) -> list[bytes]:
        return fresh[: self._room(g, len(fresh))]

    def _set_timers(self, g: Group, sources: list[bytes], deadline: float) -> None:
        """(B)=GMI in both modes: known sources get `deadline` (in EXCLUDE mode that moves
        a blocked one back to the requested list), new ones too while max_sources allows."""
        known = g.sources
        for s in sources:
            if s in known:
                known[s] = deadline
        for s in self._limit(g, [s for s in sources if s not in known]):
            known[s] = deadline

    # -- inputs ---------------------------------------------------------------

    def record(self, group: bytes, rtype: int, sources: tuple[bytes, ...] | list[bytes],
               now: float) -> None:
        """Apply one current-state or state-change record (RFC 3376 6.4.1, 6.4.2)."""
        g = self.groups.get(group)
        if g is None:
            if rtype not in (IS_EX, TO_EX) and (
                not sources or rtype == BLOCK
            ):
                return  # INCLUDE {} stays INCLUDE {}: nothing to record or query
            if (g := self._create(group)) is None:
                return
        self._touch(group)
        if self.level(g, now) <= 2:
            # RFC 3376 7.3.2: with older hosts present, BLOCK is ignored and source
            # lists of TO_EX are ignored. IS_EX too: an older host wants every source,
            # so no exclude list may block one.
            if rtype == BLOCK:
                self._cleanup(g)
                return
            if rtype in (IS_EX, TO_EX):
                sources = ()
        b = list(dict.fromkeys(sources))  # keep order, drop duplicates
        gmi = now + self.gmi
        if g.mode == INCLUDE:
            self._include_mode(g, rtype, b, gmi, now)
        else:
            self._exclude_mode(g, rtype, b, gmi, now)
        self._cleanup(g)

    def _include_mode(self, g: Group, rtype: int, b: list[bytes], gmi: float,
                      now: float) -> None:
        a = g.sources
        if rtype in (IS_IN, ALLOW, TO_IN):
            # INCLUDE (A+B); (B)=GMI; for TO_IN also Send Q(G,A-B)
            bset = set(b)
            a_minus_b = [s for s in a if s not in bset]
            self._set_timers(g, b, gmi)
            if rtype == TO_IN:
                self._send_q_sources(g, a_minus_b, now)
        elif rtype == BLOCK:
            # INCLUDE (A); Send Q(G,A*B)
            self._send_q_sources(g, [s for s in b if s in a], now)
        elif rtype in (IS_EX, TO_EX):
            # EXCLUDE (A*B, B-A); (B-A)=0; Delete (A-B); Group Timer=GMI;
            # for TO_EX also Send Q(G,A*B)
            both = [s for s in b if s in a]
            new: dict[bytes, float | None] = {s: a[s] for s in both}
            fresh = [s for s in b if s not in a]
            for s in fresh[: max(0, self.params.max_sources - len(new))]:
                new[s] = None
            if len(new) < len(b):
                self.drops["over_limit"] += 1
            g.sources = new
            g.rexmit = {s: n for s, n in g.rexmit.items() if s in new}
            g.mode = EXCLUDE
            g.timer = gmi
            if rtype == TO_EX:
                self._send_q_sources(g, both, now)

    def _exclude_mode(self, g: Group, rtype: int, a: list[bytes], gmi: float,
                      now: float) -> None:
        srcs = g.sources
        # X in table order, not as a set: a set of bytes iterates in an order that
        # changes with PYTHONHASHSEED, and the sources of Q(G,X-A) must not (a replay
        # gives the same bytes on every run).
        x = [s for s, t in srcs.items() if t is not None]
        y = {s for s, t in srcs.items() if t is None}
        if rtype in (IS_IN, ALLOW, TO_IN):
            # EXCLUDE (X+A, Y-A); (A)=GMI; for TO_IN also Send Q(G,X-A), Send Q(G)
            self._set_timers(g, a, gmi)
            if rtype == TO_IN:
                aset = set(a)
                self._send_q_sources(g, [s for s in x if s not in aset], now)
                self._send_q_group(g, now)
        elif rtype == BLOCK:
            # EXCLUDE (X+(A-Y), Y); (A-X-Y)=Group Timer; Send Q(G,A-Y)
            for s in self._limit(g, [s for s in a if s not in srcs]):
                srcs[s] = g.timer
            self._send_q_sources(g, [s for s in a if s not in y], now)
        elif rtype in (IS_EX, TO_EX):
            # EXCLUDE (A-Y, Y*A); (A-X-Y)=GMI for IS_EX, =Group Timer for TO_EX;
            # Delete (X-A), (Y-A); Group Timer=GMI; for TO_EX also Send Q(G,A-Y)
            new: dict[bytes, float | None] = {}
            fresh_timer = gmi if rtype == IS_EX else g.timer
            for s in a:
                if s in srcs:
                    new[s] = srcs[s]
                elif len(new) < self.params.max_sources:
                    new[s] = fresh_timer
                else:
                    self.drops["over_limit"] += 1
            g.sources = new
            g.rexmit = {s: n for s, n in g.rexmit.items() if s in new}
            g.timer = gmi
            if rtype == TO_EX:
                self._send_q_sources(g, [s for s in a if s not in y and s in new], now)

    def leave(self, group: bytes, now: float) -> None:
        """IGMPv2 Leave / MLDv1 Done: TO_IN({}), ignored in IGMPv1 compatibility."""
        g = self.groups.get(group)
        if g is None or self.level(g, now) == 1:
            return
        self.record(group, TO_IN, (), now)

    def host_seen(self, group: bytes, level: int, now: float) -> None:
        """An older-version report (level 1 or 2) for `group`: start its host timer."""
        g = self.groups.get(group)
        if g is None:
            return
        until = now + self.params.older_host_present_interval
        if level == 1:
            g.v1_until = until
        else:
            g.v2_until = until
        self._schedule(g)

    def query_heard(self, group: bytes, sources: tuple[bytes, ...], now: float) -> None:
        """RFC 3376 6.6.1: a specific query with S clear lowers the timers it names."""
        g = self.groups.get(group)
        if g is None:
            return
        limit = now + self.lmqt
        if not sources:
            if g.mode == EXCLUDE and g.timer is not None and g.timer > limit + EPS:
                g.timer = limit
        for s in sources:
            t = g.sources.get(s)
            if t is not None and t > limit + EPS:
                g.sources[s] = limit
        self._schedule(g)

    def clear(self) -> None:
        """Forget every group (the router stops)."""
        self.groups.clear()
        self._timers = TimerQueue()
        self._before.clear()
        self._queries.clear()

    def stop_queries(self) -> None:
        """Forget pending retransmissions (we stopped being the querier)."""
        for g in self.groups.values():
            g.gq_left, g.gq_next, g.sq_next = 0, None, None
            g.rexmit.clear()
            self._schedule(g)

    # -- Send Q(...) (RFC 3376 6.6.3) -------------------------------------------

    def _send_q_group(self, g: Group, now: float) -> None:
        if not (self.querier and self.query_groups) or self.params.lmqc < 1:
            return
        limit = now + self.lmqt
        if g.mode == EXCLUDE and g.timer is not None and g.timer > limit + EPS:
            g.timer = limit
        g.gq_left = self.params.lmqc
        g.gq_next = now  # sent by the flush that ends this input

    def _send_q_sources(self, g: Group, sources: list[bytes], now: float) -> None:
        if not (self.querier and self.query_sources) or self.params.lmqc < 1:
            return
        limit = now + self.lmqt
        for s in sources:
            t = g.sources.get(s)
            if t is not None and t > limit + EPS:
                g.sources[s] = limit
                g.rexmit[s] = self.params.lmqc
                g.sq_next = now

    def _cleanup(self, g: Group) -> None:
        if g.mode == INCLUDE and not g.sources:
            self._delete(g)
        else:
            self._schedule(g)

    # -- timers -----------------------------------------------------------------

    def flush(self, now: float) -> tuple[list[QueryRequest], list[MembershipChange]]:
        """Run every timer due by `now`; return queries to send and forwarding changes."""
        while (key := self._timers.pop_due(now)) is not None:
            g = self.groups.get(key)  # type: ignore[arg-type]
            if g is not None:
                self._run(g, now)
        queries, self._queries = self._queries, []
        changes = []
        for group, before in self._before.items():
            after = self.forwarding(group)
            if after != before:
                changes.append(MembershipChange(group, after[0], after[1]))
        self._before.clear()
        return queries, changes

    def _due(self, g: Group, now: float) -> list[tuple[float, int, bytes]]:
        due: list[tuple[float, int, bytes]] = []
        for t, prio in ((g.v1_until, 0), (g.v2_until, 1)):
            if t is not None and t <= now:
                due.append((t, prio, b""))
        due.extend((t, 2, s) for s, t in g.sources.items() if t is not None and t <= now)
        if g.mode == EXCLUDE and g.timer is not None and g.timer <= now:
            due.append((g.timer, 3, b""))
        if g.gq_next is not None and g.gq_next <= now:
            due.append((g.gq_next, 4, b""))
        if g.sq_next is not None and g.sq_next <= now:
            due.append((g.sq_next, 5, b""))
        due.sort()
        return due

    def _run(self, g: Group, now: float) -> None:
        """Process `g`'s due timers in time order (expiries before queries on ties)."""
        while self.groups.get(g.group) is g and (due := self._due(g, now)):
            for t, kind, source in due:
                if self.groups.get(g.group) is not g:
                    return
                self._fire(g, t, kind, source)
        self._schedule(g)

    def _fire(self, g: Group, t: float, kind: int, source: bytes) -> None:
        if kind == 0:
            g.v1_until = None
        elif kind == 1:
            g.v2_until = None
        elif kind == 2:
            if g.sources.get(source, -1.0) != t:
                return  # changed by an earlier event of this round
            self._touch(g.group)
            g.rexmit.pop(source, None)
            if g.mode == INCLUDE:
                # RFC 3376 6.3: stop forwarding; the last source takes the group along.
                del g.sources[source]
                if not g.sources:
                    self._delete(g)
            else:
                g.sources[source] = None  # moves to the exclude list
        elif kind == 3:
            if g.timer != t:
                return
            # RFC 3376 6.5: back to INCLUDE with the sources whose timers still run.
            self._touch(g.group)
            running = {s: u for s, u in g.sources.items() if u is not None and u > t}
            if not running:
                self._delete(g)
                return
            g.mode, g.timer, g.sources = INCLUDE, None, running  # type: ignore[assignment]
            g.rexmit = {s: n for s, n in g.rexmit.items() if s in running}
        elif kind == 4:
            self._group_query(g, t)
        elif kind == 5:
            self._source_query(g, t)

    def _group_query(self, g: Group, t: float) -> None:
        if not self.querier or g.gq_left <= 0:
            g.gq_left, g.gq_next = 0, None
            return
        s_flag = g.mode == EXCLUDE and g.timer is not None and g.timer - t > self.lmqt + EPS
        self._queries.append(QueryRequest(g.group, (), s_flag))
        g.gq_left -= 1
        g.gq_next = t + self.params.last_member_query_interval if g.gq_left else None

    def _source_query(self, g: Group, t: float) -> None:
        # RFC 3376 6.6.3.2: one query with S set for sources whose timers a report
        # raised above LMQT meanwhile, one with S clear for the rest.
        high: list[bytes] = []
        low: list[bytes] = []
        for s in list(g.rexmit):
            u = g.sources.get(s)
            if u is None:
                del g.rexmit[s]
                continue
            (high if u - t > self.lmqt + EPS else low).append(s)
        if not self.querier:
            g.rexmit.clear()
        if high and self.querier:
            self._queries.append(QueryRequest(g.group, tuple(high), True))
        if low and self.querier:
            self._queries.append(QueryRequest(g.group, tuple(low), False))
        for s in high + low:
            if s in g.rexmit:
                g.rexmit[s] -= 1
                if g.rexmit[s] <= 0:
                    del g.rexmit[s]
        g.sq_next = t + self.params.last_member_query_interval if g.rexmit else None
