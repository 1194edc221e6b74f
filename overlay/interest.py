"""Interest propagation over the static tree, sans-IO.

A neighbour hears of a group (and of its sources) when the local segment or any
*other* neighbour wants it; what it hears is the union of those filters, in the
INCLUDE/EXCLUDE algebra of RFC 3376 section 3.2.
"""

from __future__ import annotations

from dataclasses import dataclass

INCLUDE, EXCLUDE = "include", "exclude"


@dataclass(frozen=True)
class Filter:
    """Which sources of a group are wanted: INCLUDE these, or EXCLUDE these (= all others)."""

    mode: str
    sources: frozenset[bytes] = frozenset()

    def admits(self, source: bytes) -> bool:
        return (source in self.sources) == (self.mode == INCLUDE)

    @property
    def empty(self) -> bool:
        return self.mode == INCLUDE and not self.sources

    @property
    def any_source(self) -> bool:
        return self.mode == EXCLUDE and not self.sources


ANY_SOURCE = Filter(EXCLUDE)


def union(a: Filter, b: Filter) -> Filter:
    """The filter that admits what either admits."""
    if a.mode == INCLUDE and b.mode == INCLUDE:
        return Filter(INCLUDE, a.sources | b.sources)
    if a.mode == EXCLUDE and b.mode == EXCLUDE:
        return Filter(EXCLUDE, a.sources & b.sources)
    inc, exc = (a, b) if a.mode == INCLUDE else (b, a)
    return Filter(EXCLUDE, exc.sources - inc.sources)


# An update for one neighbour: (peer, group, filter) where filter None means "withdraw".
Update = tuple[str, bytes, Filter | None]


class Interest:
    """What the segment and each neighbour want, and what each neighbour has been told."""

    def __init__(self) -> None:
        self.local: dict[bytes, Filter] = {}
        self.requested: dict[str, dict[bytes, Filter]] = {}  # per up neighbour: its asks
        self.told: dict[str, dict[bytes, Filter]] = {}  # per up neighbour: our asks of it

    def wanted_by(self, peer: str | None, group: bytes) -> Filter | None:
        """Union of the local segment's and every neighbour's interest but `peer`'s."""
        result = self.local.get(group)
        for other, asks in self.requested.items():
            if other == peer:
                continue
            want = asks.get(group)
            if want is not None:
                result = want if result is None else union(result, want)
        if result is not None and result.empty:
            return None
        return result

    def _refresh(self, group: bytes, only: str | None = None) -> list[Update]:
        updates: list[Update] = []
        for peer, told in self.told.items():
            if only is not None and peer != only:
                continue
            want = self.wanted_by(peer, group)
            if told.get(group) != want:
                if want is None:
                    del told[group]
                else:
                    told[group] = want
                updates.append((peer, group, want))
        return updates

    def set_local(self, group: bytes, want: Filter | None) -> list[Update]:
        if want is None or want.empty:
            self.local.pop(group, None)
        else:
            self.local[group] = want
        return self._refresh(group)

    def set_requested(self, peer: str, group: bytes, want: Filter | None) -> list[Update]:
        asks = self.requested.get(peer)
        if asks is None:
            return []
        if want is None or want.empty:
            asks.pop(group, None)
        else:
            asks[group] = want
        return self._refresh(group)

    def groups(self) -> set[bytes]:
        result = set(self.local)
        for asks in self.requested.values():
            result.update(asks)
        return result

    def peer_up(self, peer: str) -> list[Update]:
        """A neighbour's link came up: it hears everything it should, from scratch."""
        self.requested[peer] = {}
        self.told[peer] = {}
        updates: list[Update] = []
        for group in sorted(self.groups()):
            updates.extend(self._refresh(group, only=peer))
        return updates

    def peer_down(self, peer: str) -> list[Update]:
        """A neighbour's link went down: its asks are withdrawn from everyone else."""
        asks = self.requested.pop(peer, {})
        self.told.pop(peer, None)
        updates: list[Update] = []
        for group in sorted(asks):
            updates.extend(self._refresh(group))
        return updates
