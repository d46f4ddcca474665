"""The broker's EAR signing key: ES256 (EC P-256), signs the attestation results it publishes.

Created on first start (PKCS#8 PEM, mode 0600, never overwritten) at ``ear_signing_key``, by
default in the broker's state directory. A key file readable by group or others is refused.
The key signs statements about enclaves, never payloads: it opens nothing. Broker replicas
that share a database must share this file, or edges see EARs signed by another replica's key
(and record them as invalid).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


class EarKeyError(Exception):
    """The EAR signing key file cannot be created or is unusable."""


def load_or_create(path: Path) -> ec.EllipticCurvePrivateKey:
    path = Path(path)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return _load(path) if path.exists() else _create(path)
    except OSError as exc:
        raise EarKeyError(f"EAR signing key {path}: {exc.strerror or exc}") from None


def _create(path: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        # O_EXCL: two replicas starting at once must not each write a different key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _load(path)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    return key


def _load(path: Path) -> ec.EllipticCurvePrivateKey:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise EarKeyError(
            f"EAR signing key {path} is accessible by group or others (mode {mode:o}); "
            "run chmod 600 on it"
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise EarKeyError(f"EAR signing key {path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise EarKeyError(f"EAR signing key {path} is not an EC P-256 key (ES256)")
    return key
