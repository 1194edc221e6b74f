"""Message authentication: COPS Integrity objects (C-Num 16) with HMAC-SHA256.

Each Open is sealed with a pre-shared key (named by its key id, so keys can be rolled:
every key in the key file is accepted, the first one signs). Everything after the Open
exchange is sealed with a per-connection session key derived from both Opens' random
nonces, so nothing recorded from another connection can be replayed into this one;
within a connection, sequence numbers only go up (TCP) or fall inside a sliding window
(UDP, which may reorder).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from pathlib import Path

from overlay.codec import COMMON_HEADER, HEADER_LEN, CodecError

CNUM_INTEGRITY = 16
DIGEST_LEN = 32
INTEGRITY_HEAD = struct.Struct("!HBBII")  # object header, key id, sequence number
INTEGRITY_LEN = INTEGRITY_HEAD.size + DIGEST_LEN  # 44
REPLAY_WINDOW = 1024
_WINDOW_MASK = (1 << REPLAY_WINDOW) - 1


class IntegrityError(CodecError):
    """A message failed its Integrity check (bad HMAC, unknown key, replay)."""


class KeyFileError(ValueError):
    """The secret file does not hold usable keys."""


def load_keys(path: Path) -> dict[int, bytes]:
    """Keys from a file of `KEYID SECRET` lines (or one bare SECRET, key id 1); the first
    line's key signs. Blank lines and '#' comments are skipped."""
    keys: dict[int, bytes] = {}
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: cannot read keys: {exc}") from None
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split()
        if len(parts) == 1 and not keys:
            key_id, secret = 1, parts[0]
        elif len(parts) == 2 and parts[0].isdigit() and 0 < int(parts[0]) < 2**32:
            key_id, secret = int(parts[0]), parts[1]
        else:
            raise KeyFileError(f"{path}:{number}: expected 'KEYID SECRET' (key id 1 to 2^32-1)")
        if len(secret) < 16:
            raise KeyFileError(f"{path}:{number}: key {key_id} is shorter than 16 characters")
        if key_id in keys:
            raise KeyFileError(f"{path}:{number}: key id {key_id} appears twice")
        keys[key_id] = secret.encode()
    if not keys:
        raise KeyFileError(f"{path}: no key in the file")
    return keys


class _HmacSha256:
    """HMAC-SHA256 under one key, with the key's padded blocks hashed once: a copy of
    those states per message saves two of the ~25 compressions a 1400-byte HMAC costs,
    and the per-call key setup of hmac.digest (about 40 % of its time)."""

    __slots__ = ("_inner", "_outer")

    def __init__(self, key: bytes) -> None:
        if len(key) > 64:  # RFC 2104: keys longer than the block are hashed first
            key = hashlib.sha256(key).digest()
        block = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in block))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in block))

    def digest(self, message: bytes | bytearray | memoryview) -> bytes:
        """The HMAC of `message`."""
        inner = self._inner.copy()
        inner.update(message)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


def _sealed(
    parts: tuple[bytes | bytearray | memoryview, ...], key_id: int, seq: int, mac: _HmacSha256
) -> bytes:
    """The message made of `parts`, whose header counts the Integrity object already,
    with that object appended. Joined first and hashed in one piece: a copy of ~1400
    bytes costs less than a hash update per part."""
    body = b"".join((*parts, INTEGRITY_HEAD.pack(INTEGRITY_LEN, CNUM_INTEGRITY, 1, key_id, seq)))
    return body + mac.digest(body)


def _seal(message: bytes | bytearray, key_id: int, seq: int, mac: _HmacSha256) -> bytes:
    """`message` with an Integrity object appended and its length field updated."""
    head = COMMON_HEADER.unpack_from(message)
    header = COMMON_HEADER.pack(head[0], head[1], head[2], len(message) + INTEGRITY_LEN)
    return _sealed((header, memoryview(message)[HEADER_LEN:]), key_id, seq, mac)


def _integrity_at(message: bytes | memoryview) -> tuple[int, int, int]:
    """(offset, key id, seq) of the Integrity object ending `message`; IntegrityError if
    there is none."""
    start = len(message) - INTEGRITY_LEN
    if start < HEADER_LEN:
        raise IntegrityError("integrity object missing")
    length, cnum, ctype, key_id, seq = INTEGRITY_HEAD.unpack_from(message, start)
    if (length, cnum, ctype) != (INTEGRITY_LEN, CNUM_INTEGRITY, 1):
        raise IntegrityError("integrity object missing")
    return start, key_id, seq


def split_integrity(message: bytes) -> tuple[bytes, int, int, bytes]:
    """(message without its Integrity object, key id, seq, digest); CodecError if absent."""
    start, key_id, seq = _integrity_at(message)
    head = COMMON_HEADER.unpack_from(message)
    inner = COMMON_HEADER.pack(head[0], head[1], head[2], start) + message[HEADER_LEN:start]
    return inner, key_id, seq, message[start + INTEGRITY_HEAD.size :]


class Authenticator:
    """The integrity state of one connection."""

    def __init__(self, keys: dict[int, bytes], nonce: bytes) -> None:
        self.keys = keys
        self.signing_id = next(iter(keys))
        self.nonce = nonce
        self._session_key: bytes | None = None
        self._session_mac: _HmacSha256 | None = None
        self.tx_seq = 0
        self.rx_seq = 0
        self.udp_top = 0
        self.udp_seen = 0  # bitmap of the REPLAY_WINDOW sequence numbers below udp_top

    @property
    def session_key(self) -> bytes | None:
        return self._session_key

    @session_key.setter
    def session_key(self, key: bytes | None) -> None:
        self._session_key = key
        self._session_mac = None if key is None else _HmacSha256(key)

    def seal_open(self, message: bytes) -> bytes:
        return _seal(message, self.signing_id, 0, _HmacSha256(self.keys[self.signing_id]))

    def unseal_open(self, message: bytes) -> tuple[bytes, int]:
        """Verify a message sealed with a pre-shared key (the peer's Open, or its Close
        before a session); return it without the Integrity object, and the key id."""
        inner, key_id, _, digest = split_integrity(message)
        key = self.keys.get(key_id)
        if key is None:
            raise IntegrityError(f"integrity: unknown key id {key_id}")
        expected = _HmacSha256(key).digest(memoryview(message)[:-DIGEST_LEN])
        if not hmac.compare_digest(expected, digest):
            raise IntegrityError("integrity: bad HMAC on open")
        return inner, key_id

    def start_session(self, dialer_key_id: int, dialer_nonce: bytes, acceptor_nonce: bytes) -> None:
        key = self.keys[dialer_key_id]
        self.session_key = hmac.digest(key, b"mcmw-session" + dialer_nonce + acceptor_nonce, "sha256")

    def seal(self, message: bytes | bytearray) -> bytes:
        assert self._session_mac is not None
        self.tx_seq += 1
        return _seal(message, 0, self.tx_seq, self._session_mac)

    def seal_parts(self, parts: tuple[bytes | bytearray | memoryview, ...], seq: int | None = None) -> bytes:
        """A message from its `parts`, whose header counts the Integrity object already
        (no header to rewrite, one copy less than `seal`): a datagram with its `seq`, or
        without one the stream's next message."""
        assert self._session_mac is not None
        if seq is None:
            self.tx_seq = seq = self.tx_seq + 1
        return _sealed(parts, 0, seq, self._session_mac)

    def seal_datagram(self, message: bytes | bytearray, seq: int) -> bytes:
        assert self._session_mac is not None
        return _seal(message, 0, seq, self._session_mac)

    def unseal(self, message: bytes) -> bytes:
        """Verify a stream message; return it without the Integrity object."""
        self.verify(message)
        return split_integrity(message)[0]

    def verify(self, message: bytes | memoryview) -> None:
        """Check a stream message in place: HMAC, and a sequence number above the last."""
        seq = self._check(message)
        if seq <= self.rx_seq:
            raise IntegrityError(f"integrity: replayed sequence number {seq}")
        self.rx_seq = seq

    def unseal_datagram(self, message: bytes) -> bytes:
        """Verify a datagram; return it without the Integrity object."""
        self.verify_datagram(message)
        return split_integrity(message)[0]

    def verify_datagram(self, message: bytes | memoryview) -> None:
        """Check a datagram in place: HMAC, and each sequence number accepted once,
        within a sliding window (UDP may reorder)."""
        seq = self._check(message)
        if seq > self.udp_top:
            shift = seq - self.udp_top
            self.udp_seen = ((self.udp_seen << shift) | 1) & _WINDOW_MASK
            self.udp_top = seq
            return
        back = self.udp_top - seq
        if back >= REPLAY_WINDOW or self.udp_seen >> back & 1:
            raise IntegrityError(f"integrity: replayed or stale datagram {seq}")
        self.udp_seen |= 1 << back

    def _check(self, message: bytes | memoryview) -> int:
        """The sequence number of a message sealed with the session key; IntegrityError
        if it is not."""
        if self._session_mac is None:
            raise IntegrityError("integrity: message before the session key")
        _, key_id, seq = _integrity_at(message)
        view = memoryview(message)
        expected = self._session_mac.digest(view[:-DIGEST_LEN])
        if key_id != 0 or not hmac.compare_digest(expected, view[-DIGEST_LEN:]):
            raise IntegrityError("integrity: bad HMAC")
        return seq
