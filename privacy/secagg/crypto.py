"""The protocol's cryptography, all from well-kept libraries; nothing here is home-made.

- Key agreement: X25519 (``cryptography``), the agreed secret run through HKDF-SHA256 with a
  purpose label, so one key pair never yields the same key for two uses.
- Share encryption between two hospitals (relayed by the coordinator): ChaCha20-Poly1305 AEAD,
  the round and both node ids bound as associated data, so a share cannot be replayed to
  another hospital or round.
- Secret sharing: Shamir over GF(2^128) through Flower's wrapper
  (``flwr.common.secure_aggregation.crypto.shamir``, which uses pycryptodome).
- Masks: the ChaCha20 keystream of a 32-byte seed, read as little-endian uint32 words (a
  cipher used as a PRG, as SecAgg+ specifies with AES-CTR).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from core.flower_compat import (
    combine_shares,
    create_shares,
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from privacy.secagg.config import SecAggError

KEY_BYTES = 32
"""Length of X25519 keys, derived keys and mask seeds."""
SHARE_PURPOSE = b"medfed secagg share encryption"
MASK_PURPOSE = b"medfed secagg pairwise mask"
_NONCE_BYTES = 12


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw ``(private, public)`` bytes, 32 each."""
    raw = X25519PrivateKey.generate().private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return raw, public_of(raw)


def public_of(private: bytes) -> bytes:
    """The raw X25519 public key of a raw private key (checks a reconstructed key)."""
    key = X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def random_seed() -> bytes:
    """32 bytes from the OS's CSPRNG (a hospital's self-mask seed)."""
    return os.urandom(KEY_BYTES)


def commitment(secret: bytes) -> bytes:
    """SHA-256 of ``secret``: lets the coordinator check a reconstructed self-mask seed."""
    return hashlib.sha256(secret).digest()


def agree(private: bytes, peer_public: bytes, purpose: bytes) -> bytes:
    """The 32-byte key two hospitals share: HKDF-SHA256(X25519(private, peer_public)).

    Raises:
        SecAggError: ``peer_public`` is not a valid X25519 public key.
    """
    try:
        peer = X25519PublicKey.from_public_bytes(peer_public)
        secret = X25519PrivateKey.from_private_bytes(private).exchange(peer)
    except ValueError as err:
        raise SecAggError(f"invalid X25519 public key: {err}") from err
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                info=purpose).derive(secret)


def share_aad(server_round: int, src: int, dst: int) -> bytes:
    """Associated data binding an encrypted share to its round, sender and recipient."""
    return b"".join(v.to_bytes(8, "little", signed=False) for v in (server_round, src, dst))


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """``nonce || ChaCha20-Poly1305(key, nonce, plaintext, aad)``."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """Inverse of :func:`encrypt`.

    Raises:
        SecAggError: the ciphertext was altered, truncated, or made for another key or AAD.
    """
    if len(ciphertext) <= _NONCE_BYTES:
        raise SecAggError("encrypted share is too short")
    try:
        return ChaCha20Poly1305(key).decrypt(ciphertext[:_NONCE_BYTES], ciphertext[_NONCE_BYTES:],
                                             aad)
    except InvalidTag as err:
        raise SecAggError("encrypted share fails authentication") from err


def pack_shares(src: int, dst: int, seed_share: bytes, key_share: bytes) -> bytes:
    """The plaintext one hospital sends another: both node ids and its two shares."""
    return share_keys_plaintext_concat(src, dst, seed_share, key_share)


def unpack_shares(plaintext: bytes) -> tuple[int, int, bytes, bytes]:
    """``(src, dst, seed_share, key_share)`` from :func:`pack_shares`'s bytes."""
    if len(plaintext) < 20:
        raise SecAggError("decrypted share is too short")
    return share_keys_plaintext_separate(plaintext)


def split_secret(secret: bytes, threshold: int, count: int) -> list[bytes]:
    """``count`` Shamir shares of ``secret``, any ``threshold`` of which rebuild it.

    Share ``i`` (0-based) carries Shamir index ``i + 1`` in its first 4 bytes.
    """
    return create_shares(secret, threshold, count)


def combine_secret(shares: list[bytes]) -> bytes:
    """The secret behind ``shares`` (at least the threshold of them, all honest).

    Raises:
        SecAggError: the shares do not rebuild a well-formed secret.
    """
    if not shares or len({len(s) for s in shares}) != 1:
        raise SecAggError("shares are missing or of different lengths")
    try:
        return combine_shares(shares)
    except ValueError as err:
        raise SecAggError(f"shares do not combine: {err}") from err


def mask(seed: bytes, length: int, modulus_bits: int) -> np.ndarray:
    """``length`` pseudo-random values in ``[0, 2**modulus_bits)`` from ``seed``, uint32.

    The ChaCha20 keystream under ``seed`` with a zero nonce (every seed is used for one mask).
    """
    if len(seed) != KEY_BYTES:
        raise SecAggError(f"mask seed must be {KEY_BYTES} bytes, got {len(seed)}")
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    words = np.frombuffer(stream.update(bytes(4 * length)), dtype="<u4").astype(np.uint32)
    if modulus_bits < 32:
        words &= np.uint32((1 << modulus_bits) - 1)
    return words
