"""The set-up the querier unit tests share (tests/test_igmp_*.py): per family, the
addresses, the message builders and a started Querier, so that one test body runs for
IGMP and for MLD through the same state machine (RFC 3376 6.4 and RFC 3810 7.4 are one
table). Tests name sources symbolically (S1..S5) and read results back in those names.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest

from igmp import codec_igmp, codec_mld
from igmp.actions import Action, MembershipChange, SendQuery
from igmp.messages import (  # noqa: F401  (re-exported for the tests)
    ALLOW,
    BLOCK,
    IS_EX,
    IS_IN,
    TO_EX,
    TO_IN,
    GroupRecord,
    Message,
)
from igmp.params import QuerierParams
from igmp.querier import Querier

S1, S2, S3, S4, S5 = "S1", "S2", "S3", "S4", "S5"


def ip(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def text(address: bytes) -> str:
    return str(ipaddress.ip_address(address))


@dataclass(frozen=True)
class Fam:
    """One address family as the tests see it."""

    name: str  # "igmp" / "mld", the protocol name in counters and status
    codec: ModuleType
    router: bytes  # the querier under test
    host: bytes
    lower: bytes  # another router that wins the election ...
    higher: bytes  # ... and one that loses it
    group: bytes
    sources: tuple[bytes, ...]  # S1..S5
    newest: int  # IGMPv3 / MLDv2: reports with records
    older: int  # IGMPv2 / MLDv1: the host version whose compatibility mode ignores sources

    @property
    def family(self) -> int:
        return 4 if self.codec is codec_igmp else 6

    def src(self, symbol: str) -> bytes:
        return self.sources[int(symbol[1:]) - 1]

    def symbol(self, address: bytes) -> str:
        return f"S{self.sources.index(address) + 1}"

    def symbols(self, addresses: Iterable[bytes]) -> frozenset[str]:
        return frozenset(self.symbol(a) for a in addresses)

    # -- a querier --

    def querier(self, params: QuerierParams | None = None, now: float = 0.0, **fields: Any) -> Querier:
        """A querier of the newest version (unless `params` or `fields` say otherwise),
        started at `now` (its first general query sent)."""
        if params is None:
            params = QuerierParams(**{"version": self.newest, **fields})
        q = Querier(self.family, params, self.router, now)
        q.start(now)
        return q

    # -- what hosts and other routers send --

    def report(self, *records: tuple[int, bytes, Sequence[str]], src: bytes | None = None) -> bytes:
        """An IGMPv3 / MLDv2 report of (record type, group, source symbols) records."""
        recs = [GroupRecord(t, g, tuple(self.src(s) for s in ss)) for t, g, ss in records]
        return self.codec.build_report(self.newest, src or self.host, records=recs)

    def record(self, rtype: int, *sources: str, group: bytes | None = None) -> bytes:
        """A report with one record for the test group (or `group`)."""
        return self.report((rtype, group or self.group, sources))

    def old_report(self, version: int | None = None, group: bytes | None = None) -> bytes:
        """An IGMPv1/v2 or MLDv1 report (`version` defaults to `older`)."""
        return self.codec.build_report(version or self.older, self.host, group or self.group)

    def leave(self, group: bytes | None = None, dst: bytes | None = None) -> bytes:
        """An IGMPv2 Leave / MLDv1 Done, to all-routers unless `dst`."""
        build = codec_igmp.build_leave if self.family == 4 else codec_mld.build_done
        args = (dst,) if dst is not None else ()
        return build(self.host, group or self.group, *args)

    def query(
        self,
        src: bytes,
        group: bytes | None = None,
        sources: Sequence[str] = (),
        s_flag: bool = False,
        qrv: int = 2,
        qqi: float = 125.0,
        version: int | None = None,
    ) -> bytes:
        """Another router's query: general, or for `group` (and sources) with LMQI 1 s."""
        packet, _ = self.codec.build_query(
            version or self.newest, src, group, [self.src(s) for s in sources],
            10.0 if group is None else 1.0, s_flag, qrv, qqi,
        )
        return packet


IGMP = Fam(
    name="igmp",
    codec=codec_igmp,
    router=ip("10.0.0.5"),
    host=ip("10.0.0.2"),
    lower=ip("10.0.0.3"),
    higher=ip("10.0.0.9"),
    group=ip("239.1.1.1"),
    sources=tuple(ip(f"192.0.2.{i}") for i in range(1, 6)),
    newest=3,
    older=2,
)
MLD = Fam(
    name="mld",
    codec=codec_mld,
    router=ip("fe80::5"),
    host=ip("fe80::20"),
    lower=ip("fe80::3"),
    higher=ip("fe80::9"),
    group=ip("ff0e::1:2"),
    sources=tuple(ip(f"2001:db8::{i}") for i in range(1, 6)),
    newest=2,
    older=1,
)
# For `pytest.mark.parametrize("fam", FAMILIES)` / `pytestmark`.
FAMILIES = pytest.param(IGMP, id="igmp"), pytest.param(MLD, id="mld")
both_families = pytest.mark.parametrize("fam", FAMILIES)


# -- reading what a querier did --------------------------------------------------------


def queries(actions: Iterable[Action]) -> list[Message]:
    """The queries among `actions`, parsed by their family's codec."""
    out = []
    for a in actions:
        if isinstance(a, SendQuery):
            out.append((codec_igmp if len(a.destination) == 4 else codec_mld).parse(a.packet))
    return out


def changes(actions: Iterable[Action]) -> list[MembershipChange]:
    return [a for a in actions if isinstance(a, MembershipChange)]


def fwd(q: Querier) -> dict[bytes, tuple[str, frozenset[bytes]]]:
    """Every group's forwarding state (RFC 3376 6.3)."""
    return {c.group: (c.mode, c.sources) for c in q.forwarding()}


def run_until(q: Querier, end: float) -> list[tuple[float, Action]]:
    """Drive expire() at each deadline up to `end`; (time, action) of everything done."""
    out: list[tuple[float, Action]] = []
    while (t := q.next_deadline()) is not None and t <= end:
        out += [(t, a) for a in q.expire(t)]
    return out
