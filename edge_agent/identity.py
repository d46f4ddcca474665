"""The edge's Ed25519 identity key: signs every envelope header; enclaves reply to it.

Created on first start in ``state_dir/identity.key`` (PKCS#8 PEM, mode 0600, never overwritten).
A key file readable by group or others is refused, as ssh refuses such private keys.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519


class IdentityError(Exception):
    """The identity key file cannot be created or is unusable."""


def load_or_create(path: Path) -> ed25519.Ed25519PrivateKey:
    path = Path(path)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return _load(path) if path.exists() else _create(path)
    except OSError as exc:
        raise IdentityError(f"identity key {path}: {exc.strerror or exc}") from None


def public_bytes(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def _create(path: Path) -> ed25519.Ed25519PrivateKey:
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        # O_EXCL: two processes starting at once must not each write a different key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _load(path)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    return key


def _load(path: Path) -> ed25519.Ed25519PrivateKey:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise IdentityError(
            f"identity key {path} is accessible by group or others (mode {mode:o}); "
            "run chmod 600 on it"
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise IdentityError(f"identity key {path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise IdentityError(f"identity key {path} is not an Ed25519 key")
    return key
