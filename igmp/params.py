"""Querier parameters of RFC 3376 section 8 / RFC 3810 section 9, with their defaults."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuerierParams:
    """Protocol variables of one querier; durations in seconds.

    `version` is the highest version the querier speaks (IGMP 1-3, MLD 1-2).
    """

    version: int = 3
    query_interval: float = 125.0
    query_response_interval: float = 10.0
    robustness: int = 2
    last_member_query_interval: float = 1.0
    last_member_query_count: int | None = None  # None: the Robustness Variable
    startup_query_interval: float | None = None  # None: query_interval / 4
    startup_query_count: int | None = None  # None: the Robustness Variable
    max_groups: int = 1024
    max_sources: int = 256

    @property
    def lmqc(self) -> int:
        if self.last_member_query_count is None:
            return self.robustness
        return self.last_member_query_count

    @property
    def startup_interval(self) -> float:
        if self.startup_query_interval is None:
            return self.query_interval / 4
        return self.startup_query_interval

    @property
    def startup_count(self) -> int:
        return self.robustness if self.startup_query_count is None else self.startup_query_count

    @property
    def group_membership_interval(self) -> float:
        """RFC 3376 8.4: Robustness Variable * Query Interval + Query Response Interval."""
        return self.robustness * self.query_interval + self.query_response_interval

    @property
    def other_querier_present_interval(self) -> float:
        """RFC 3376 8.5: Robustness Variable * Query Interval + Query Response Interval / 2."""
        return self.robustness * self.query_interval + self.query_response_interval / 2

    @property
    def last_member_query_time(self) -> float:
        """RFC 3376 8.14: Last Member Query Interval * Last Member Query Count."""
        return self.last_member_query_interval * self.lmqc

    @property
    def older_host_present_interval(self) -> float:
        """RFC 3376 8.13: same as the Group Membership Interval."""
        return self.group_membership_interval


IGMP_DEFAULTS = QuerierParams(version=3)
MLD_DEFAULTS = QuerierParams(version=2)
