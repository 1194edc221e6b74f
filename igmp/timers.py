"""A keyed timer queue on caller-supplied time: one deadline per key, earliest first."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable


class TimerQueue:
    """Deadlines by key. Re-setting a key replaces its deadline; stale heap entries are
    skipped lazily and the heap is rebuilt when they outnumber the live ones."""

    def __init__(self) -> None:
        self._when: dict[Hashable, float] = {}
        self._heap: list[tuple[float, int, Hashable]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._when)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._when

    def get(self, key: Hashable) -> float | None:
        return self._when.get(key)

    def set(self, key: Hashable, when: float | None) -> None:
        """Set (or with None, cancel) the deadline of `key`."""
        if when is None:
            self.cancel(key)
            return
        if self._when.get(key) == when:
            return
        self._when[key] = when
        heapq.heappush(self._heap, (when, next(self._seq), key))
        if len(self._heap) > 2 * len(self._when) + 64:
            self._heap = [(w, next(self._seq), k) for k, w in self._when.items()]
            heapq.heapify(self._heap)

    def cancel(self, key: Hashable) -> None:
        self._when.pop(key, None)

    def _clean(self) -> None:
        heap = self._heap
        while heap and self._when.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)

    def next(self) -> float | None:
        """The earliest deadline, or None."""
        self._clean()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> Hashable | None:
        """Remove and return the key with the earliest deadline <= now, or None."""
        self._clean()
        if not self._heap or self._heap[0][0] > now:
            return None
        _, _, key = heapq.heappop(self._heap)
        del self._when[key]
        return key
