"""Parsed IGMP/MLD messages: plain data shared by both codecs, the querier and `decode`."""

from __future__ import annotations

from dataclasses import dataclass, field

# RFC 3376 4.2.12 / RFC 3810 5.2.12 record types.
MODE_IS_INCLUDE = 1
MODE_IS_EXCLUDE = 2
CHANGE_TO_INCLUDE_MODE = 3
CHANGE_TO_EXCLUDE_MODE = 4
ALLOW_NEW_SOURCES = 5
BLOCK_OLD_SOURCES = 6
# The same, by the short names the RFC 3376 6.4 / RFC 3810 7.4 tables use.
IS_IN, IS_EX, TO_IN, TO_EX, ALLOW, BLOCK = (
    MODE_IS_INCLUDE,
    MODE_IS_EXCLUDE,
    CHANGE_TO_INCLUDE_MODE,
    CHANGE_TO_EXCLUDE_MODE,
    ALLOW_NEW_SOURCES,
    BLOCK_OLD_SOURCES,
)

RECORD_NAMES = {
    MODE_IS_INCLUDE: "MODE_IS_INCLUDE",
    MODE_IS_EXCLUDE: "MODE_IS_EXCLUDE",
    CHANGE_TO_INCLUDE_MODE: "CHANGE_TO_INCLUDE_MODE",
    CHANGE_TO_EXCLUDE_MODE: "CHANGE_TO_EXCLUDE_MODE",
    ALLOW_NEW_SOURCES: "ALLOW_NEW_SOURCES",
    BLOCK_OLD_SOURCES: "BLOCK_OLD_SOURCES",
}


@dataclass(frozen=True)
class GroupRecord:
    """One group record of an IGMPv3/MLDv2 report."""

    type: int
    group: bytes
    sources: tuple[bytes, ...] = ()
    aux_len: int = 0  # in 32-bit words, as on the wire; the data is skipped

    @property
    def name(self) -> str:
        return RECORD_NAMES.get(self.type, f"UNKNOWN_{self.type}")


@dataclass(frozen=True)
class Message:
    """One IGMP or MLD message with the IP fields a router checks.

    `type` is "query", "report", "leave" (IGMPv2) or "done" (MLDv1). Query fields
    are None for other types. `version` follows RFC 3376 7.1 / RFC 3810 8.1 (by
    type and length). Addresses are raw bytes (4 or 16).
    """

    family: int  # 4 or 6
    version: int
    type: str
    raw_type: int
    src: bytes
    dst: bytes
    ttl: int  # IPv4 TTL / IPv6 hop limit
    router_alert: bool
    group: bytes | None = None
    max_resp_s: float | None = None
    s_flag: bool | None = None
    qrv: int | None = None
    qqic: int | None = None
    qqi_s: float | None = None
    sources: tuple[bytes, ...] = ()
    records: tuple[GroupRecord, ...] = field(default_factory=tuple)

    @property
    def protocol(self) -> str:
        return "igmp" if self.family == 4 else "mld"
