"""The edge's Ed25519 identity key: signs every envelope header; enclaves reply to it.

Created on first start in ``state_dir/identity.key`` (PKCS#8 PEM, mode 0600, never overwritten).
A key file readable by group or others is refused, as ssh refuses such private keys.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from sovra import keyfiles


class IdentityError(keyfiles.KeyFileError):
    """The identity key file cannot be created or is unusable."""


def load_or_create(path: Path) -> ed25519.Ed25519PrivateKey:
    return keyfiles.load_or_create(
        path,
        what="identity key",
        kind="an Ed25519 key",
        generate=ed25519.Ed25519PrivateKey.generate,
        accept=lambda k: isinstance(k, ed25519.Ed25519PrivateKey),
        error=IdentityError,
    )


def public_bytes(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()
