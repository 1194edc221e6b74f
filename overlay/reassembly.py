"""Reassembly of IP packets that crossed a UDP data channel in fragments, bounded.

Per link, at most MAX_PACKETS packets and MAX_BYTES bytes wait for their missing
pieces, each for at most TIMEOUT seconds; what exceeds a bound is dropped and counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

MAX_PACKETS = 64
MAX_BYTES = 1 << 20
TIMEOUT = 2.0
MAX_PACKET = 65575  # IPv6 header + largest payload


@dataclass
class _Partial:
    total: int
    deadline: float
    data: bytearray
    received: int = 0
    pieces: dict[int, int] = field(default_factory=dict)  # offset -> length


class Reassembler:
    def __init__(self) -> None:
        self.partial: dict[int, _Partial] = {}
        self.bytes = 0
        self.drops: Counter[str] = Counter()

    def add(self, packet_id: int, offset: int, total: int, chunk: bytes, now: float) -> bytes | None:
        """Take one piece; return the whole packet once its last piece is in."""
        if not 0 < total <= MAX_PACKET or offset + len(chunk) > total or not chunk:
            self.drops["fragment_invalid"] += 1
            return None
        entry = self.partial.get(packet_id)
        if entry is None:
            self._make_room(total, now)
            entry = self.partial[packet_id] = _Partial(total, now + TIMEOUT, bytearray(total))
            self.bytes += total
        elif entry.total != total:
            self.drops["fragment_invalid"] += 1
            return None
        if offset in entry.pieces:
            self.drops["fragment_duplicate"] += 1
            return None
        entry.pieces[offset] = len(chunk)
        entry.data[offset : offset + len(chunk)] = chunk
        entry.received += len(chunk)
        if entry.received < total:
            return None
        del self.partial[packet_id]
        self.bytes -= total
        if not _tiles(entry.pieces, total):  # overlaps (and so a hole): not a packet to trust
            self.drops["fragment_invalid"] += 1
            return None
        return bytes(entry.data)

    def _make_room(self, total: int, now: float) -> None:
        self.expire(now)
        while self.partial and (len(self.partial) >= MAX_PACKETS or self.bytes + total > MAX_BYTES):
            oldest = next(iter(self.partial))  # dicts keep insertion order: the oldest first
            self.bytes -= self.partial.pop(oldest).total
            self.drops["fragment_evicted"] += 1

    def expire(self, now: float) -> None:
        for packet_id in [p for p, e in self.partial.items() if e.deadline <= now]:
            self.bytes -= self.partial.pop(packet_id).total
            self.drops["fragment_timeout"] += 1


def _tiles(pieces: dict[int, int], total: int) -> bool:
    """Whether the pieces (offset -> length) cover [0, total) exactly once each byte. Byte
    counts alone can sum to `total` with an overlap hiding a hole of the same size."""
    end = 0
    for offset in sorted(pieces):
        if offset != end:
            return False
        end += pieces[offset]
    return end == total
