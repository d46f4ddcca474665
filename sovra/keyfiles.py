"""Private key files a component creates on first start and keeps: PKCS#8 PEM, mode 0600,
never overwritten. A file readable by group or others is refused, as ssh refuses such keys.

Used for keys that must survive restarts (the edge identity key, the broker's EAR signing key).
Keys that must not survive (enclave HPKE and receipt keys) never touch a file.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

K = TypeVar("K", bound=PrivateKeyTypes)


class KeyFileError(Exception):
    """The key file cannot be created, read, or holds the wrong kind of key."""


def load_or_create(
    path: Path,
    *,
    what: str,
    kind: str,
    generate: Callable[[], K],
    accept: Callable[[object], bool],
    error: type[KeyFileError] = KeyFileError,
) -> K:
    """The key in ``path``, created with ``generate`` if the file does not exist.

    ``what`` names the key in messages ("identity key"), ``kind`` the expected kind ("an Ed25519
    key"); ``accept`` says whether a loaded key is of that kind. Failures raise ``error``.
    """
    try:
        return _load_or_create(Path(path), what, kind, generate, accept)
    except KeyFileError as exc:
        raise error(str(exc)) from None


def _load_or_create(
    path: Path, what: str, kind: str, generate: Callable[[], K], accept: Callable[[object], bool]
) -> K:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.exists():
            return cast(K, _load(path, what, kind, accept))
        return _create(path, what, kind, generate, accept)
    except OSError as exc:
        raise KeyFileError(f"{what} {path}: {exc.strerror or exc}") from None


def _create(
    path: Path, what: str, kind: str, generate: Callable[[], K], accept: Callable[[object], bool]
) -> K:
    key = generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        # O_EXCL: two processes starting at once must not each write a different key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return cast(K, _load(path, what, kind, accept))
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    return key


def _load(path: Path, what: str, kind: str, accept: Callable[[object], bool]) -> PrivateKeyTypes:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"{what} {path} is accessible by group or others (mode {mode:o}); run chmod 600 on it"
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"{what} {path} is not an unencrypted PEM private key") from None
    if not accept(key):
        raise KeyFileError(f"{what} {path} is not {kind}")
    return key
