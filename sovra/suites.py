"""HPKE cipher suites for sealing data keys to enclave keys (RFC 9180).

Post-quantum by default: ML-KEM-768 + X25519 (X-Wing style hybrid, draft-ietf-hpke-pq), because
data sealed today may be recorded and attacked for decades. Plain X25519 stays selectable. The
suite name travels in the signed envelope header, so neither side can be downgraded silently.

A public key on the wire is the concatenation ``ML-KEM-768 encapsulation key (1184 bytes) ||
X25519 public key (32 bytes)`` for the hybrid KEM, or the 32-byte X25519 key alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

KEM_HYBRID: Final = "MLKEM768-X25519"
KEM_X25519: Final = "X25519"
KEMS: Final = (KEM_HYBRID, KEM_X25519)

_MLKEM768_PUB_LEN: Final = 1184
_X25519_PUB_LEN: Final = 32

HPKEPublicKey = hpke.MLKEM768X25519PublicKey | x25519.X25519PublicKey
HPKEPrivateKey = hpke.MLKEM768X25519PrivateKey | x25519.X25519PrivateKey


class UnknownSuite(ValueError):
    """A suite or KEM name that this version does not implement."""


@dataclass(frozen=True)
class Suite:
    """One named HPKE suite: KEM, HKDF-SHA256, AES-256-GCM."""

    name: str
    kem: str

    def hpke(self) -> hpke.Suite:
        kem = hpke.KEM.MLKEM768_X25519 if self.kem == KEM_HYBRID else hpke.KEM.X25519
        return hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


SUITES: Final[dict[str, Suite]] = {
    s.name: s
    for s in (
        Suite("MLKEM768-X25519/HKDF-SHA256/AES-256-GCM", KEM_HYBRID),
        Suite("X25519/HKDF-SHA256/AES-256-GCM", KEM_X25519),
    )
}
DEFAULT_SUITE: Final = "MLKEM768-X25519/HKDF-SHA256/AES-256-GCM"


def suite_by_name(name: str) -> Suite:
    try:
        return SUITES[name]
    except KeyError:
        raise UnknownSuite(
            f"unknown HPKE suite {name!r}; this version supports: {', '.join(SUITES)}"
        ) from None


def suite_for_kem(kem: str) -> Suite:
    for suite in SUITES.values():
        if suite.kem == kem:
            return suite
    raise UnknownSuite(f"unknown KEM {kem!r}; this version supports: {', '.join(KEMS)}")


def decode_public_key(kem: str, data: bytes) -> HPKEPublicKey:
    """Parse wire bytes into a public key; ValueError with a clear reason if malformed."""
    if kem == KEM_HYBRID:
        if len(data) != _MLKEM768_PUB_LEN + _X25519_PUB_LEN:
            raise ValueError(
                f"{KEM_HYBRID} public key must be {_MLKEM768_PUB_LEN + _X25519_PUB_LEN} bytes, "
                f"got {len(data)}"
            )
        return hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(data[:_MLKEM768_PUB_LEN]),
            x25519.X25519PublicKey.from_public_bytes(data[_MLKEM768_PUB_LEN:]),
        )
    if kem == KEM_X25519:
        if len(data) != _X25519_PUB_LEN:
            raise ValueError(f"X25519 public key must be 32 bytes, got {len(data)}")
        return x25519.X25519PublicKey.from_public_bytes(data)
    raise UnknownSuite(f"unknown KEM {kem!r}; this version supports: {', '.join(KEMS)}")


def check_public_key(kem: str, key: HPKEPublicKey) -> HPKEPublicKey:
    """``key`` (already parsed by :func:`decode_public_key`) if it is a key of ``kem``, else
    ValueError: a parsed key may be reused, but never under another KEM."""
    if kem not in KEMS:
        raise UnknownSuite(f"unknown KEM {kem!r}; this version supports: {', '.join(KEMS)}")
    expected = hpke.MLKEM768X25519PublicKey if kem == KEM_HYBRID else x25519.X25519PublicKey
    if not isinstance(key, expected):
        raise ValueError(f"public key is not a {kem} key")
    return key


@dataclass(frozen=True, eq=False)
class KeyPair:
    """An HPKE key pair generated in this process. ``public_bytes`` is the wire encoding."""

    kem: str
    private_key: HPKEPrivateKey
    public_bytes: bytes

    @classmethod
    def generate(cls, kem: str = KEM_HYBRID) -> KeyPair:
        if kem == KEM_HYBRID:
            mk = mlkem.MLKEM768PrivateKey.generate()
            xk = x25519.X25519PrivateKey.generate()
            pub = mk.public_key().public_bytes_raw() + xk.public_key().public_bytes_raw()
            return cls(kem, hpke.MLKEM768X25519PrivateKey(mk, xk), pub)
        if kem == KEM_X25519:
            xk = x25519.X25519PrivateKey.generate()
            return cls(kem, xk, xk.public_key().public_bytes_raw())
        raise UnknownSuite(f"unknown KEM {kem!r}; this version supports: {', '.join(KEMS)}")

    def __repr__(self) -> str:  # never print key material
        return f"KeyPair(kem={self.kem!r})"
