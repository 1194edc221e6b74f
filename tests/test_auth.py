"""Integrity objects are standard HMAC-SHA256 (RFC 2104) of the signed bytes, so another
implementation can verify what mcmw seals, and the reverse."""

from __future__ import annotations

import hmac

import pytest

from overlay import codec
from overlay.auth import DIGEST_LEN, Authenticator, IntegrityError, split_integrity
from overlay.codec import IpData, KeepAlive


@pytest.mark.parametrize("key_len", [16, 63, 64, 65, 200])
def test_an_open_sealed_with_any_key_length_is_the_stdlib_hmac(key_len: int) -> None:
    key = bytes(range(256))[:key_len]
    auth = Authenticator({7: key}, nonce=b"n" * 16)
    sealed = auth.seal_open(codec.encode(KeepAlive()))
    assert sealed[-DIGEST_LEN:] == hmac.digest(key, sealed[:-DIGEST_LEN], "sha256")
    inner, key_id = Authenticator({7: key}, nonce=b"m" * 16).unseal_open(sealed)
    assert (inner, key_id) == (codec.encode(KeepAlive()), 7)


def test_session_messages_carry_the_stdlib_hmac_under_the_session_key() -> None:
    sender = Authenticator({1: b"k" * 20}, nonce=b"d" * 16)
    receiver = Authenticator({1: b"k" * 20}, nonce=b"a" * 16)
    for auth in (sender, receiver):
        auth.start_session(1, b"d" * 16, b"a" * 16)
    assert sender.session_key is not None
    message = codec.encode(IpData(overlay_address=0xEF010101, seq=1, packet=bytes([0x45]) + bytes(19 + 1316)))
    sealed = sender.seal(message)
    assert sealed[-DIGEST_LEN:] == hmac.digest(sender.session_key, sealed[:-DIGEST_LEN], "sha256")
    assert split_integrity(sealed)[2] == 1  # the first sequence number
    assert receiver.unseal(sealed) == message
    tampered = sealed[: -DIGEST_LEN - 1] + bytes([sealed[-DIGEST_LEN - 1] ^ 1]) + sealed[-DIGEST_LEN:]
    with pytest.raises(IntegrityError, match="bad HMAC"):
        receiver.unseal(tampered)
