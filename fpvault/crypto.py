"""Encryption of a repository: keys, sealing objects, keyed ids.

An *encrypted* repository has a random *master key*: 32 bytes that encrypt
(ChaCha20-Poly1305, an AEAD: tampering is detected, never decrypted into
garbage) and 32 bytes that key the BLAKE3 hash used for blob, index and
manifest ids, so whoever holds the storage cannot confirm that a known value
is present.  The master key is stored *wrapped*: in ``keys/<id>``, encrypted
with a key derived from a password by scrypt (memory-hard), so the password
can change (``fpvault key passwd``) without re-encrypting anything.

What is sealed: every blob's stored bytes, pack trailers, index files and
manifests.  What is not: the config (it says the repository is encrypted and
how), key objects (wrapped), locks (host, pid and times only), and the sizes
and number of objects, which storage cannot hide.

``Plain`` is the codec of an unencrypted repository: same interface, no-ops.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets

import blake3
import msgspec

from .errors import FpvaultError, RepositoryDamaged

KEYS = "keys/"
NONCE = 12
# scrypt cost: 2^15 x 8 x 128 bytes = 32 MiB of memory and ~0.1 s here, as
# restic and the scrypt paper recommend for interactive use.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 15, 8, 1


class Plain:
    """An unencrypted repository."""

    encrypted = False

    def seal(self, data: bytes) -> bytes:
        return data

    def open(self, data: bytes, what: str) -> bytes:
        return data

    def blob_id(self, data: bytes | memoryview) -> bytes:
        return blake3.blake3(data, max_threads=1).digest()


class Crypto:
    """An encrypted repository's codec."""

    encrypted = True

    def __init__(self, master: bytes):
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        if len(master) != 64:
            raise ValueError("master key must be 64 bytes")
        self._aead = ChaCha20Poly1305(master[:32])
        self._id_key = master[32:]

    def seal(self, data: bytes) -> bytes:
        nonce = os.urandom(NONCE)
        return nonce + self._aead.encrypt(nonce, bytes(data), None)

    def open(self, data: bytes, what: str) -> bytes:
        from cryptography.exceptions import InvalidTag

        if len(data) < NONCE + 16:
            raise RepositoryDamaged(f"{what} is too short to be encrypted data; run 'fpvault verify'.")
        try:
            return self._aead.decrypt(data[:NONCE], data[NONCE:], None)
        except InvalidTag:
            raise RepositoryDamaged(f"{what} failed authentication: it was damaged or tampered "
                                    "with; run 'fpvault verify'.") from None

    def blob_id(self, data: bytes | memoryview) -> bytes:
        return blake3.blake3(data, key=self._id_key, max_threads=1).digest()


class KeyFile(msgspec.Struct, kw_only=True):
    kdf: str = "scrypt"
    n: int
    r: int
    p: int
    salt: str          # base64
    data: str          # base64: nonce + ChaCha20-Poly1305(master key), under the password's key
    created: str = ""


def _derive(password: str, kf: KeyFile) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(kf.salt), n=kf.n,
                          r=kf.r, p=kf.p, maxmem=256 * 1024 * 1024, dklen=32)


def wrap(master: bytes, password: str, created: str = "") -> bytes:
    """A key object holding ``master`` under ``password``."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    kf = KeyFile(n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                 salt=base64.b64encode(os.urandom(16)).decode(), data="", created=created)
    nonce = os.urandom(NONCE)
    kf.data = base64.b64encode(nonce + ChaCha20Poly1305(_derive(password, kf)).encrypt(
        nonce, master, None)).decode()
    return msgspec.json.encode(kf)


class KeyDamaged(Exception):
    """A key object that cannot be read: not JSON, bad base64, scrypt parameters that
    scrypt refuses."""


def unwrap(blob: bytes, password: str) -> bytes | None:
    """The master key in a key object, or None if the password does not open it;
    KeyDamaged if the object cannot be read."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    try:
        kf = msgspec.json.decode(blob, type=KeyFile)
        raw = base64.b64decode(kf.data, validate=True)
        key = _derive(password, kf)
    except (msgspec.DecodeError, ValueError, TypeError, OverflowError, MemoryError) as exc:
        # binascii.Error is a ValueError; scrypt raises ValueError for bad n, r, p.
        raise KeyDamaged(str(exc) or type(exc).__name__) from exc
    if len(raw) < NONCE + 16:   # a nonce and a tag at least: cut short
        raise KeyDamaged(f"its data is {len(raw)} bytes, too short to hold a key")
    try:
        return ChaCha20Poly1305(key).decrypt(raw[:NONCE], raw[NONCE:], None)
    except InvalidTag:
        return None


def new_master() -> bytes:
    return secrets.token_bytes(64)


def open_keys(backend, password: str) -> tuple[Crypto, str]:
    """The codec of an encrypted repository and the key object the password opened."""
    codec, name, _master = unlock(backend, password)
    return codec, name


def unlock(backend, password: str) -> tuple[Crypto, str, bytes]:
    """(codec, key object name, master key) for a password."""
    names = sorted(backend.list(KEYS))
    if not names:
        raise RepositoryDamaged(f"The repository at {backend.describe()} is encrypted but has no "
                                "key objects (keys/); it cannot be opened.")
    damaged = []
    for name in names:
        try:
            master = unwrap(backend.get(name), password)
        except KeyDamaged as exc:
            damaged.append(f"{name} ({exc})")
            continue   # another key object may open with this password
        if master is not None and len(master) == 64:
            return Crypto(master), name, master
    if damaged and len(damaged) == len(names):
        raise RepositoryDamaged(f"The key objects of the repository at {backend.describe()} "
                                f"cannot be read: {'; '.join(damaged[:3])}. Without one, the "
                                "repository cannot be opened: restore keys/ from a copy.")
    also = (f" ({len(damaged)} of its key objects cannot be read: {'; '.join(damaged[:3])})"
            if damaged else "")
    raise FpvaultError(f"Wrong password: no key of this repository opens with it{also}. Check "
                       "FPVAULT_PASSWORD or --password-file.")
